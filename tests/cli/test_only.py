"""`--only ID_OR_GLOB` on plan and apply, and `only=` in the library.

Takes: the repository's example manifest (copied into tmp_path), run with the offline placeholder
provider and, where requests are counted, against the fake DashScope server.
Gives: evidence that only the selected shots are planned and made, that every other shot's line
in results.json keeps its bytes, that orphans are neither reported nor dropped, and that a
pattern matching no shot is refused (exit 2, naming it) before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imgbatch import ApplyOptions, ConfigError, apply, make_plan
from tests.cli.test_cli import FAST, assert_clean, edit_manifest, expected_shots, output_dir, run
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest
from tests.support.reference_images import PNG, PNG_OTHER, ReferenceServer

OFFLINE = ("--provider", "placeholder")


def result_lines(manifest: Path) -> dict[str, bytes]:
    """Each entry's line in results.json, by shot id (shots and orphans alike)."""
    lines = {}
    for line in (output_dir(manifest) / "results.json").read_bytes().splitlines():
        if line.startswith(b"    {"):
            lines[json.loads(line.rstrip(b","))["id"]] = line.rstrip(b",")
    return lines


def reprompt(*indexes: int) -> Any:
    def change(doc: dict[str, Any]) -> None:
        for index in indexes:
            doc["shots"][index]["prompt"] += ", seen from above"

    return change


def test_apply_only_makes_the_selected_shots_and_keeps_every_other_line(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    assert run("apply", example_manifest, *FAST).exit_code == 0
    shots = list(expected_shots(example_manifest))
    before = result_lines(example_manifest)
    edit_manifest(example_manifest, reprompt(1, 5))
    sent = fake_server.generation_count

    result = run("apply", example_manifest, "--only", shots[1], *FAST)

    assert result.exit_code == 0, result.output
    assert_clean(result)
    assert fake_server.generation_count == sent + 1
    after = result_lines(example_manifest)
    assert list(after) == shots  # manifest order, nothing added or lost
    assert after[shots[1]] != before[shots[1]]
    assert b"seen from above" in after[shots[1]]
    # The other edited shot was not selected: its line is byte for byte what it was.
    assert {k: v for k, v in after.items() if k != shots[1]} == {
        k: v for k, v in before.items() if k != shots[1]
    }
    assert "1 generated, 0 cached, 0 failed, 0 unchanged" in result.stdout
    # And a full plan still has it to do.
    pending = run("plan", example_manifest, "--json")
    actions = {shot["id"]: shot["action"] for shot in json.loads(pending.stdout)["shots"]}
    assert actions[shots[5]] == "replace"
    assert actions[shots[1]] == "unchanged"


def test_globs_select_in_manifest_order_and_plan_shows_only_them(
    tmp_path: Path, example_manifest: Path
) -> None:
    result = run(
        "plan", example_manifest, *OFFLINE, "--only", "s0[67]-*", "--only", "s01*", "--json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [shot["id"] for shot in document["shots"]] == [
        "s01-dawn-road",
        "s06-cafe",
        "s07-phone",
    ]
    assert document["summary"]["create"] == 3
    assert "s02-dusk-portrait" not in result.stderr
    # --detailed-exitcode answers for the selection alone.
    assert run("apply", example_manifest, *OFFLINE, "--only", "s01*").exit_code == 0
    done = run("plan", example_manifest, *OFFLINE, "--only", "s01*", "--detailed-exitcode")
    assert done.exit_code == 0, done.output
    rest = run("plan", example_manifest, *OFFLINE, "--only", "s02*", "--detailed-exitcode")
    assert rest.exit_code == 2, rest.output


def test_orphans_are_neither_reported_nor_dropped_under_only(example_manifest: Path) -> None:
    assert run("apply", example_manifest, *OFFLINE).exit_code == 0
    removed = list(expected_shots(example_manifest))[7]

    def drop_last(doc: dict[str, Any]) -> None:
        del doc["shots"][7]

    edit_manifest(example_manifest, drop_last)
    before = result_lines(example_manifest)

    plan = run("plan", example_manifest, *OFFLINE, "--only", "s03-*")
    assert plan.exit_code == 0, plan.output
    assert "orphan" not in plan.stdout and removed not in plan.stdout

    result = run("apply", example_manifest, *OFFLINE, "--only", "s03-*", "--json")
    assert result.exit_code == 0, result.output
    assert [shot["id"] for shot in json.loads(result.stdout)["shots"]] == ["s03-helmet"]
    after = result_lines(example_manifest)
    assert after == before  # the orphan's line included, byte for byte
    document = json.loads((output_dir(example_manifest) / "results.json").read_text())
    assert [entry["id"] for entry in document["orphans"]] == [removed]
    assert (output_dir(example_manifest) / f"{removed}.png").is_file()


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_a_pattern_matching_no_shot_exits_2_naming_it_and_writes_nothing(
    command: str, example_manifest: Path
) -> None:
    result = run(command, example_manifest, *OFFLINE, "--only", "s01*", "--only", "s99-*")
    assert result.exit_code == 2, result.output
    assert_clean(result)
    assert "--only pattern 's99-*' matches no shot id" in result.stderr
    assert "s01*" not in result.stderr  # the pattern that did match is not blamed
    assert not output_dir(example_manifest).exists()


def test_only_from_python(example_manifest: Path) -> None:
    plan = make_plan(example_manifest, provider="placeholder", only=["*-cafe", "s08-finale"])
    assert [item.id for item in plan.shots] == ["s06-cafe", "s08-finale"]
    assert plan.orphans == ()

    report = apply(example_manifest, ApplyOptions(provider="placeholder", only="s06-cafe"))
    assert [entry.id for entry in report.entries] == ["s06-cafe"]
    assert list(result_lines(example_manifest)) == ["s06-cafe"]
    assert not (output_dir(example_manifest) / "s08-finale.png").exists()
    # The contact sheet still shows the whole shot list, the others as pending.
    sheet = (output_dir(example_manifest) / "index.html").read_text(encoding="utf-8")
    assert 'data-id="s06-cafe" data-status="generated"' in sheet
    assert 'data-id="s08-finale" data-status="pending"' in sheet

    with pytest.raises(ConfigError, match="'nothing'"):
        make_plan(example_manifest, provider="placeholder", only=["nothing"])


def test_a_left_out_shots_reference_url_is_not_fetched(tmp_path: Path) -> None:
    with ReferenceServer({"/front.png": PNG, "/side.png": PNG_OTHER}) as server:
        front, side = server.url("/front.png"), server.url("/side.png")
        manifest = write_manifest(
            tmp_path,
            "version: 1\nname: refs\nprovider: placeholder\n"
            'defaults:\n  size: "1328*1328"\nshots:\n'
            f'  - id: front\n    prompt: a helmet\n    reference_image: "{front}"\n'
            f'  - id: side\n    prompt: a helmet\n    reference_image: "{side}"\n',
        )
        report = apply(manifest, ApplyOptions(only=("side",)))
        assert [entry.id for entry in report.entries] == ["side"]
        assert server.requests == {"/side.png": 1}
        # A pattern matching nothing is refused before any URL is fetched.
        server.requests.clear()
        with pytest.raises(ConfigError):
            apply(manifest, ApplyOptions(only=("front", "back")))
        assert server.total == 0


def test_only_and_prune_together_are_refused(example_manifest: Path) -> None:
    result = run("apply", example_manifest, *OFFLINE, "--only", "s01*", "--prune")
    assert result.exit_code == 2, result.output
    assert_clean(result)
    assert "--prune removes orphans, which --only leaves alone" in result.stderr
    assert not output_dir(example_manifest).exists()
