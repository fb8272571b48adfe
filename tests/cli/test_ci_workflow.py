"""imgbatch in git and CI: results.json describes the output folder, not the last run.

Takes: the repository's example manifest (copied into tmp_path), run with the offline placeholder
provider and against the fake DashScope server.
Gives: evidence that a no-op apply leaves results.json byte for byte as it was (same mtime),
and that an edited shot changes its own line, the summary and updated_at, nothing else.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from imgbatch.state.folder import OutputFolder
from imgbatch.state.record import Owner
from imgbatch.state.results import ResultEntry
from tests.cli.test_cli import (
    FAST,
    assert_clean,
    edit_manifest,
    expected_shots,
    output_dir,
    run,
)
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest
from tests.unit.test_store_results import result


def results_file(manifest: Path) -> Path:
    return output_dir(manifest) / "results.json"


def results_entries(manifest: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(results_file(manifest).read_text())["shots"]
    return entries


@pytest.mark.parametrize("provider", ["placeholder", "dashscope"])
def test_a_no_op_apply_leaves_results_json_byte_identical(
    provider: str,
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
) -> None:
    first = run("apply", example_manifest, "--provider", provider, *FAST)
    assert first.exit_code == 0, first.output
    path = results_file(example_manifest)
    before = path.read_bytes()
    # An mtime in the past: a rewrite within the same clock tick could not hide.
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    sent = fake_server.generation_count

    second = run("apply", example_manifest, "--provider", provider, *FAST)
    assert second.exit_code == 0, second.output
    assert_clean(second)
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == 1_000_000_000
    assert fake_server.generation_count == sent
    # What the run did is in its report, not in the entries' statuses.
    count = len(expected_shots(example_manifest))
    assert f"0 generated, 0 cached, 0 failed, {count} unchanged" in second.stdout


def test_an_edit_changes_only_that_shots_line_the_summary_and_updated_at(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    assert run("apply", example_manifest, *FAST).exit_code == 0
    path = results_file(example_manifest)
    before = path.read_text(encoding="utf-8").splitlines()
    time.sleep(1.1)  # updated_at has one-second resolution

    edited = list(expected_shots(example_manifest))[2]

    def reprompt(doc: dict[str, Any]) -> None:
        doc["shots"][2]["prompt"] += ", seen from above"

    edit_manifest(example_manifest, reprompt)
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    count = len(expected_shots(example_manifest))
    assert f"1 generated, 0 cached, 0 failed, {count - 1} unchanged" in result.stdout
    after = path.read_text(encoding="utf-8").splitlines()
    assert len(after) == len(before)
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    diff = "\n".join(difflib.unified_diff(before, after, lineterm=""))
    # The summary counts statuses, and the edited shot was generated before and after.
    assert [old.split(":", 1)[0] for old, _ in changed] == ['  "updated_at"', '    {"id"'], diff
    assert f'"id": "{edited}"' in changed[1][1]
    assert "seen from above" in changed[1][1]
    assert changed[0][1] > changed[0][0]  # ISO timestamps: later sorts after


# ----- plan --detailed-exitcode -------------------------------------------------------------------


def test_plan_detailed_exitcode_says_whether_anything_is_to_do(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    # Without the flag a plan with work to do still exits 0.
    assert run("plan", example_manifest).exit_code == 0
    pending = run("plan", example_manifest, "--detailed-exitcode")
    assert pending.exit_code == 2, pending.output
    assert "create" in pending.stdout

    assert run("apply", example_manifest, *FAST).exit_code == 0
    done = run("plan", example_manifest, "--detailed-exitcode")
    assert done.exit_code == 0, done.output

    # A restore (file deleted, image in the cache) is something to do, though not paid.
    first = next(iter(expected_shots(example_manifest)))
    (output_dir(example_manifest) / f"{first}.png").unlink()
    restore = run("plan", example_manifest, "--detailed-exitcode")
    assert restore.exit_code == 2, restore.output
    assert "0 paid requests" in restore.stdout
    assert fake_server.generation_count == len(expected_shots(example_manifest))


def test_plan_detailed_exitcode_errors_exit_1_not_2(tmp_path: Path, example_manifest: Path) -> None:
    invalid = write_manifest(tmp_path, "version: 1\nname: bad\nshots:\n  - id: one\n")
    # Without the flag an invalid manifest exits 2, as every command does.
    assert run("plan", invalid).exit_code == 2
    result = run("plan", invalid, "--detailed-exitcode")
    assert result.exit_code == 1, result.output
    assert_clean(result)
    assert "error:" in result.stderr and "one" in result.stderr
    assert result.stdout == ""
    # A bad option too: 2 would read as "changes pending".
    bad = run("plan", example_manifest, "--detailed-exitcode", "--provider", "nope")
    assert bad.exit_code == 1, bad.output
    assert run("plan", example_manifest, "--provider", "nope").exit_code == 2


# ----- apply --frozen -----------------------------------------------------------------------------


def test_apply_frozen_refuses_before_sending_or_writing_anything(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    fresh = run("apply", example_manifest, "--frozen", *FAST)
    assert fresh.exit_code == 1, fresh.output
    assert_clean(fresh)
    assert "--frozen: 8 shots would need a paid request" in fresh.stderr
    assert not output_dir(example_manifest).exists()  # not even the lock folder
    assert fake_server.requests == []

    assert run("apply", example_manifest, *FAST).exit_code == 0
    shots = list(expected_shots(example_manifest))
    edited, deleted = shots[2], shots[4]
    out = output_dir(example_manifest)
    (out / f"{deleted}.png").unlink()

    def reprompt(doc: dict[str, Any]) -> None:
        doc["shots"][2]["prompt"] += ", seen from above"

    edit_manifest(example_manifest, reprompt)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    sent = len(fake_server.requests)
    result = run("apply", example_manifest, "--frozen", *FAST)
    assert result.exit_code == 1, result.output
    assert f"{edited} (replace: changed: text)" in result.stderr
    assert "1 shot would need a paid request" in result.stderr
    assert deleted not in result.stderr  # a restore is allowed
    assert len(fake_server.requests) == sent
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_apply_frozen_restores_from_the_cache_and_sends_nothing(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    assert run("apply", example_manifest, *FAST).exit_code == 0
    deleted = list(expected_shots(example_manifest))[4]
    image = output_dir(example_manifest) / f"{deleted}.png"
    original = image.read_bytes()
    image.unlink()
    sent = len(fake_server.requests)

    result = run("apply", example_manifest, "--frozen", *FAST)
    assert result.exit_code == 0, result.output
    assert image.read_bytes() == original
    assert len(fake_server.requests) == sent
    assert "0 generated, 1 cached, 0 failed, 7 unchanged" in result.stdout


def test_apply_frozen_never_generates_even_when_a_restore_finds_the_cache_damaged(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    assert run("apply", example_manifest, *FAST).exit_code == 0
    deleted = list(expected_shots(example_manifest))[4]
    out = output_dir(example_manifest)
    (out / f"{deleted}.png").unlink()
    entry = next(e for e in results_entries(example_manifest) if e["id"] == deleted)
    cached = out / ".imgbatch" / "cache" / entry["key"][:2] / f"{entry['key']}.png"
    cached.write_bytes(cached.read_bytes()[:100])  # damaged: a restore must fetch or generate
    fake_server.forget_images()  # and its URL expired: only a new, paid image would do
    generations = fake_server.generation_count

    result = run("apply", example_manifest, "--frozen", *FAST)
    assert result.exit_code == 1, result.output
    assert fake_server.generation_count == generations
    assert "--frozen sends no paid request" in result.output
    assert "0 requests sent" in result.stdout


# ----- --json -------------------------------------------------------------------------------------


def test_plan_json_is_one_document_on_stdout_with_the_text_on_stderr(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    shots = list(expected_shots(example_manifest))
    fresh = run("plan", example_manifest, "--json")
    assert fresh.exit_code == 0, fresh.output
    document = json.loads(fresh.stdout)
    assert "Plan: 8 create. 8 paid requests." in fresh.stderr
    assert [shot["id"] for shot in document["shots"]] == shots
    assert document["shots"][0] == {
        "id": shots[0],
        "action": "create",
        "reason": "new shot",
        "changed": None,
        "cost": None,
    }
    assert document["summary"] == {
        "create": 8,
        "replace": 0,
        "unchanged": 0,
        "restore": 0,
        "recover": 0,
        "drift": 0,
        "orphan": 0,
        "paid_requests": 8,
        "estimated_cost": None,
        "currency": None,
    }

    assert run("apply", example_manifest, *FAST).exit_code == 0
    (output_dir(example_manifest) / f"{shots[4]}.png").unlink()

    def edit(doc: dict[str, Any]) -> None:
        doc["shots"][2]["prompt"] += ", seen from above"
        doc["shots"][2]["seed"] = 99
        del doc["shots"][7]

    edit_manifest(example_manifest, edit)
    result = run("plan", example_manifest, "--json", "--detailed-exitcode")
    assert result.exit_code == 2, result.output
    document = json.loads(result.stdout)
    rows = {shot["id"]: shot for shot in document["shots"]}
    assert rows[shots[2]]["action"] == "replace"
    assert rows[shots[2]]["changed"] == ["text", "seed"]
    assert rows[shots[4]]["action"] == "restore"
    assert rows[shots[7]]["action"] == "orphan"
    assert document["summary"] == {
        "create": 0,
        "replace": 1,
        "unchanged": 5,
        "restore": 1,
        "recover": 0,
        "drift": 0,
        "orphan": 1,
        "paid_requests": 1,
        "estimated_cost": None,
        "currency": None,
    }


def test_apply_json_reports_what_the_run_did(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    shots = list(expected_shots(example_manifest))
    first = run("apply", example_manifest, "--json", *FAST)
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert "8 generated, 0 cached, 0 failed, 0 unchanged" in first.stderr
    path = output_dir(example_manifest) / "results.json"
    assert Path(document["results"]).resolve() == path
    entries = {entry["id"]: entry for entry in results_entries(example_manifest)}
    assert document["shots"][0] == {
        "id": shots[0],
        "status": "generated",
        "file": f"{shots[0]}.png",
        "error": None,
        "error_code": None,
        "request_id": entries[shots[0]]["request_id"],
        "moved_aside": None,
    }
    assert document["summary"] == {
        "generated": 8,
        "cached": 0,
        "from_store": 0,
        "failed": 0,
        "unfetched": 0,
        "not_run": 0,
        "unchanged": 0,
        "drift": 0,
        "requests": 8,
        "billed": 8,
        "throttled": 0,
        "retries": 0,
        "cost": None,
        "possible_extra_cost": 0.0,
        "currency": None,
        "interrupted": False,
        "bounded": None,
        "remaining": 0,
    }

    (output_dir(example_manifest) / f"{shots[1]}.png").unlink()
    again = run("apply", example_manifest, "--json", *FAST)
    assert again.exit_code == 0, again.output
    document = json.loads(again.stdout)
    statuses = {shot["id"]: shot["status"] for shot in document["shots"]}
    assert statuses[shots[1]] == "cached"
    assert {statuses[s] for s in shots if s != shots[1]} == {"unchanged"}
    assert document["summary"]["unchanged"] == 7 and document["summary"]["requests"] == 0


# ----- results.json: unchanged means untouched ----------------------------------------------------


def test_results_keep_updated_at_and_the_file_while_nothing_else_changes(
    tmp_path: Path,
) -> None:
    meta = {"manifest": "shots.yaml", "provider": "placeholder", "key_format": 1}
    entries = [result("s01"), result("s02")]
    folder = OutputFolder(tmp_path)

    def save(orphans: list[ResultEntry], now: str) -> Path:
        before = folder.load()
        return folder.save(
            entries, orphans, [], meta, owner=Owner("shots.yaml", "x"), before=before, now=now
        )

    path = save([], "2026-01-01T00:00:00+00:00")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.read_bytes()
    folder.journal().record(entries[0])  # a journal the results already include

    save([], "2026-02-02T00:00:00+00:00")
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == 1_000_000_000
    assert not folder.journal_path.exists()

    # Deleted (or edited by hand) with nothing changed since: put back as it was, time and all.
    path.unlink()
    save([], "2026-02-03T00:00:00+00:00")
    assert path.read_bytes() == before

    # An orphan is a change: the time moves.
    save([result("old")], "2026-03-03T00:00:00+00:00")
    assert json.loads(path.read_text())["updated_at"] == "2026-03-03T00:00:00+00:00"


@pytest.mark.parametrize("stamp", ["zzz, edited by hand", "9999-12-31T00:00:00+00:00"])
def test_a_hand_edited_made_at_never_becomes_updated_at(
    stamp: str, api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    # results.json edited by hand (or a teammate's commit) is imported: a made_at that is no
    # time imgbatch writes, or one far in the future, must not head the file as its updated_at
    # (it was the newest by string order, and stayed so for good).
    assert run("apply", example_manifest, *FAST).exit_code == 0
    path = results_file(example_manifest)
    document = json.loads(path.read_text(encoding="utf-8"))
    document["shots"][0]["made_at"] = stamp
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")

    def reprompt(doc: dict[str, Any]) -> None:
        doc["shots"][2]["prompt"] += ", seen from above"

    edit_manifest(example_manifest, reprompt)
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    after = json.loads(path.read_text(encoding="utf-8"))
    assert after["updated_at"] == after["shots"][2]["made_at"]
    assert after["updated_at"] != stamp


def test_plan_detailed_exitcode_words_an_error_as_every_command_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own echo of the error skipped the boundary's: a shot list that is a link to the .env
    # beside it printed the API key it quotes (every other command shows ***), and named the
    # file "the manifest".
    key = "sk-detailedexitcode0123456789"
    monkeypatch.setenv("DASHSCOPE_API_KEY", key)
    (tmp_path / ".env").write_text(f"DASHSCOPE_API_KEY={key}\n")
    (tmp_path / "shots.yaml").symlink_to(tmp_path / ".env")
    plain = run("plan", tmp_path / "shots.yaml")
    detailed = run("plan", tmp_path / "shots.yaml", "--detailed-exitcode")
    assert (plain.exit_code, detailed.exit_code) == (2, 1)
    assert key not in detailed.output and "***" in detailed.stderr
    assert detailed.stderr == plain.stderr
