"""State at scale: what a big run costs beyond its shots.

Takes: a shot list applied with the offline placeholder provider through `apply` (asyncio.run).
Gives: evidence that the report's repr does not grow with the run (asyncio.run formats the
finished task, its result included, when it puts back the SIGINT handler: a dataclass repr of
100,000 entries cost 3 to 4 s and 280 MB of a no-op re-apply there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbatch.run.apply import apply
from tests.conftest import write_many_shots


def test_the_report_of_a_run_is_formatted_in_one_short_line_whatever_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    report = apply(write_many_shots(tmp_path, "many", 40), provider="placeholder")
    assert report.ok and len(report.entries) == 40
    text = repr(report)
    assert text.startswith("<ApplyReport 40 shots") and len(text) < 300
    assert "prompt" not in text
