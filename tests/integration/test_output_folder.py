"""The output folder's one owner: its state record, results.json rendered from it, who owns it.

Takes: `imgbatch apply` and `plan` through click's CliRunner on real folders (the placeholder
provider, or the fake DashScope server where the service's answers matter), and the source tree.
Gives: evidence that only `state/` knows the folder's layout, that the state record (not
results.json) decides the next plan, that a folder made by the previous version is imported
without losing anything, that a second manifest is refused (and, forced, kept apart), and that a
run stopped by a wrong key never writes its stop reason over a shot's real error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imgbatch.cli.main import main
from imgbatch.errors import FolderOwnedError
from imgbatch.run.apply import apply, make_plan
from imgbatch.state import folder as folder_module
from imgbatch.state import results as results_module
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY

SRC = Path(__file__).resolve().parents[2] / "src" / "imgbatch"
STATE = ".imgbatch"
# The folder's name as a name (a path part or a string), not `.imgbatch-` temporary files or
# `window.imgbatchSheet`.
SPELLED = re.compile(r"(?<![\w.])\.imgbatch(?![\w-])")


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, [str(arg) for arg in args], env=env)
    assert "Traceback" not in result.output, result.output
    return result


def write_shots(
    folder: Path, prompts: dict[str, str], *, name: str, file: str | None = None, extra: str = ""
) -> Path:
    lines = [f"version: 1\nname: {name}\nprovider: placeholder", *extra.splitlines(), "shots:"]
    for shot_id, prompt in prompts.items():
        lines += [f"  - id: {shot_id}", f'    prompt: "{prompt}"', '    size: "1328*1328"']
    path = folder / (file or f"{name}.yaml")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def results(out: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return document


def files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.png"))}


# ----- one owner: nothing else spells the folder's name -------------------------------------------


def test_nothing_outside_state_spells_the_state_folder() -> None:
    spelled = [
        f"{path.relative_to(SRC)}:{number}"
        for path in sorted(SRC.rglob("*"))
        if path.is_file() and path.suffix != ".pyc" and "state" not in path.relative_to(SRC).parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if SPELLED.search(line)
    ]
    assert spelled == [], (
        f"only imgbatch.state may know where the folder keeps its state: {spelled}"
    )


# ----- the state record decides; results.json is rendered from it ---------------------------------


def test_the_plan_decides_from_the_state_record_never_reading_results_json_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_shots(tmp_path, {"s1": "a red kite", "s2": "a blue kite"}, name="kites")
    out = tmp_path / "output" / "kites"
    assert run("apply", manifest).exit_code == 0
    record = json.loads((out / STATE / "state.json").read_text(encoding="utf-8"))
    assert record["owner"] == {"manifest": "../../kites.yaml", "name": "kites"}
    entry = {item["id"]: item for item in record["entries"]}["s1"]
    assert {"key", "status", "bytes", "sha256", "image_url", "request"} <= set(entry)
    assert [item["id"] for item in results(out)["shots"]] == ["s1", "s2"]

    def never(path: Path) -> None:
        raise AssertionError(f"{path} was read back")

    monkeypatch.setattr(results_module, "read_entry_document", never)
    before = (out / "results.json").read_bytes()
    assert [item.action for item in make_plan(manifest).shots] == ["unchanged", "unchanged"]
    again = run("apply", manifest)
    assert again.exit_code == 0, again.output
    assert "2 unchanged" in again.output
    assert (out / "results.json").read_bytes() == before


def test_a_no_op_apply_knows_results_json_is_unchanged_without_rendering_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record says what it rendered results.json from (its head's digest) and `load` saw
    the file it rendered: a no-op apply writes and even renders nothing (rendering 100,000
    entries to compare them with the file was a fifth of such an apply). A file deleted since
    is still put back as it was."""
    prompts = {"s1": "a red kite", "s2": "a blue kite", "s3": "a green kite"}
    manifest = write_shots(tmp_path, prompts, name="kites")
    out = tmp_path / "output" / "kites"
    assert run("apply", manifest).exit_code == 0
    rendered: list[int] = []
    real = folder_module.render_results

    def counted(*args: Any) -> Any:
        rendered.append(len(args[0]))
        return real(*args)

    monkeypatch.setattr(folder_module, "render_results", counted)
    paths = (out / "results.json", out / STATE / "state.json")
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in paths]
    again = run("apply", manifest)
    assert again.exit_code == 0 and "3 unchanged" in again.output, again.output
    assert rendered == []
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in paths] == before

    # Deleted since: rendered again to see, and put back as it was.
    (out / "results.json").unlink()
    assert run("apply", manifest).exit_code == 0
    assert rendered == [3, 3]  # once to compare, once to write
    assert (out / "results.json").read_bytes() == before[0][0]


