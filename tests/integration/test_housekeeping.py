"""Housekeeping: `imgbatch gc` and `apply --prune`, end to end through the command line.

Takes: shot lists applied with the offline placeholder provider (no request is paid, but the
cache, thumbnails, results and last-run record are the real ones), then edited, renamed or
shortened.
Gives: proof that gc lists exactly what no results refer to (a replaced image the contact sheet no
longer shows, its thumbnail, a killed run's temporary file, an image of imgbatch's that nothing
names), keeps everything else (current and orphaned shots, the previous image of the last change,
a user's own files), deletes only with --yes and never beside a running apply; and that
`apply --prune` removes orphaned shots' files that are still as imgbatch wrote them, keeps a
retouched one, drops their entries and never touches the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image, PngImagePlugin

from imgbatch.cli.main import main
from imgbatch.housekeeping import gc
from imgbatch.housekeeping.prune import prune_orphans
from imgbatch.state.cache import TEMP_PREFIX
from imgbatch.state.folder import STATE_DIR, OutputFolder
from imgbatch.state.last_run import thumb_path
from imgbatch.state.results import ResultEntry

NAME = "harbour"


def run(*args: str | Path) -> Result:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    return result


def apply(manifest: Path, *extra: str) -> Result:
    result = run("apply", manifest, "--provider", "placeholder", *extra)
    assert result.exit_code == 0, result.output
    return result


def write_shots(
    folder: Path, prompts: dict[str, str], *, name: str = NAME, extra: str = ""
) -> Path:
    lines = ["version: 1", f"name: {name}", "provider: placeholder", *extra.splitlines(), "shots:"]
    for shot_id, prompt in prompts.items():
        lines += [f"  - id: {shot_id}", f'    prompt: "{prompt}"']
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name != "lock"
    }


def keys(out: Path) -> dict[str, str]:
    return {shot_id: entry.key for shot_id, entry in OutputFolder(out).load().entries.items()}


def listed(result: Result) -> list[str]:
    """The paths a gc run listed, as printed (before the size)."""
    return sorted(line.split("  ")[0] for line in result.stdout.splitlines() if "  " in line)


PROMPTS = {"s1": "a harbour at dawn", "s2": "a harbour at noon", "s3": "a harbour at dusk"}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    return tmp_path


# --- gc ---------------------------------------------------------------------------------------


def test_gc_lists_what_no_results_refer_to_and_deletes_it_only_with_yes(project: Path) -> None:
    manifest = write_shots(project, PROMPTS)
    out = project / "output" / NAME
    apply(manifest)
    first = keys(out)
    apply(write_shots(project, {**PROMPTS, "s1": "a harbour at dawn, in fog"}))
    # The last apply changed s2 only: s2's previous image is what the sheet shows beside it.
    apply(write_shots(project, {**PROMPTS, "s1": "a harbour at dawn, in fog", "s2": "rain"}))
    current = keys(out)
    cache = OutputFolder(out).cache
    (out / STATE_DIR / "cache" / first["s1"][:2] / f"{TEMP_PREFIX}killed.tmp").write_bytes(b"x")
    gone = [
        cache.path(first["s1"]),
        thumb_path(out, first["s1"]),
        cache.path(first["s1"]).parent / f"{TEMP_PREFIX}killed.tmp",
    ]
    size = sum(path.stat().st_size for path in gone)
    before = snapshot(out)

    dry = run("gc", manifest)

    assert dry.exit_code == 0, dry.output
    assert listed(dry) == sorted(str(path.relative_to(project)) for path in gone)
    assert f"3 files, {size / 1000:.1f} KB that no results refer to" in dry.stdout
    assert "--yes" in dry.stdout
    assert snapshot(out) == before  # a dry run changes nothing

    done = run("gc", manifest, "--yes")

    assert done.exit_code == 0, done.output
    assert listed(done) == listed(dry)
    assert f"Deleted 3 files, {size / 1000:.1f} KB." in done.stdout
    assert not any(path.exists() for path in gone)
    after = snapshot(out)
    # Marked changed, so that an apply that planned before taking the lock plans again.
    assert after.pop(f"{STATE_DIR}/changed")
    assert after == {
        name: data
        for name, data in before.items()
        if out / name not in gone  # everything else is as it was
    }
    for key in [*current.values(), first["s2"]]:  # in use, and the last change's previous
        assert cache.path(key).is_file() and thumb_path(out, key).is_file()
    assert "Nothing to collect" in run("gc", manifest).stdout
    # What gc kept still works: reverting s2 is a restore, not a request.
    revert = run("plan", write_shots(project, {**PROMPTS, "s1": "a harbour at dawn, in fog"}))
    assert "s2    restore" in revert.stdout, revert.stdout
    # What it collected is gone for good: reverting s1 needs a request again.
    back = run("plan", write_shots(project, PROMPTS))
    assert "s1    replace" in back.stdout, back.stdout


def test_gc_keeps_orphans_and_lists_an_unreferenced_image_only_if_imgbatch_wrote_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_shots(project, PROMPTS)
    out = project / "output" / NAME
    apply(manifest)
    apply(write_shots(project, {"s1": PROMPTS["s1"], "s2": PROMPTS["s2"]}))  # s3: an orphan
    state = OutputFolder(out).load().entries
    stray = out / "old-take.png"  # an image imgbatch wrote that no entry names any more
    stray.write_bytes(OutputFolder(out).cache.path(state["s1"].key).read_bytes())
    mine = out / "moodboard.png"  # the user's
    mine.write_bytes(b"\x89PNG\r\n\x1a\n" + b"mine" * 100)
    edited = out / "retouched.png"  # imgbatch's once, edited since: no longer provably ours
    edited.write_bytes(stray.read_bytes()[:-1] + b"!")

    compared: list[str] = []
    real = gc._same_bytes

    def spy(one: Path, other: Path) -> bool:
        compared.append(one.name)
        return real(one, other)

    monkeypatch.setattr(gc, "_same_bytes", spy)

    result = run("gc", manifest)

    assert result.exit_code == 0, result.output
    assert listed(result) == [str(stray.relative_to(project))]
    # Only files no entry names are read: the shots' own images never are.
    assert set(compared) == {"old-take.png", "retouched.png"}
    assert "image" in result.stdout
    assert (out / "s3.png").is_file() and OutputFolder(out).cache.has(state["s3"].key)


def test_gc_never_deletes_the_last_copy_of_an_image_a_user_kept_under_another_name(
    project: Path,
) -> None:
    manifest = write_shots(project, PROMPTS)
    out = project / "output" / NAME
    apply(manifest)
    favourite = out / "s1-favourite.png"  # the take the user liked, kept before changing s1
    favourite.write_bytes((out / "s1.png").read_bytes())
    kept = favourite.read_bytes()
    first = keys(out)["s1"]
    apply(write_shots(project, {**PROMPTS, "s1": "a harbour at dawn, in fog"}))
    # Another change: s1's first image is no longer the last change's previous one.
    apply(write_shots(project, {**PROMPTS, "s1": "a harbour at dawn, in fog", "s2": "rain"}))
    assert first not in keys(out).values()

    result = run("gc", manifest, "--yes")

    assert result.exit_code == 0, result.output
    # Its cache entry may go (no record names it), but never together with the user's copy.
    assert favourite.read_bytes() == kept
    assert str(favourite.relative_to(project)) not in listed(result)


def test_gc_takes_several_manifests_sharing_a_folder_and_names_each_file_once(
    project: Path,
) -> None:
    shared = "output:\n  dir: output/shared"
    one = write_shots(project, {"a1": "a red kite"}, name="one", extra=shared)
    two = write_shots(project, {"b1": "a blue kite"}, name="two", extra=shared)
    out = project / "output" / "shared"
    apply(one)
    apply(two, "--force")  # one's shot is kept apart in the shared results: still referred to
    first = keys(out)["b1"]
    apply(write_shots(project, {"b1": "a green kite"}, name="two", extra=shared), "--force")
    apply(write_shots(project, {"b1": "a yellow kite"}, name="two", extra=shared), "--force")

    alone = run("gc", one)
    both = run("gc", one, two)
    (project / "alias").symlink_to(project / "output", target_is_directory=True)
    three = write_shots(
        project, {"c1": "a kite"}, name="three", extra="output:\n  dir: alias/shared"
    )

    assert both.exit_code == 0, both.output
    expected = [
        str(OutputFolder(out).cache.path(first).relative_to(project)),
        str(thumb_path(out, first).relative_to(project)),
    ]
    assert listed(both) == sorted(expected)
    assert listed(alone) == listed(both)
    assert OutputFolder(out).cache.has(keys(out)["a1"])
    # One folder under two spellings is one folder: listed once, locked once.
    deleted = run("gc", one, three, two, "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert listed(deleted) == listed(both)
    assert not OutputFolder(out).cache.has(first) and OutputFolder(out).cache.has(keys(out)["a1"])


def test_gc_yes_waits_for_no_apply_it_is_refused_while_one_runs(project: Path) -> None:
    manifest = write_shots(project, PROMPTS)
    out = project / "output" / NAME
    apply(manifest)
    apply(write_shots(project, {**PROMPTS, "s1": "fog"}))
    apply(write_shots(project, {**PROMPTS, "s1": "fog", "s2": "rain"}))
    before = snapshot(out)

    with OutputFolder(out).lock():
        result = run("gc", manifest, "--yes")

    assert result.exit_code == 1
    assert "another imgbatch apply is writing to" in result.stderr
    assert snapshot(out) == before
    assert run("gc", manifest, "--yes").exit_code == 0
    assert snapshot(out) != before


def test_gc_refuses_a_folder_whose_results_are_missing_and_changes_nothing(project: Path) -> None:
    manifest = write_shots(project, PROMPTS)
    out = project / "output" / NAME
    apply(manifest)
    (out / "results.json").rename(project / "results.json.bak")  # moved aside by the user
    with_a_record = run("gc", manifest)  # the state record still says which images are in use
    assert with_a_record.exit_code == 0 and "Nothing to collect" in with_a_record.output
    (out / ".imgbatch" / "state.json").rename(project / "state.json.bak")  # and that too
    before = snapshot(out)

    result = run("gc", manifest, "--yes")

    assert result.exit_code == 1
    assert f"{out} has 3 cached images but no results.json" in result.stderr
    assert snapshot(out) == before


def test_gc_with_an_invalid_manifest_among_several_deletes_nothing(project: Path) -> None:
    manifest = write_shots(project, PROMPTS)
    out = project / "output" / NAME
    apply(manifest)
    apply(write_shots(project, {**PROMPTS, "s1": "fog"}))
    apply(write_shots(project, {**PROMPTS, "s1": "fog", "s2": "rain"}))
    broken = project / "broken.yaml"
    broken.write_text("version: 1\nname: broken\nshots:\n  - id: x1\n    size: huge\n")
    before = snapshot(out)

    result = run("gc", manifest, broken, "--yes")

    assert result.exit_code == 2
    assert "broken.yaml" in result.stderr and "x1" in result.stderr
    assert snapshot(out) == before


def test_gc_of_a_shot_list_never_applied_creates_nothing(project: Path) -> None:
    manifest = write_shots(project, PROMPTS)

    result = run("gc", manifest, "--yes")

    assert result.exit_code == 0, result.output
    assert "Nothing to collect" in result.stdout
    assert not (project / "output").exists()


# --- apply --prune ----------------------------------------------------------------------------


def results_document(out: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return document


def test_apply_prune_removes_orphans_files_and_entries_but_never_the_cache(project: Path) -> None:
    manifest = write_shots(project, {**PROMPTS, "s4": "a harbour at night"})
    out = project / "output" / NAME
    apply(manifest)
    state = OutputFolder(out).load().entries
    shortened = write_shots(project, {"s1": PROMPTS["s1"], "s3": PROMPTS["s3"]})
    apply(shortened)  # without --prune the orphans keep their files and entries
    assert (out / "s2.png").is_file()
    assert [entry["id"] for entry in results_document(out)["orphans"]] == ["s2", "s4"]
    cache_before = snapshot(out / STATE_DIR / "cache")

    result = apply(shortened, "--prune", "--json")

    assert not (out / "s2.png").exists() and not (out / "s4.png").exists()
    assert (out / "s1.png").is_file() and (out / "s3.png").is_file()
    assert results_document(out)["orphans"] == []
    assert snapshot(out / STATE_DIR / "cache") == cache_before
    assert "Pruned 2 orphaned shots from the results; removed s2.png, s4.png." in result.stderr
    document = json.loads(result.stdout)
    assert document["pruned"] == [
        {"id": "s2", "file": "s2.png", "removed": True, "reason": "removed"},
        {"id": "s4", "file": "s4.png", "removed": True, "reason": "removed"},
    ]
    # Bringing a pruned shot back costs nothing: its image is still in the cache.
    back = apply(write_shots(project, {**PROMPTS}))
    assert "0 generated, 1 cached" in back.output, back.output
    assert (out / "s2.png").read_bytes() == OutputFolder(out).cache.path(
        state["s2"].key
    ).read_bytes()


def test_apply_prune_keeps_a_retouched_orphan_and_drops_it_once_deleted(project: Path) -> None:
    manifest = write_shots(project, PROMPTS)
    out = project / "output" / NAME
    apply(manifest)
    shortened = write_shots(project, {"s1": PROMPTS["s1"]})
    retouched = out / "s2.png"
    with retouched.open("r+b") as handle:  # same size, other bytes: a retouch in place
        handle.seek(100)
        handle.write(b"RETOUCH")
    edited = retouched.read_bytes()

    result = apply(shortened, "--prune")

    assert retouched.read_bytes() == edited
    assert not (out / "s3.png").exists()
    assert [entry["id"] for entry in results_document(out)["orphans"]] == ["s2"]
    assert "Kept orphan s2 (s2.png): changed since imgbatch wrote it" in result.output
    assert "removed s3.png" in result.output

    retouched.unlink()
    again = apply(shortened, "--prune")
    assert results_document(out)["orphans"] == []
    assert "Pruned 1 orphaned shot from the results." in again.output


def test_gc_never_lists_a_reference_image_even_one_imgbatch_made(project: Path) -> None:
    out = project / "output" / NAME
    apply(write_shots(project, {"s1": PROMPTS["s1"]}))
    hero = out / "hero.png"  # a generated image kept as the reference of another shot
    hero.write_bytes((out / "s1.png").read_bytes())
    manifest = project / "edit.yaml"
    manifest.write_text(
        f"version: 1\nname: {NAME}\nprovider: placeholder\nshots:\n"
        f'  - id: s1\n    prompt: "{PROMPTS["s1"]}"\n'
        "  - id: s2\n    prompt: this harbour at night\n"
        f"    reference_image: output/{NAME}/hero.png\n",
        encoding="utf-8",
    )
    copy = out / "copy.png"  # the same bytes, named by nothing: imgbatch's, listed
    copy.write_bytes(hero.read_bytes())

    result = run("gc", manifest)

    assert result.exit_code == 0, result.output
    assert listed(result) == [str(copy.relative_to(project))]


def orphan(shot_id: str, data: bytes, **changes: Any) -> ResultEntry:
    entry = ResultEntry(
        id=shot_id,
        status="generated",
        file=f"{shot_id}.png",
        key="ab" * 32,
        width=64,
        height=64,
        seed=7,
        model="qwen-image-max",
        size="64*64",
        prompt="p",
        image_url=None,
        request_id=None,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
    )
    return replace(entry, **changes)


def test_prune_removes_only_what_it_can_prove_it_wrote_in_the_output_folder(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    data = stamped_png("ab" * 32)  # what imgbatch writes: its provenance names the key
    outside = tmp_path / "precious.png"  # same bytes, outside the folder
    outside.write_bytes(data)
    (out / "plain.png").write_bytes(data)
    (out / "linked.png").symlink_to(outside)
    (out / "unrecorded.png").write_bytes(data)
    (out / "current.png").write_bytes(data)
    readme = b"# My project\n"
    (out / "README.md").write_bytes(readme)
    another = stamped_png("cd" * 32)
    (out / "another.png").write_bytes(another)
    orphans = [
        orphan("plain", data),
        orphan("escape", data, file="../precious.png"),
        orphan("linked", data),
        orphan("unrecorded", data, sha256=None, bytes=None),
        orphan("current", data),  # a hand edit: an orphan naming a current shot's file
        orphan("failed", data, status="failed", file=None),
        orphan("gone", data),
        # Hand edits naming a user's file, or another request's image, with its real size and
        # SHA-256: results.json alone is no proof.
        orphan("readme", readme, file="README.md"),
        orphan("another", another),
    ]

    done, kept = prune_orphans(out, orphans, in_use={"current.png"})

    assert [(item.id, item.removed, item.reason) for item in done] == [
        ("plain", True, "removed"),
        ("escape", False, "its file is not its own to remove"),
        ("linked", False, "it is not a regular file"),
        ("unrecorded", False, "no size and SHA-256 recorded to check it against"),
        ("current", False, "its file is not its own to remove"),
        ("failed", True, "it had no image"),
        ("gone", True, "its file was already gone"),
        ("readme", False, NO_PROVENANCE),
        ("another", False, "its provenance names another request: not its own to remove"),
    ]
    assert [entry.id for entry in kept] == [
        "escape",
        "linked",
        "unrecorded",
        "current",
        "readme",
        "another",
    ]
    assert sorted(path.name for path in out.iterdir()) == [
        "README.md",
        "another.png",
        "current.png",
        "linked.png",
        "unrecorded.png",
    ]
    assert outside.read_bytes() == data
    assert (out / "README.md").read_bytes() == readme


NO_PROVENANCE = "it carries no provenance of imgbatch's for this shot: not its own to remove"


def stamped_png(key: str) -> bytes:
    """A small PNG with imgbatch's provenance chunk naming request `key`."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("imgbatch:key", key)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_prune_keeps_an_image_billed_but_not_downloaded_until_its_url_expires(
    tmp_path: Path,
) -> None:
    """A shot with the same request recovers it from the orphan's URL: dropping the entry
    would make that shot pay again."""
    url = "https://dashscope-result.oss.example/x.png?Expires={}&Signature=s"
    billed = dict(status="unfetched", sha256=None, bytes=None, request_id="req-1")
    orphans = [
        orphan("live", b"", image_url=url.format(4102444800), **billed),  # 2100
        orphan("expired", b"", image_url=url.format(946684800), **billed),  # 2000
        orphan("unsigned", b"", image_url="https://example.test/y.png", **billed),
    ]

    done, kept = prune_orphans(tmp_path, orphans, in_use=())

    assert [(item.id, item.removed) for item in done] == [
        ("live", False),
        ("expired", True),
        ("unsigned", False),
    ]
    assert done[0].reason == "billed but not downloaded; kept until its image URL expires"
    assert [entry.id for entry in kept] == ["live", "unsigned"]
