"""State at scale: what a big run costs beyond its shots.

Takes: a shot list applied with the offline placeholder provider through `apply` (asyncio.run).
Gives: evidence that the report's repr does not grow with the run (asyncio.run formats the
finished task, its result included, when it puts back the SIGINT handler: a dataclass repr of
100,000 entries cost 3 to 4 s and 280 MB of a no-op re-apply there).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from imgbatch.run.apply import apply, load_and_expand, make_plan
from imgbatch.state.folder import OutputFolder
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


def test_a_loaded_state_shares_the_shot_lists_strings_and_holds_its_requests_compactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan holds the shot list and the state whole: each loaded entry keeps the shot's own
    id, file, key and prompt (equal strings, one object), one `made_at` for the shots finished
    in the same second, and its request as a compact mapping equal to the dict written (a
    100,000-shot state was 130 MB; 9 strings and a dict an entry)."""
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    manifest = write_many_shots(tmp_path, "many", 30)
    apply(manifest, provider="placeholder")
    _, expansion = load_and_expand(manifest, "placeholder")
    shots = {shot.id: shot for shot in expansion.shots}
    state = OutputFolder(expansion.output_dir).load(shots)
    written = json.loads((expansion.output_dir / "results.json").read_text())["shots"]
    assert len(state.entries) == 30
    for raw, (shot_id, entry) in zip(written, state.entries.items(), strict=True):
        shot = shots[shot_id]
        assert entry.id is shot.id and entry.file is shot.file
        assert entry.key is shot.request.key and entry.prompt is shot.request.prompt
        assert entry.request == raw["request"] and dict(entry.request) == raw["request"]
        assert entry.to_json()["request"] == raw["request"]
        assert sys.getsizeof(entry.request) < sys.getsizeof(raw["request"]) / 2
    stamps = {id(entry.made_at) for entry in state.entries.values()}
    assert len(stamps) == len({entry.made_at for entry in state.entries.values()})


def test_an_apply_keeps_what_loading_and_planning_made_out_of_the_collectors_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest, its shots, the state and the plan are frozen out of the collector's
    passes once made (`gc.freeze`: those passes were half a second of a 100,000-shot no-op
    apply), and given back when the run ends; a caller's own frozen objects are left alone."""
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    manifest = write_many_shots(tmp_path, "many", 50)
    frozen: list[int] = []
    apply(
        manifest, provider="placeholder", on_plan=lambda plan: frozen.append(gc.get_freeze_count())
    )
    assert frozen[0] > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        apply(manifest, provider="placeholder")
        assert gc.get_freeze_count() == theirs
    finally:
        gc.unfreeze()
