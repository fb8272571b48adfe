"""The `imgbatch-validate` pre-commit hook, run for real with `pre-commit try-repo`.

Takes: a snapshot of this checkout (its tracked and untracked, not ignored, files, committed in
a repository of its own, so that the hook is installed from exactly the code under test), and a
user's repository made in tmp_path with a good and a bad shot list under manifests/ and a YAML
file elsewhere that is not a shot list. pre-commit builds the hook's virtualenv from the snapshot
with pip (the project and its dependencies, from the configured package index).
Gives: evidence that the hook fails on the bad shot list with imgbatch's message (file, line,
shot), passes once it is fixed, and never looks at YAML outside manifests/.

Skipped, saying why, only when pre-commit cannot create a Python environment on this machine at
all (a trivial hook cannot be installed either); a project that cannot be installed fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.files import EXAMPLE, REPO

pytestmark = pytest.mark.slow  # pre-commit builds the hook's virtualenv with pip

BAD = "version: 1\nname: bad\nshots:\n  - id: one\n"
NOT_A_SHOT_LIST = "not: [a shot list\n"  # and not even valid YAML


# Commits in the test's own repositories: a name of their own, never signed.
GIT_CONFIG = ("-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=0")


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *GIT_CONFIG, *args], cwd=folder, capture_output=True, text=True, check=True
    )
    return done.stdout


def committed_copy(files: list[str], source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        # Links as links: src/imgbatch/schema is one, and the package must ship what it points at.
        shutil.copy2(source / name, target / name, follow_symlinks=False)
    git(target, "init", "-q")
    git(target, "add", "-A")
    git(target, "commit", "-q", "-m", "snapshot")
    return target


def try_repo(
    repository: Path, hook: str, workdir: Path, home: Path
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRE_COMMIT_HOME": str(home), "PRE_COMMIT_COLOR": "never"}
    env.pop("PYTHONPATH", None)  # the hook runs the copy pre-commit installed, nothing else
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", "try-repo", str(repository), hook, "--all-files"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def skip_unless_environments_work(tmp_path: Path, failed: str) -> None:
    """Skip when pre-commit cannot install even a hook with no dependencies; else fail."""
    trivial = tmp_path / "trivial-hook"
    trivial.mkdir()
    (trivial / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "trivial-hook"\nversion = "0"\n',
        encoding="utf-8",
    )
    (trivial / ".pre-commit-hooks.yaml").write_text(
        "- id: trivial\n  name: trivial\n  entry: python -c pass\n  language: python\n"
        "  pass_filenames: false\n  always_run: true\n",
        encoding="utf-8",
    )
    committed = committed_copy(
        ["pyproject.toml", ".pre-commit-hooks.yaml"], trivial, tmp_path / "trivial-repo"
    )
    done = try_repo(committed, "trivial", committed, tmp_path / "trivial-home")
    if done.returncode != 0:
        pytest.skip(
            "pre-commit cannot create a Python environment on this machine (a hook with no "
            f"dependencies fails to install too):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    pytest.fail(f"the imgbatch-validate hook could not be installed:\n{failed}")


def test_the_validate_hook_fails_a_bad_shot_list_and_passes_a_good_one(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: pre-commit needs it")
    files = git(REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    snapshot = committed_copy(
        [name for name in files.split("\0") if name and os.path.lexists(REPO / name)],
        REPO,
        tmp_path / "imgbatch",
    )

    user = tmp_path / "user-repo"
    (user / "manifests").mkdir(parents=True)
    (user / "config").mkdir()
    shutil.copy(EXAMPLE, user / "manifests" / "spot.yaml")
    (user / "manifests" / "bad.yaml").write_text(BAD, encoding="utf-8")
    (user / "config" / "settings.yaml").write_text(NOT_A_SHOT_LIST, encoding="utf-8")
    git(user, "init", "-q")
    git(user, "add", "-A")
    home = tmp_path / "pre-commit-home"

    failing = try_repo(snapshot, "imgbatch-validate", user, home)
    output = failing.stdout + failing.stderr
    if "Failed" not in output and failing.returncode != 0:
        skip_unless_environments_work(tmp_path, output)
    assert failing.returncode == 1, output
    assert "imgbatch validate" in output and "Failed" in output
    assert "- exit code: 2" in output
    assert "manifests/bad.yaml:4:5: shot one: missing required field 'prompt'" in output
    assert "manifests/spot.yaml: valid, 8 shots" in output
    assert "settings.yaml" not in output

    # Fixed: the same environment runs again, and passes.
    (user / "manifests" / "bad.yaml").write_text(BAD + "    prompt: a red bicycle\n")
    git(user, "add", "-A")
    passing = try_repo(snapshot, "imgbatch-validate", user, home)
    output = passing.stdout + passing.stderr
    assert passing.returncode == 0, output
    assert "imgbatch validate" in output and "Passed" in output
