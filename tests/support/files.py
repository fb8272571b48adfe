"""Where the repository is, the key the fake server accepts, and shot lists written for a test.

Takes: a folder and manifest text (or a shot count). Gives: the manifest's path, written there.
"""

from __future__ import annotations

from pathlib import Path

FAKE_KEY = "sk-test-fake-key-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLE = REPO / "manifests" / "cyclist-spot.yaml"


def write_manifest(directory: Path, text: str, name: str = "shots.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def write_many_shots(directory: Path, name: str, count: int) -> Path:
    """A manifest called `name` with `count` distinct 1:1 shots, shot-000 onwards."""
    lines = ["version: 1", f"name: {name}", "defaults:", '  size: "1328*1328"', "shots:"]
    for index in range(count):
        lines += [f"  - id: shot-{index:03d}", f'    prompt: "a lighthouse, take {index}"']
    return write_manifest(directory, "\n".join(lines) + "\n")
