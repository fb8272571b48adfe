"""Bytes on disk: atomic writes, image verification, the image cache, results.json and journal."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgbatch.errors import CacheEntryDamaged, ImageError, StoreError, StoreWriteError
from imgbatch.state import cache as store
from imgbatch.state.cache import TEMP_PREFIX, atomic_write, check_writable, verify_image
from imgbatch.state.folder import OutputFolder
from imgbatch.state.record import Owner
from imgbatch.state.results import Journal, ResultEntry, read_journal, write_results

KEY = "ab" + "0123456789abcdef" * 3 + "0123456789abcd"
RECOVER = (
    "; move it aside and run apply again: images already in the cache are restored without "
    "new requests"
)


def png(width: int = 64, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def hex_key(text: str) -> str:
    """A request key as imgbatch makes one (the SHA-256 of something, in hex)."""
    return hashlib.sha256(text.encode()).hexdigest()


def result(shot_id: str, status: str = "generated", **changes: object) -> ResultEntry:
    entry = ResultEntry(
        id=shot_id,
        status=status,  # type: ignore[arg-type]
        file=f"{shot_id}.png",
        key=hex_key(shot_id),
        width=1328,
        height=1328,
        seed=7,
        model="qwen-image-max",
        size="1328*1328",
        prompt=f"prompt of {shot_id}",
        # A failed entry has no image URL (one with a URL is read as `unfetched`).
        image_url=None if status == "failed" else f"https://example.invalid/{shot_id}.png",
        request_id=f"req-{shot_id}",
        sha256="f" * 64,
        bytes=1234,
        attempts=1,
        request={"text": f"prompt of {shot_id}", "seed": 7},
    )
    return replace(entry, **changes)  # type: ignore[arg-type]


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_creates_folders_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file.bin"
    atomic_write(target, b"first")
    assert target.read_bytes() == b"first"
    assert listing(target.parent) == ["file.bin"]


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old content that is longer")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == ["file.bin"]


def test_failed_rename_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    temps: list[str] = []

    def refuse(source: str, destination: object) -> None:
        temps.append(source)
        assert Path(source).read_bytes() == b"new"  # the data was written in full first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StoreWriteError) as caught:
        atomic_write(target, b"new")

    assert caught.value.disk_full
    assert str(caught.value).startswith(f"disk full writing {target} (No space left on device)")
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["file.bin"]
    (temp,) = temps
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(TEMP_PREFIX)


def test_interrupt_during_write_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["file.bin"]


# --- verify_image -----------------------------------------------------------------------------


def test_verify_image_accepts_a_whole_png_of_the_reported_size() -> None:
    verify_image(png(64, 32), 64, 32)  # no exception


def test_verify_image_rejects_truncated_bytes() -> None:
    data = png(64, 32)
    with pytest.raises(ValueError) as caught:
        verify_image(data[: len(data) // 2], 64, 32)
    assert str(caught.value) == "downloaded bytes are not a whole image (image file is truncated)"


def test_verify_image_rejects_garbage() -> None:
    with pytest.raises(ImageError) as caught:
        verify_image(b"<html>access denied</html>", 64, 32)
    assert str(caught.value) == (
        "downloaded bytes are HTML or XML text, not a PNG image (imgbatch reads PNG only)"
    )


def test_verify_image_rejects_empty_bytes() -> None:
    with pytest.raises(ValueError, match="not a whole image"):
        verify_image(b"", 64, 32)


def test_verify_image_rejects_the_wrong_size_naming_both() -> None:
    with pytest.raises(ValueError) as caught:
        verify_image(png(64, 32), 32, 64)
    assert str(caught.value) == "downloaded image is 64*32, not the 32*64 asked for"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_verify_image_rejects_a_large_decompression_bomb_as_value_error() -> None:
    # Over MAX_IMAGE_PIXELS (Pillow warns; imgbatch turns the warning into an error).
    with pytest.raises(ValueError, match="decompression bomb"):
        verify_image(_png_header_only(12000, 12000), 12000, 12000)


def test_verify_image_rejects_a_huge_decompression_bomb_as_value_error() -> None:
    with pytest.raises(ValueError, match="decompression bomb"):
        verify_image(_png_header_only(20000, 20000), 20000, 20000)


# --- the image cache --------------------------------------------------------------------------


def test_image_cache_put_has_restore(tmp_path: Path) -> None:
    cache = OutputFolder(tmp_path).cache
    assert cache.path(KEY) == tmp_path / ".imgbatch" / "cache" / "ab" / f"{KEY}.png"
    assert not cache.has(KEY)

    data = png(64, 32)
    cache.put(KEY, data)
    assert cache.has(KEY)
    assert not cache.has("cd" + KEY[2:])
    assert cache.path(KEY).read_bytes() == data

    target = tmp_path / "nested" / "s01.png"
    digest = hashlib.sha256(data).hexdigest()
    assert cache.restore(KEY, target, sha256=digest, size=len(data), dimensions=(1, 1)) == (
        digest,
        len(data),
    )
    assert target.read_bytes() == data

    # A copy, not a link: editing the output file leaves the cache alone.
    with target.open("r+b") as handle:
        handle.write(b"EDITED")
    assert cache.path(KEY).read_bytes() == data
    assert listing(cache.path(KEY).parent) == [f"{KEY}.png"]

    # Without a record, the entry must decode at the shot's size.
    other = tmp_path / "s02.png"
    cache.restore(KEY, other, sha256=None, size=None, dimensions=(64, 32))
    assert other.read_bytes() == data


def test_image_cache_restore_of_a_missing_key_fails_without_leaving_files(tmp_path: Path) -> None:
    cache = OutputFolder(tmp_path).cache
    target = tmp_path / "out" / "s01.png"
    target.parent.mkdir()
    with pytest.raises(CacheEntryDamaged, match="cannot be read"):
        cache.restore(KEY, target, sha256=None, size=None, dimensions=(64, 32))
    assert listing(target.parent) == []


# --- results.json and the journal -------------------------------------------------------------
# Through their one owner, as apply reaches them; a results.json alone (no state record) is what
# an earlier version left, imported as the state.


def load_state(output_dir: Path) -> dict[str, ResultEntry]:
    return dict(OutputFolder(output_dir).load().entries)


def results_path(output_dir: Path) -> Path:
    return OutputFolder(output_dir).results_path


def journal_path(output_dir: Path) -> Path:
    return OutputFolder(output_dir).journal_path


def journal_of(output_dir: Path) -> Journal:
    return OutputFolder(output_dir).journal()


def test_write_results_then_load_state_round_trips(tmp_path: Path) -> None:
    entries = [
        result("s01"),
        result("s02", "cached", seed=None, style="ink", negative_prompt="blurry"),
        result("s03", "failed", file=None, error="400 bad", error_code="InvalidParameter"),
        result("s04", "generated", prompt="一辆红色的自行车"),
    ]
    orphan = result("s00-old")
    meta = {"manifest": "/x/shots.yaml", "provider": "placeholder", "key_format": 1}

    path = write_results(results_path(tmp_path), entries, [orphan], meta)

    assert path == results_path(tmp_path) == tmp_path / "results.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["version"] == 1
    assert document["provider"] == "placeholder"
    assert document["summary"] == {"shots": 4, "generated": 2, "cached": 1, "failed": 1}
    assert [shot["id"] for shot in document["shots"]] == ["s01", "s02", "s03", "s04"]
    assert document["shots"][0] == entries[0].to_json()
    assert "一辆红色的自行车" in path.read_text(encoding="utf-8")  # not \u-escaped

    state = load_state(tmp_path)
    assert list(state) == ["s01", "s02", "s03", "s04", "s00-old"]
    assert state == {item.id: item for item in [*entries, orphan]}
    assert listing(tmp_path) == ["results.json"]


def test_an_unfetched_entry_round_trips_and_is_counted_only_when_there_is_one(
    tmp_path: Path,
) -> None:
    meta = {"manifest": "shots.yaml", "provider": "dashscope", "key_format": 1}
    billed = result(
        "s02", "unfetched", file=None, sha256=None, bytes=None, error="could not be downloaded"
    )
    path = write_results(results_path(tmp_path), [result("s01"), billed], [], meta)

    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["summary"] == {
        "shots": 2,
        "generated": 1,
        "cached": 0,
        "failed": 0,
        "unfetched": 1,
    }
    assert document["shots"][1]["status"] == "unfetched"
    assert document["shots"][1]["image_url"] == "https://example.invalid/s02.png"
    assert load_state(tmp_path)["s02"] == billed
    assert not billed.has_image and result("s01").has_image

    # None unfetched: the summary is as it was before the status existed, so a results file
    # written by the previous version stays byte for byte the same.
    write_results(results_path(tmp_path), [result("s01")], [], meta)
    assert json.loads(path.read_text(encoding="utf-8"))["summary"] == {
        "shots": 1,
        "generated": 1,
        "cached": 0,
        "failed": 0,
    }


def test_a_failed_entry_with_an_image_url_from_the_previous_version_loads_as_unfetched(
    tmp_path: Path,
) -> None:
    """Before `unfetched`, "billed but not downloaded" was a failed entry with an image URL."""
    meta = {"manifest": "shots.yaml", "provider": "dashscope", "key_format": 1}
    legacy = replace(
        result("s01", "failed", file=None, error="generated but could not be downloaded"),
        image_url="https://example.invalid/s01.png?Expires=4102444800",
    )
    write_results(results_path(tmp_path), [legacy, result("s02", "failed", file=None)], [], meta)
    assert '"status": "failed"' in results_path(tmp_path).read_text(encoding="utf-8")

    state = load_state(tmp_path)
    assert state["s01"] == replace(legacy, status="unfetched")
    assert state["s02"].status == "failed"  # no URL: a failure like any other

    journal = journal_of(tmp_path)
    journal.record(replace(legacy, id="s03"))
    journal.close()
    assert [entry.status for entry in read_journal(journal_path(tmp_path))] == ["unfetched"]


def test_results_json_holds_one_shot_per_line_so_a_git_diff_names_the_changed_shots(
    tmp_path: Path,
) -> None:
    meta = {"manifest": "shots.yaml", "provider": "placeholder", "key_format": 1}
    write_results(results_path(tmp_path), [result("s01"), result("s02")], [], meta)
    before = results_path(tmp_path).read_text(encoding="utf-8").splitlines()
    write_results(
        results_path(tmp_path), [result("s01"), result("s02", prompt="a blue bicycle")], [], meta
    )
    after = results_path(tmp_path).read_text(encoding="utf-8").splitlines()

    changed = [line for line in after if line not in before]
    assert len(changed) == 1 and '"id": "s02"' in changed[0]
    assert json.loads("\n".join(after))["orphans"] == []


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param(lambda document: json.dumps(document, indent=2), id="pretty-printed"),
        pytest.param(lambda document: json.dumps(document), id="one-line"),
        pytest.param(
            lambda document: json.dumps({**document, "orphans": document["shots"][:1]}).replace(
                '}, {"id"', '},\n    {"id"'
            ),
            id="entry-lines-in-other-places",
        ),
    ],
)
def test_a_results_file_rewritten_by_hand_still_loads(
    tmp_path: Path, rewrite: Callable[[dict[str, Any]], str]
) -> None:
    meta = {"manifest": "shots.yaml", "provider": "placeholder", "key_format": 1}
    entries = [result("s01"), result("s02", style="ink"), result("s03", "failed", file=None)]
    path = write_results(results_path(tmp_path), entries, [], meta)
    document = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(rewrite(document), encoding="utf-8")

    assert load_state(tmp_path) == {entry.id: entry for entry in entries}


def test_loaded_entries_share_the_strings_that_repeat_from_shot_to_shot(tmp_path: Path) -> None:
    entries = [result(f"s{index:02d}", negative_prompt="blurry, low quality") for index in range(3)]
    write_results(results_path(tmp_path), entries, [], {})

    first, second, _ = load_state(tmp_path).values()
    assert first.negative_prompt is second.negative_prompt
    assert first.model is second.model
    assert first.request["text"] is first.prompt


def test_load_state_of_an_empty_folder(tmp_path: Path) -> None:
    assert load_state(tmp_path / "never-made") == {}
    assert read_journal(journal_path(tmp_path)) == []


def test_from_json_ignores_unknown_fields() -> None:
    raw = {**result("s01").to_json(), "added_in_a_later_version": True}
    assert ResultEntry.from_json(raw) == result("s01")


def test_journal_is_replayed_over_an_older_results_file(tmp_path: Path) -> None:
    write_results(results_path(tmp_path), [result("s01"), result("s02")], [], {})
    newer_s01 = result("s01", key=hex_key("s01, edited"), prompt="edited")
    s03 = result("s03", "failed", file=None, error="gave up")

    journal = journal_of(tmp_path)
    journal.record(newer_s01)
    journal.record(s03)
    journal.close()

    assert journal.path == journal_path(tmp_path) == tmp_path / ".imgbatch" / "journal.jsonl"
    assert read_journal(journal_path(tmp_path)) == [newer_s01, s03]
    assert load_state(tmp_path) == {"s01": newer_s01, "s02": result("s02"), "s03": s03}


def test_journal_without_results_file(tmp_path: Path) -> None:
    journal = journal_of(tmp_path)
    journal.record(result("s01"))
    journal.record(result("s01", status="cached"))  # the later line wins
    journal.close()
    assert load_state(tmp_path) == {"s01": result("s01", status="cached")}


def test_torn_last_journal_line_is_ignored(tmp_path: Path) -> None:
    journal = journal_of(tmp_path)
    journal.record(result("s01"))
    journal.close()
    full = json.dumps(result("s02").to_json())
    with journal_path(tmp_path).open("a", encoding="utf-8") as handle:
        handle.write(full[: len(full) // 2])  # killed mid-append

    assert load_state(tmp_path) == {"s01": result("s01")}


def test_torn_journal_line_inside_a_multibyte_character_is_ignored(tmp_path: Path) -> None:
    journal = journal_of(tmp_path)
    journal.record(result("s01"))
    journal.close()
    line = json.dumps(result("s02", prompt="一辆红色的自行车").to_json(), ensure_ascii=False)
    raw = line.encode("utf-8")
    cut = raw.index("红".encode()) + 1  # in the middle of a 3-byte character
    with journal_path(tmp_path).open("ab") as handle:
        handle.write(raw[:cut])

    assert load_state(tmp_path) == {"s01": result("s01")}


def test_entry_journaled_after_a_torn_line_survives(tmp_path: Path) -> None:
    full = json.dumps(result("s01").to_json())
    path = journal_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(full[:40], encoding="utf-8")  # the previous run was killed mid-append

    journal = journal_of(tmp_path)  # the next run, killed before write_results
    journal.record(result("s02"))
    journal.close()

    assert load_state(tmp_path) == {"s02": result("s02")}


def test_saving_the_state_removes_the_journal(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    journal = journal_of(tmp_path)
    journal.record(result("s01"))
    journal.close()
    assert journal_path(tmp_path).is_file()

    before = folder.load()
    folder.save([result("s01")], [], [], {}, owner=Owner(None, "x"), before=before, now="now")

    assert not journal_path(tmp_path).exists()
    assert load_state(tmp_path) == {"s01": result("s01")}
    assert listing(tmp_path) == [".imgbatch", "results.json"]
    assert listing(tmp_path / ".imgbatch") == ["state.json"]


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 1, "shots": [',  # torn JSON
        "",  # empty
        '["not", "an", "object"]',  # wrong shape
        '{"version": 1, "shots": [{"id": "s01"}]}',  # entry missing its fields
    ],
)
def test_corrupt_results_file_raises_store_error_saying_how_to_recover(
    tmp_path: Path, text: str
) -> None:
    path = results_path(tmp_path)
    path.write_text(text, encoding="utf-8")

    with pytest.raises(StoreError) as caught:
        load_state(tmp_path)

    message = str(caught.value)
    assert message.startswith(f"{path} cannot be read (")
    assert message.endswith(")" + RECOVER)


def test_corrupt_results_file_message_includes_the_parse_error(tmp_path: Path) -> None:
    path = results_path(tmp_path)
    text = '{"version": 1, "shots": ['
    path.write_text(text, encoding="utf-8")
    try:
        json.loads(text)
    except ValueError as exc:
        parse_error = str(exc)

    with pytest.raises(StoreError) as caught:
        load_state(tmp_path)
    assert str(caught.value) == f"{path} cannot be read ({parse_error}){RECOVER}"


# --- write failures, links and permissions ----------------------------------------------------


def test_a_journal_line_that_failed_to_write_loses_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = journal_of(tmp_path)
    journal.record(result("s01"))
    real = store._write_fd

    def half_then_full(fd: int, data: bytes, path: Path) -> None:
        real(fd, data[: len(data) // 2], path)  # the disk filled up mid-line
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_fd", half_then_full)
    with pytest.raises(StoreWriteError) as caught:
        journal.record(result("s02"))
    assert caught.value.disk_full and str(journal.path) in str(caught.value)
    monkeypatch.setattr(store, "_write_fd", real)  # space freed
    journal.record(result("s03"))
    journal.close()

    assert read_journal(journal_path(tmp_path)) == [result("s01"), result("s03")]


def test_the_journal_is_never_written_through_a_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me\n", encoding="utf-8")
    path = journal_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.symlink_to(elsewhere)

    with pytest.raises(StoreError, match=f"cannot open {path} for writing"):
        journal_of(tmp_path)
    with pytest.raises(StoreError, match=f"{path} is a symbolic link"):
        read_journal(journal_path(tmp_path))
    assert elsewhere.read_text(encoding="utf-8") == "keep me\n"


def test_check_writable_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_writable(tmp_path)  # no exception, and nothing left behind
    assert listing(tmp_path) == []
    with pytest.raises(StoreError, match=f"{tmp_path / 'missing'} is not a folder"):
        check_writable(tmp_path / "missing")

    def refuse(folder: Path) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store, "_create_temp", refuse)
    with pytest.raises(StoreError) as caught:
        check_writable(tmp_path)
    assert str(caught.value) == f"cannot write in {tmp_path}: Permission denied; nothing was sent"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_open_would(tmp_path: Path, umask: int, mode: int) -> None:
    target = tmp_path / "image.png"
    target.write_bytes(b"old")
    target.chmod(0o600)
    old = os.umask(umask)
    try:
        atomic_write(target, b"new")
        atomic_write(tmp_path / "fresh.png", b"new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "fresh.png").stat().st_mode) == mode


def test_restore_never_copies_through_a_link(tmp_path: Path) -> None:
    secret = tmp_path / "passwd"
    secret.write_bytes(png(64, 32))  # even a real image: a link is never followed
    cache = OutputFolder(tmp_path).cache
    cache.path(KEY).parent.mkdir(parents=True)
    cache.path(KEY).symlink_to(secret)
    target = tmp_path / "s01.png"

    with pytest.raises(CacheEntryDamaged, match="is a symbolic link"):
        cache.restore(KEY, target, sha256=None, size=None, dimensions=(64, 32))
    assert not target.exists()
    cache.discard(KEY)
    assert not cache.path(KEY).is_symlink() and secret.exists()