def test_a_results_json_changed_since_it_was_rendered_is_taken_as_the_state(
    tmp_path: Path,
) -> None:
    """A `git pull` brings a teammate's results.json (and images): it is what the folder now
    holds, so it wins over this machine's older record and nothing is paid again."""
    manifest = write_shots(tmp_path, {"s1": "a red kite"}, name="kites")
    out = tmp_path / "output" / "kites"
    assert run("apply", manifest).exit_code == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "kites.yaml").write_text(manifest.read_text().replace("red", "green"))
    assert run("apply", theirs / "kites.yaml").exit_code == 0
    # What the pull brings: their manifest, results.json and image over ours.
    manifest.write_text((theirs / "kites.yaml").read_text())
    for name in ("results.json", "s1.png"):
        (out / name).write_bytes((theirs / "output" / "kites" / name).read_bytes())

    assert [item.action for item in make_plan(manifest).shots] == ["unchanged"]


def test_a_folder_of_the_previous_version_is_imported_once_and_its_results_kept_as_they_are(
    tmp_path: Path,
) -> None:
    manifest = write_shots(tmp_path, {"s1": "a red kite", "s2": "a blue kite"}, name="kites")
    out = tmp_path / "output" / "kites"
    assert run("apply", manifest).exit_code == 0
    (out / STATE / "state.json").unlink()  # as the previous version left it: no state record
    os.utime(out / "results.json", ns=(1_000_000_000, 1_000_000_000))
    before = (out / "results.json").read_bytes()

    again = run("apply", manifest)

    assert again.exit_code == 0, again.output
    assert "0 generated, 0 cached, 0 failed, 2 unchanged" in again.output
    assert (out / "results.json").read_bytes() == before
    assert (out / "results.json").stat().st_mtime_ns == 1_000_000_000  # not even rewritten
    record = json.loads((out / STATE / "state.json").read_text(encoding="utf-8"))
    assert [item["id"] for item in record["entries"]] == ["s1", "s2"]
    # The owner its results.json named, with the name it did not record filled in.
    assert record["owner"] == {"manifest": "../../kites.yaml", "name": "kites"}
    assert record["results"]["updated_at"] == results(out)["updated_at"]


# ----- the folder records which manifest owns it --------------------------------------------------


def test_a_second_manifest_with_the_same_name_is_refused_naming_both(tmp_path: Path) -> None:
    first = write_shots(tmp_path, {"a1": "a red kite"}, name="kites", file="first.yaml")
    second = write_shots(tmp_path, {"b1": "a blue kite"}, name="kites", file="second.yaml")
    out = tmp_path / "output" / "kites"
    assert run("apply", first).exit_code == 0
    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}

    for command in ("plan", "apply"):
        refused = run(command, second)
        assert refused.exit_code == 2, refused.output
        message = " ".join(refused.stderr.split())
        assert f"{out.relative_to(tmp_path)} is the output folder of" in message or str(out) in (
            message
        )
        assert "first.yaml (name: kites)" in message
        assert f"{second} (name: kites) would share it" in message
        assert "--force" in message and "nothing was sent or written" in message
    after = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    assert after == before
    with pytest.raises(FolderOwnedError):
        apply(second)


