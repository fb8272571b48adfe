"""Every benchmark is run by CI in its quick mode, so that none can stop working unseen.

Takes `.ci/run` and the scripts in `bench/`; gives evidence that each bench script (the fake
server it starts aside) is in CI's loop of quick runs and has a `--quick` flag to be run with.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Started by the benches, not a bench itself.
HELPERS = {"fake_server"}


def ci_benches() -> set[str]:
    text = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    loop = re.search(
        r"^for bench in ([\w ]+); do\n\s+python \"bench/\$bench.py\" --quick$", text, re.M
    )
    assert loop is not None, ".ci/run has no loop running the benches with --quick"
    return set(loop.group(1).split())


def test_every_bench_runs_in_ci_in_its_quick_mode() -> None:
    scripts = {path.stem for path in (REPO / "bench").glob("*.py")} - HELPERS - {"__init__"}
    assert scripts == ci_benches()
    for name in scripts:
        assert '"--quick"' in (REPO / "bench" / f"{name}.py").read_text(encoding="utf-8"), name
