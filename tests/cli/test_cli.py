"""The `imgbatch` command end to end, through click's CliRunner, against the fake DashScope server.

Takes: the repository's example manifest (copied into tmp_path) and the fake server started by the
`fake_server` fixture; `api_env` points DASHSCOPE_HTTP_BASE_URL at it *after* imgbatch was
imported, so every test here also checks that the base URL is read at call time.
Gives: evidence for the exit codes, messages, files and results.json the README promises, and for
the cache: a repeated, reverted or renamed shot never costs a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from PIL import Image

from imgbatch.cli.main import main
from imgbatch.pacing.learned import QuotaStore
from tests.support.fake_dashscope import GENERATION_PATH, FakeDashScope
from tests.support.files import FAKE_KEY, write_manifest, write_many_shots
from tests.support.virtual_time import VirtualServer

# The example pins limits.rps: 2; tests lift it so eight shots take milliseconds, not seconds.
FAST = ("--rps", "500")
WRONG_KEY = "sk-wrong-key-fedcba9876543210"
NO_KEY_HINTS = ("DASHSCOPE_API_KEY", "~/.alibabacloud/credentials")


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_clean(result: Result) -> None:
    """A handled outcome: no traceback, no exception escaped the error boundary."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def load_doc(manifest: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    return doc


def edit_manifest(manifest: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = load_doc(manifest)
    change(doc)
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def output_dir(manifest: Path) -> Path:
    doc = load_doc(manifest)
    return (manifest.parent / doc["output"]["dir"]).resolve()


def results(manifest: Path, base: Path | None = None) -> dict[str, Any]:
    folder = base if base is not None else output_dir(manifest)
    document: dict[str, Any] = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    return document


def by_id(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in document["shots"]}


def expected_shots(manifest: Path) -> dict[str, dict[str, Any]]:
    """Each shot's merged fields, computed here from the YAML, independently of imgbatch."""
    doc = load_doc(manifest)
    defaults = doc.get("defaults", {})
    return {shot["id"]: {**defaults, **shot} for shot in doc["shots"]}


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan_rows(result: Result) -> dict[str, tuple[str, str]]:
    """`plan` table rows: shot id -> (action, why)."""
    rows = {}
    lines = result.stdout.splitlines()
    for line in lines[1:] if lines and lines[0].startswith("shot ") else []:
        parts = line.split(None, 2)
        if (
            len(parts) >= 2
            and not line.startswith(("Plan:", "Estimated cost:"))
            and "not listed" not in line
        ):
            rows[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return rows


def plan_line(result: Result) -> str:
    """The plan's summary line (`Plan: ...`); the estimated cost follows it."""
    return next(line for line in result.stdout.splitlines() if line.startswith("Plan:"))


def no_key_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(home))


def write_credentials(home: Path, key: str) -> None:
    folder = home / ".alibabacloud"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "credentials").write_text(f"[default]\ndashscope_api_key = {key}\n", encoding="utf-8")


def bearers(server: FakeDashScope) -> set[str | None]:
    return {r.headers.get("authorization") for r in server.requests}


# ----- validate and plan --------------------------------------------------------------------------


def test_validate_accepts_the_example(example_manifest: Path) -> None:
    result = run("validate", example_manifest)
    assert result.exit_code == 0, result.output
    count = len(expected_shots(example_manifest))
    assert result.stdout.strip() == f"{example_manifest}: valid, {count} shots"


def test_validate_reports_every_problem_with_its_location(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path,
        "version: 1\n"
        "name: bad\n"
        "shots:\n"
        "  - id: one\n"
        "    prompt: a red bicycle\n"
        '    size: "1000*1000"\n'
        "  - id: two\n"
        "    prompt: a blue bicycle\n"
        "    seed: -3\n",
    )
    result = run("validate", manifest)
    assert result.exit_code == 2
    assert_clean(result)
    assert result.stdout == ""
    assert "2 problems" in result.stderr
    # file:line:col of the offending value, the shot and the field.
    assert re.search(rf"{re.escape(str(manifest))}:6:\d+: shot one, field size:", result.stderr)
    assert re.search(rf"{re.escape(str(manifest))}:9:\d+: shot two, field seed:", result.stderr)


