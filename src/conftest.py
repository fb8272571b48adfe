"""Doctests of the library's docstrings (`pytest` collects src/ with --doctest-modules).

Each doctest runs in a temporary copy of the repository's `manifests/` folder, with no API key
and a private HOME, so an example that writes images (`apply(...)`) writes them there, never into
the repository, and never reaches a network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Running it would start the command line.
collect_ignore = ["imgbatch/__main__.py"]


@pytest.fixture(autouse=True)
def _doctest_in_a_copy(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not isinstance(request.node, pytest.DoctestItem):
        return
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("DASHSCOPE_API_KEY", "DASHSCOPE_API_KEY_FILE_PATH", "OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
