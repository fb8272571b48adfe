"""State at scale: what a big run costs beyond its shots.

Takes: a shot list applied with the offline placeholder provider through `apply` (asyncio.run).
Gives: evidence that the report's repr does not grow with the run (asyncio.run formats the
finished task, its result included, when it puts back the SIGINT handler: a dataclass repr of
100,000 entries cost 3 to 4 s and 280 MB of a no-op re-apply there).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from imgbatch.run.apply import apply, make_plan
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


def test_loading_and_planning_a_big_shot_list_leave_the_garbage_collector_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading and planning make objects by the hundred thousand, none of them garbage in a
    cycle: the cyclic collector's passes over them were a fifth of the CPU of a 100,000-shot
    no-op apply. None runs while a plan is made: at most the one that follows, once the
    collector is on again (without the pause: twenty, for 2,000 shots)."""
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    manifest = write_many_shots(tmp_path, "many", 2000)
    collections: list[int] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        plan = make_plan(manifest, provider="placeholder")
    finally:
        gc.callbacks.remove(seen)
    assert len(plan.shots) == 2000
    assert len(collections) <= 1
    assert gc.isenabled()