def test_validate_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = write_manifest(tmp_path, "version: 1\nname: x\nshots: [\n")
    result = run("validate", broken)
    assert result.exit_code == 2
    assert_clean(result)
    assert re.search(rf"{re.escape(str(broken))}:\d+:\d+: YAML:", result.stderr)

    missing = tmp_path / "nope.yaml"
    result = run("validate", missing)
    assert result.exit_code == 2
    assert_clean(result)
    assert f"{missing}: file: no such file" in result.stderr


def test_plan_lists_every_shot_and_counts_paid_requests(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    result = run("plan", example_manifest)
    assert result.exit_code == 0, result.output
    shots = expected_shots(example_manifest)
    rows = plan_rows(result)
    assert rows == {shot_id: ("create", "new shot") for shot_id in shots}
    assert plan_line(result) == f"Plan: {len(shots)} create. {len(shots)} paid requests."
    # A plan sends nothing and writes nothing.
    assert fake_server.requests == []
    assert not output_dir(example_manifest).exists()


# ----- apply: generate, then cache ----------------------------------------------------------------


def test_apply_generates_every_shot_then_a_second_apply_sends_nothing(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    shots = expected_shots(example_manifest)
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert_clean(result)
    assert fake_server.generation_count == len(shots)
    assert fake_server.successes == len(shots)
    # DASHSCOPE_HTTP_BASE_URL was set after `import imgbatch`: the requests reached the fake.
    assert {(r.method, r.path) for r in fake_server.requests} == {("POST", GENERATION_PATH)}
    assert bearers(fake_server) == {f"Bearer {FAKE_KEY}"}
    assert f"{len(shots)} generated, 0 cached, 0 failed" in result.stdout

    out = output_dir(example_manifest)
    document = results(example_manifest)
    assert document["provider"] == "dashscope"
    assert document["summary"] == {
        "shots": len(shots),
        "generated": len(shots),
        "cached": 0,
        "failed": 0,
    }
    assert [entry["id"] for entry in document["shots"]] == list(shots)
    urls = set()
    for entry in document["shots"]:
        spec = shots[entry["id"]]
        width, height = (int(n) for n in spec["size"].split("*"))
        assert entry["status"] == "generated"
        assert entry["file"] == f"{entry['id']}.png"
        assert png_size(out / entry["file"]) == (width, height)
        assert re.fullmatch(r"[0-9a-f]{64}", entry["key"])
        assert (entry["width"], entry["height"]) == (width, height)
        assert entry["seed"] == spec["seed"]
        assert entry["model"] == spec["model"]
        assert entry["size"] == spec["size"]
        assert entry["prompt"] == spec["prompt"]
        assert entry["image_url"].startswith(fake_server.image_base_url + "/results/")
        assert "Signature=" in entry["image_url"]
        assert isinstance(entry["request_id"], str) and entry["request_id"]
        assert entry["error"] is None
        assert entry["sha256"] == sha256(out / entry["file"])
        urls.add(entry["image_url"])
    assert len(urls) == len(shots)
    assert len(fake_server.downloads) == len(shots)

    before = fake_server.generation_count
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == before  # zero requests
    assert len(fake_server.downloads) == len(shots)  # and zero downloads
    assert (
        f"0 generated, 0 cached, 0 failed, {len(shots)} unchanged; 0 requests sent, "
        "0 images billed" in result.stdout
    )
    again = results(example_manifest)
    # results.json describes the images, not the run: every entry is kept as it was.
    assert again == document
    assert {entry["status"] for entry in again["shots"]} == {"generated"}

    result = run("plan", example_manifest)
    assert result.exit_code == 0
    # Nothing to do: one line for the unchanged shots, as Terraform does; -v lists them.
    assert result.stdout.splitlines() == [
        f"{len(shots)} unchanged shots not listed (plan -v lists them)",
        f"Plan: {len(shots)} unchanged. 0 paid requests.",
    ]
    result = run("plan", "-v", example_manifest)
    assert result.exit_code == 0
    assert plan_rows(result) == {shot_id: ("unchanged", "image matches") for shot_id in shots}
    assert plan_line(result).endswith("0 paid requests.")


def test_edit_costs_one_request_revert_and_rename_cost_none(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    original_text = example_manifest.read_text(encoding="utf-8")
    shots = list(expected_shots(example_manifest))
    edited, renamed = shots[2], shots[3]
    assert run("apply", example_manifest, *FAST).exit_code == 0
    out = output_dir(example_manifest)
    original_hash = sha256(out / f"{edited}.png")
    count = fake_server.generation_count

    def reprompt(doc: dict[str, Any]) -> None:
        doc["shots"][2]["prompt"] += ", seen from above"

    edit_manifest(example_manifest, reprompt)
    plan = run("plan", example_manifest)
    # Only the shot with something to do is listed, then a line for the others.
    assert plan_rows(plan) == {edited: ("replace", "changed: text")}
    assert plan.stdout.splitlines()[-3:-1] == [
        f"{len(shots) - 1} unchanged shots not listed (plan -v lists them)",
        f"Plan: 1 replace, {len(shots) - 1} unchanged. 1 paid request.",
    ]
    assert plan.stdout.splitlines()[-1].startswith("Estimated cost: unknown")
    rows = plan_rows(run("-v", "plan", example_manifest))  # -v on the group works too
    assert rows[edited] == ("replace", "changed: text")
    assert all(action == "unchanged" for shot_id, (action, _) in rows.items() if shot_id != edited)
    assert len(rows) == len(shots)
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == count + 1
    assert by_id(results(example_manifest))[edited]["status"] == "generated"
    assert sha256(out / f"{edited}.png") != original_hash
    count = fake_server.generation_count

    # Reverting the edit restores the first image from the cache: no request.
    example_manifest.write_text(original_text, encoding="utf-8")
    rows = plan_rows(run("plan", example_manifest))
    assert rows[edited][0] == "restore"
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == count
    assert sha256(out / f"{edited}.png") == original_hash
    assert by_id(results(example_manifest))[edited]["status"] == "cached"

    # Renaming a shot is the same request under another id: restored, and the old id an orphan.
    new_id = f"{renamed}-renamed"

    def rename(doc: dict[str, Any]) -> None:
        doc["shots"][3]["id"] = new_id

    edit_manifest(example_manifest, rename)
    rows = plan_rows(run("plan", example_manifest))
    assert rows[new_id][0] == "restore"
    assert rows[renamed][0] == "orphan"
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == count
    document = results(example_manifest)
    assert by_id(document)[new_id]["status"] == "cached"
    assert sha256(out / f"{new_id}.png") == sha256(out / f"{renamed}.png")
    assert [entry["id"] for entry in document["orphans"]] == [renamed]
    assert (out / f"{renamed}.png").is_file()  # an orphan's file is kept


# ----- apply: failures ----------------------------------------------------------------------------


def test_moderation_400_fails_that_shot_only_and_is_retried_next_time(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    shots = list(expected_shots(example_manifest))
    flagged = shots[1]

    def flag(doc: dict[str, Any]) -> None:
        doc["shots"][1]["prompt"] = "a FORBIDDEN scene"

    edit_manifest(example_manifest, flag)
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 1
    assert_clean(result)
    assert fake_server.generation_count == len(shots)
    entries = by_id(results(example_manifest))
    entry = entries[flagged]
    assert entry["status"] == "failed"
    assert entry["file"] is None
    assert entry["error"] == (
        "400 DataInspectionFailed: Input data may contain inappropriate content."
    )
    assert entry["error_code"] == "DataInspectionFailed"
    assert entry["request_id"]
    assert not (output_dir(example_manifest) / f"{flagged}.png").exists()
    assert {e["status"] for shot_id, e in entries.items() if shot_id != flagged} == {"generated"}
    assert f"failed {flagged}: 400 DataInspectionFailed" in result.stderr
    assert "1 failed" in result.stdout

    rows = plan_rows(run("plan", example_manifest))
    assert rows[flagged][0] == "create"
    assert rows[flagged][1].startswith("failed last time: 400 DataInspectionFailed")
    count = fake_server.generation_count
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 1  # still flagged, but only that shot was sent again
    assert fake_server.generation_count == count + 1
    assert fake_server.requests[-1].body["input"]["messages"][0]["content"] == [
        {"text": "a FORBIDDEN scene"}
    ]


def test_invalid_parameter_400_then_the_next_apply_retries_only_that_shot(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    shots = list(expected_shots(example_manifest))
    fake_server.enqueue_error(400, "InvalidParameter", "The size is not supported.")
    result = run("apply", example_manifest, *FAST, "--concurrency", "1")
    assert result.exit_code == 1
    assert_clean(result)
    entries = by_id(results(example_manifest))
    failed = [shot_id for shot_id, entry in entries.items() if entry["status"] == "failed"]
    assert failed == [shots[0]]  # one worker takes the shots in manifest order
    assert entries[shots[0]]["error"] == "400 InvalidParameter: The size is not supported."
    assert entries[shots[0]]["error_code"] == "InvalidParameter"
    assert sum(entry["status"] == "generated" for entry in entries.values()) == len(shots) - 1
    assert fake_server.generation_count == len(shots)  # a 400 is not retried within the run

    count = fake_server.generation_count
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == count + 1
    entries = by_id(results(example_manifest))
    assert entries[shots[0]]["status"] == "generated"
    assert entries[shots[0]]["error"] is None
    assert {entries[s]["status"] for s in shots[1:]} == {"generated"}  # kept as they were


def test_401_stops_the_run_and_names_the_key_source_not_the_key(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    shots = list(expected_shots(example_manifest))
    fake_server.enqueue_error(401, "InvalidApiKey", "Invalid API-key provided.")
    result = run("apply", example_manifest, *FAST, "--concurrency", "1")
    assert result.exit_code == 1
    assert_clean(result)
    assert fake_server.generation_count == 1  # nothing sent after the 401
    assert "DASHSCOPE_API_KEY" in result.output
    assert "Stopped: the service refused the credentials" in result.stdout
    assert FAKE_KEY not in result.output

    document = results(example_manifest)
    # The refused key is the run's stop reason, not a shot's outcome: the shot it answered is
    # not run, like those never sent; none had an entry, so none has one now.
    assert by_id(document) == {}
    assert f"{len(shots)} not run" in result.stdout
    assert FAKE_KEY not in json.dumps(document)
    assert document["summary"]["failed"] == 0


# ----- credentials and providers ------------------------------------------------------------------


def test_missing_key_exits_2_and_says_where_a_key_goes(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    no_key_env(monkeypatch, tmp_path / "empty-home")
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 2
    assert_clean(result)
    for hint in NO_KEY_HINTS:
        assert hint in result.stderr
    assert "--provider placeholder" in result.stderr
    assert fake_server.requests == []
    assert not output_dir(example_manifest).exists()  # nothing written either


def test_key_from_the_credentials_file(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    home = tmp_path / "cred-home"
    no_key_env(monkeypatch, home)
    write_credentials(home, FAKE_KEY)
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert fake_server.successes == len(expected_shots(example_manifest))
    assert bearers(fake_server) == {f"Bearer {FAKE_KEY}"}


def test_environment_key_wins_over_the_credentials_file(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = Path(api_env["HOME"])
    write_credentials(home, WRONG_KEY)
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert bearers(fake_server) == {f"Bearer {FAKE_KEY}"}

    # The other way round: a wrong key in the environment is used (and refused), the good key in
    # the file is not a fallback.
    fake_server.reset()
    write_credentials(home, FAKE_KEY)
    monkeypatch.setenv("DASHSCOPE_API_KEY", WRONG_KEY)

    def reprompt(doc: dict[str, Any]) -> None:
        doc["shots"][0]["prompt"] += " (take two)"

    edit_manifest(example_manifest, reprompt)
    result = run("apply", example_manifest, *FAST, "--concurrency", "1")
    assert result.exit_code == 1
    assert bearers(fake_server) == {f"Bearer {WRONG_KEY}"}
    assert fake_server.generation_count == 1
    assert "DASHSCOPE_API_KEY environment variable" in result.output
    assert WRONG_KEY not in result.output


def test_placeholder_provider_needs_no_key(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    no_key_env(monkeypatch, tmp_path / "empty-home")
    result = run("apply", example_manifest, "--provider", "placeholder")
    assert result.exit_code == 0, result.output
    assert "offline placeholder provider" in result.stderr
    assert fake_server.requests == []
    document = results(example_manifest)
    assert document["provider"] == "placeholder"
    out = output_dir(example_manifest)
    for shot_id, spec in expected_shots(example_manifest).items():
        width, height = (int(n) for n in spec["size"].split("*"))
        assert png_size(out / f"{shot_id}.png") == (width, height)
        assert by_id(document)[shot_id]["status"] == "generated"


def test_auto_provider_falls_back_to_placeholder_without_a_key(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    no_key_env(monkeypatch, tmp_path / "empty-home")
    plan = run("plan", example_manifest, "--provider", "auto")
    assert plan.exit_code == 0
    result = run("apply", example_manifest, "--provider", "auto")
    assert result.exit_code == 0, result.output
    assert (
        "No DashScope API key is configured, so --provider auto uses the offline placeholder "
        "provider" in result.stderr
    )
    assert fake_server.requests == []
    assert results(example_manifest)["provider"] == "placeholder"


def test_auto_provider_uses_dashscope_when_a_key_is_set(
    api_env: dict[str, str], fake_server: FakeDashScope, example_manifest: Path
) -> None:
    result = run("apply", example_manifest, *FAST, "--provider", "auto")
    assert result.exit_code == 0, result.output
    assert "placeholder" not in result.stderr
    assert fake_server.successes == len(expected_shots(example_manifest))
    assert results(example_manifest)["provider"] == "dashscope"


# ----- output folder and options ------------------------------------------------------------------


def test_output_dir_environment_variable_replaces_the_base(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    base = tmp_path / "elsewhere"
    monkeypatch.setenv("OUTPUT_DIR", str(base))
    result = run("apply", example_manifest, *FAST)
    assert result.exit_code == 0, result.output
    folder = base / load_doc(example_manifest)["name"]
    document = results(example_manifest, folder)
    assert document["summary"]["generated"] == len(expected_shots(example_manifest))
    for entry in document["shots"]:
        assert (folder / entry["file"]).is_file()
    assert str(folder / "results.json") in result.stdout
    assert not output_dir(example_manifest).exists()


@pytest.mark.parametrize(
    "options",
    [
        ("--rps", "0"),
        ("--rps", "-1"),
        ("--rps", "fast"),
        ("--quota", "2/fortnight"),
        ("--quota", "0/60s"),
        ("--concurrency", "0"),
        ("--provider", "midjourney"),
        ("--no-such-flag",),
    ],
)
def test_usage_errors_exit_2_and_send_nothing(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    example_manifest: Path,
    options: tuple[str, ...],
) -> None:
    result = run("apply", example_manifest, *options)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "Usage:" in result.stderr
    assert fake_server.requests == []
    assert not output_dir(example_manifest).exists()


@contextmanager
def on_virtual_time(
    server: FakeDashScope, monkeypatch: pytest.MonkeyPatch, home: Path
) -> Iterator[VirtualServer]:
    """The commands run in the block talk to `server` with its key (HOME at `home`), on
    virtual time: the server in each command's own event loop (its `asyncio.run`)."""
    with VirtualServer(server) as virtual, monkeypatch.context() as patch:
        patch.setattr(asyncio, "run", virtual.run)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("DASHSCOPE_API_KEY", FAKE_KEY)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", server.base_url)
        monkeypatch.delenv("OUTPUT_DIR", raising=False)
        yield virtual


def test_with_no_quota_apply_finds_it_says_so_and_remembers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    """What the pacer settles on for a short run is its own decision (tests/unit/test_pacing.py
    simulates it): here, that a quota is found from the 429s, no faster than the account's and
    a fair share of it, said with the pace it found, and remembered as that pace. (16 shots
    settle on 3.15/s: at the first 429 a bucket of 3.1 to 3.5/s and 5 per 1 s both fit, and
    the 429 that would tell them apart is beyond a 16-shot run's budget; bench/README.md,
    "5 per 1 s, quota unknown". Later runs, with the credit the account's runs saved up, do
    tell them apart: the next test.)"""
    manifest = write_many_shots(tmp_path, "quota", 16)
    # What is found comes from when the 429s came: on virtual time, the server in the command's
    # own event loop (its asyncio.run), so a loaded machine's late wake-ups cannot change it.
    server = FakeDashScope(api_key=FAKE_KEY, quota_window=(5, 1.0), image_profile="tiny")
    with on_virtual_time(server, monkeypatch, tmp_path):
        result = run("apply", manifest)
        throttled = server.status_counts[429]

    assert_clean(result)
    assert result.exit_code == 0, result.output
    assert throttled >= 1  # the ramp did reach the quota
    (remembered,) = QuotaStore(user_cache / "imgbatch" / "quotas.json").remembered()
    found = remembered.learned.window
    assert remembered.source == "probed" and found is not None
    assert 0.5 * 5 <= found.rate <= 5  # within the server's 5 a second, and most of it
    # Said as the pace remembered: a spacing as a rate, a window as its count and period.
    if found.count == 1 and found.period < 1:
        pace = f"{1 / found.period:.3g} requests a second, evenly spaced"
    else:
        pace = f"{found.count} requests per {found.period:g} s"
    assert (
        f"Quota for qwen-image-max: {pace} (found from the 429s); remembered for the next run "
        "(--quota overrides it)." in result.stdout
    ), result.stdout
    assert f"{throttled} throttled (429)" in result.stdout


def test_a_series_of_short_runs_finds_the_quota_no_single_one_can_afford(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    """The test above's account in five 16-shot runs: the quota the first remembered (a bucket's
    rate, under the account's) is where the next starts, never a ceiling; the credit the runs
    save up in quotas.json pays for the 429s that test it upward, and `quota show` says it."""
    server = FakeDashScope(api_key=FAKE_KEY, quota_window=(5, 1.0), image_profile="tiny")
    with on_virtual_time(server, monkeypatch, tmp_path) as virtual:
        for index in range(5):
            folder = tmp_path / f"run{index}"
            folder.mkdir()
            result = run("apply", write_many_shots(folder, "quota", 16))
            assert result.exit_code == 0, result.output
            virtual.run(asyncio.sleep(1.1))  # (this run's requests leave the window)
        shown = run("quota", "show")

    assert_clean(shown)
    (remembered,) = QuotaStore(user_cache / "imgbatch" / "quotas.json").remembered()
    found = remembered.learned.window
    assert found is not None and found.count == 5 and 1.0 <= found.period <= 1.05
    assert f"probe credit: {remembered.learned.credit:g} 429s" in shown.output
    # Every run within 5% of what it sent and the credit it was handed (0 at the start).
    assert server.status_counts[429] <= 0.05 * server.generation_count + 1  # (+1: the first run's)


def test_a_quota_given_on_the_command_line_is_used_and_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_many_shots(tmp_path, "given", 6)
    # The server's own window, given exactly: on virtual time (the server in the command's event
    # loop), no late wake-up of a loaded machine can bunch two windows' requests into one.
    server = FakeDashScope(api_key=FAKE_KEY, quota_window=(3, 1.0), image_profile="tiny")
    with on_virtual_time(server, monkeypatch, tmp_path):
        result = run("apply", manifest, "--quota", "3/1s")
        throttled = server.status_counts[429]
    assert result.exit_code == 0, result.output
    assert throttled == 0
    assert "Quota for qwen-image-max: 3 requests per 1 s (as given)." in result.stdout


def test_a_shard_with_no_shot_says_so(tmp_path: Path) -> None:
    # One shot falls in one shard of two; the other shard's apply said "Plan: ."
    manifest = write_many_shots(tmp_path, "one", 1)
    summaries = []
    for shard in ("1/2", "2/2"):
        result = run("apply", manifest, "--provider", "placeholder", "--shard", shard)
        assert result.exit_code == 0, result.output
        summaries += [line for line in result.output.splitlines() if line.startswith("Plan:")]
    assert "Plan: ." not in summaries
    assert summaries.count("Plan: no shot in this run. 0 offline requests.") == 1, summaries