def test_a_second_manifest_with_the_same_output_dir_is_refused(tmp_path: Path) -> None:
    shared = "output:\n  dir: output/shared"
    one = write_shots(tmp_path, {"a1": "a red kite"}, name="one", extra=shared)
    two = write_shots(tmp_path, {"b1": "a blue kite"}, name="two", extra=shared)
    assert run("apply", one).exit_code == 0
    refused = run("apply", two)
    assert refused.exit_code == 2
    assert "one.yaml (name: one)" in refused.stderr and "(name: two)" in refused.stderr
    # A distinct folder is the other way out.
    three = write_shots(tmp_path, {"c1": "a kite"}, name="three")
    assert run("apply", three).exit_code == 0


def test_forced_manifests_share_a_folder_apart_and_prune_never_takes_the_other_s_images(
    tmp_path: Path,
) -> None:
    first = write_shots(tmp_path, {"a1": "a red kite", "a2": "a kite"}, name="kites", file="a.yaml")
    second = write_shots(tmp_path, {"b1": "a blue kite"}, name="kites", file="b.yaml")
    out = tmp_path / "output" / "kites"
    assert run("apply", first).exit_code == 0
    theirs = {name: data for name, data in files(out).items() if name.startswith("a")}

    forced = run("apply", second, "--force")
    assert forced.exit_code == 0, forced.output
    assert "orphan" not in forced.output  # the first manifest's shots are not its orphans
    assert set(files(out)) == {"a1.png", "a2.png", "b1.png"}

    # The second manifest drops b1 and prunes: b1 goes, the first manifest's images stay.
    write_shots(tmp_path, {"b2": "a green kite"}, name="kites", file="b.yaml")
    plan = run("plan", second, "--force", "-v")
    assert "a1" not in plan.stdout and "a2" not in plan.stdout
    pruned = run("apply", second, "--force", "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert "b1.png" in pruned.output
    assert {name: files(out)[name] for name in theirs} == theirs
    assert "b1.png" not in files(out)

    # And the other way round: the owner drops a2 and prunes; the second manifest's b2 stays.
    write_shots(tmp_path, {"a1": "a red kite"}, name="kites", file="a.yaml")
    mine = run("apply", first, "--prune")
    assert mine.exit_code == 0, mine.output
    assert set(files(out)) == {"a1.png", "b2.png"}
    assert run("apply", second).exit_code == 2  # still the first manifest's folder
    again = run("apply", second, "--force")
    assert again.exit_code == 0 and "1 unchanged" in again.output, again.output


# ----- a stopped run never overwrites a shot's earlier error --------------------------------------


def test_a_run_stopped_by_a_wrong_key_keeps_the_shot_s_real_earlier_error(
    tmp_path: Path, fake_server: FakeDashScope
) -> None:
    manifest = write_shots(
        tmp_path, {"s1": "a FORBIDDEN kite", "s2": "a red kite"}, name="kites"
    ).read_text()
    path = tmp_path / "kites.yaml"
    path.write_text(manifest.replace("provider: placeholder", "provider: dashscope"))
    out = tmp_path / "output" / "kites"
    env = {
        "HOME": str(tmp_path),
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": fake_server.base_url,
    }
    first = run("apply", path, "--concurrency", "1", env=env)
    assert first.exit_code == 1, first.output
    moderated = {item["id"]: item for item in results(out)["shots"]}["s1"]
    assert moderated["error"].startswith("400 DataInspectionFailed")
    before = (out / "results.json").read_bytes()

    wrong = run(
        "apply", path, "--concurrency", "1", env={**env, "DASHSCOPE_API_KEY": "sk-wrong-key-1"}
    )

    assert wrong.exit_code == 1, wrong.output
    assert "Stopped: the service refused the credentials" in wrong.stdout
    assert fake_server.status_counts[401] == 1  # the one request sent was refused
    kept = {item["id"]: item for item in results(out)["shots"]}["s1"]
    assert kept == moderated
    assert (out / "results.json").read_bytes() == before
    plan = run("plan", path, env=env)
    assert re.search(r"s1\s+create\s+failed last time: 400 DataInspectionFailed", plan.stdout), (
        plan.stdout
    )
    assert "InvalidApiKey" not in plan.stdout
