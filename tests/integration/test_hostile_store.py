"""Hostile disks and damaged state: the output folder, cache and journal turned against a run.

Takes: `imgbatch apply` through click's CliRunner against the fake DashScope server (paid runs,
so what was sent can be counted) or with the placeholder provider, after breaking something on
disk: results.json or the journal replaced by a folder or a link, a journal line that is not an
entry, a folder where a shot's image goes, a cache entry truncated, edited, resized or made a
link to a file outside. Disk full and permission denied are injected at the store's one write
path (`store._write_fd`) and temp-file creation (`store._create_temp`), so no test needs a real
full disk or a non-root user.
Gives: for each case the exit code, a message naming the path, the requests the server received,
and proof that nothing was lost: every paid image is in the cache or its URL in results.json (the
next apply pays for nothing twice), and results.json lists every shot.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from imgbatch.cli.main import main
from imgbatch.state import cache as store
from imgbatch.state.cache import TEMP_PREFIX
from imgbatch.state.folder import STATE_DIR
from tests.support import hostile_images
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest, write_many_shots

SHOTS = 4
IDS = [f"shot-{index:03d}" for index in range(SHOTS)]
NAME = "hostile"
SECOND = IDS[1]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def apply(manifest: Path, *extra: str) -> Result:
    result = run("apply", manifest, "--rps", "1000", "--concurrency", "1", *extra)
    assert "Traceback" not in result.output
    assert "unexpected" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def out_of(manifest: Path) -> Path:
    return manifest.parent / "output" / NAME


def results(out: Path) -> dict[str, dict[str, Any]]:
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert document["summary"]["shots"] == len(document["shots"])
    return {entry["id"]: entry for entry in document["shots"]}


def cached_images(out: Path) -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in (out / STATE_DIR / "cache").rglob("*.png")}


def snapshot(out: Path) -> dict[str, bytes]:
    """Every regular file under the output folder (but the lock), by relative path."""
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in out.rglob("*")
        if path.is_file() and not path.is_symlink() and path.name != "lock"
    }


def assert_whole(path: Path, size: tuple[int, int] = (1328, 1328)) -> None:
    with Image.open(path) as image:
        image.load()
        assert image.size == size


@pytest.fixture
def manifest(tmp_path: Path, api_env: dict[str, str]) -> Path:
    return write_many_shots(tmp_path, NAME, SHOTS)


# ----- preflight and damaged state: a clean error before anything is sent ---------------------


@dataclass(frozen=True)
class Broken:
    """Something broken in an output folder that a first apply filled."""

    id: str
    breaks: Callable[[Path, pytest.MonkeyPatch], Path]  # returns the path the message must name
    message: str


def _results_is_a_folder(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = out / "results.json"
    path.unlink()
    path.mkdir()
    return path


def _results_has_a_number_for_an_entry(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = out / "results.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["shots"][1] = 123
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _results_has_a_bad_status(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = out / "results.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["shots"][1]["status"] = "wonderful"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _journal_is_a_folder(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = out / STATE_DIR / "journal.jsonl"
    path.mkdir()
    return path


def _journal_is_a_link(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    target = out.parent / "elsewhere.txt"
    target.write_text("not imgbatch's\n", encoding="utf-8")
    path = out / STATE_DIR / "journal.jsonl"
    path.symlink_to(target)
    return path


def _refuse_temp_files_in(folder: Callable[[Path], Path]) -> Callable[..., Path]:
    def breaks(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        refused = folder(out)
        real = store._create_temp

        def create(where: Path) -> tuple[int, str]:
            if Path(where) == refused:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(where)

        monkeypatch.setattr(store, "_create_temp", create)
        return refused

    return breaks


def _lock_is_a_folder(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = out / STATE_DIR / "lock"
    path.unlink(missing_ok=True)
    path.mkdir()
    return path


def _lock_is_a_link(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    target = out.parent / "victim.txt"
    target.write_text("a file the lock must not open\n", encoding="utf-8")
    path = out / STATE_DIR / "lock"
    path.unlink(missing_ok=True)
    path.symlink_to(target)
    return path


def _cache_is_a_file(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = out / STATE_DIR / "cache"
    moved = out.parent / "cache-moved-aside"
    path.rename(moved)
    path.write_text("a file where the cache folder goes\n", encoding="utf-8")
    return path


def _thumbs_is_a_link(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = out / STATE_DIR / "thumbs"
    shutil.rmtree(path, ignore_errors=True)
    elsewhere = out.parent / "elsewhere"
    elsewhere.mkdir()
    path.symlink_to(elsewhere)
    return path


BROKEN = [
    Broken("thumbs-is-a-link", _thumbs_is_a_link, "is a symbolic link"),
    Broken("results.json-is-a-folder", _results_is_a_folder, "is not a file (a folder?)"),
    Broken("results-entry-is-a-number", _results_has_a_number_for_an_entry, "cannot be read"),
    Broken("results-entry-bad-status", _results_has_a_bad_status, "has a bad status"),
    Broken("journal-is-a-folder", _journal_is_a_folder, "is not a file (a folder?)"),
    Broken("journal-is-a-link", _journal_is_a_link, "is a symbolic link"),
    Broken(
        "output-folder-unwritable",
        _refuse_temp_files_in(lambda out: out),
        "cannot write in",
    ),
    Broken(
        "state-folder-unwritable",
        _refuse_temp_files_in(lambda out: out / STATE_DIR),
        "cannot write in",
    ),
    Broken(
        "cache-folder-unwritable",
        _refuse_temp_files_in(lambda out: out / STATE_DIR / "cache"),
        "cannot write in",
    ),
    Broken("cache-is-a-file", _cache_is_a_file, "is not a folder"),
    Broken("lock-is-a-folder", _lock_is_a_folder, "cannot take the lock"),
    Broken("lock-is-a-link", _lock_is_a_link, "cannot take the lock"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[case.id for case in BROKEN])
def test_broken_state_is_refused_before_anything_is_sent(
    case: Broken,
    manifest: Path,
    fake_server: FakeDashScope,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = out_of(manifest)
    assert apply(manifest).exit_code == 0
    # An edit that would cost a request, so that "nothing sent" means something.
    text = manifest.read_text(encoding="utf-8").replace("take 3", "take 3, at dusk")
    manifest.write_text(text, encoding="utf-8")
    path = case.breaks(out, monkeypatch)
    before = snapshot(out)
    sent = fake_server.generation_count

    result = apply(manifest)

    assert result.exit_code == 1, result.output
    assert f"{path}" in result.stderr and case.message in result.stderr, result.stderr
    assert fake_server.generation_count == sent  # nothing sent
    assert snapshot(out) == before  # nothing changed, nothing lost


@pytest.mark.parametrize("line", ["123", "[1, 2]", "null", '"text"', "{}", '{"id": 5}'])
def test_a_journal_line_that_is_not_an_entry_is_skipped(
    line: str, manifest: Path, fake_server: FakeDashScope
) -> None:
    out = out_of(manifest)
    assert apply(manifest).exit_code == 0
    journal = out / STATE_DIR / "journal.jsonl"
    # A killed run journaled shot 1 again, then something wrote a line that is not an entry.
    entry = results(out)[SECOND]
    journal.write_text(f"{json.dumps(entry)}\n{line}\n", encoding="utf-8")

    result = apply(manifest)

    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == SHOTS  # nothing paid twice
    # Unchanged shots keep their entries: each image was generated by the first apply.
    assert all(entry["status"] == "generated" for entry in results(out).values())
    assert not journal.exists()


# ----- write errors during a paid run --------------------------------------------------------


@dataclass
class Disk:
    """Wraps the store's write path: `refuses(path, state)` says whether a write fails."""

    error: int
    refuses: Callable[[Path, Disk], bool]
    writes: list[Path] = field(default_factory=list)
    full: bool = False
    enabled: bool = True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = store._write_fd

        def write(fd: int, data: bytes, path: Path) -> None:
            self.writes.append(Path(path))
            if self.enabled and self.refuses(Path(path), self):
                raise OSError(self.error, os.strerror(self.error))
            real(fd, data, path)

        monkeypatch.setattr(store, "_write_fd", write)
        # On a file system with reflinks an image placed from the cache shares its bytes rather
        # than being written: copy instead, so every byte goes through the faulty write path.
        monkeypatch.setattr(store, "clone", lambda source_fd, target_fd: False)
        monkeypatch.setattr(store, "_copy_in_kernel", lambda source, target, size: 0)


def _cache_writes(path: Path) -> bool:
    return "cache" in path.parts


def _cache_writes_from_the_second(*, sticky: bool) -> Callable[[Path, Disk], bool]:
    """Refuse the first write of the second cache entry (the second shot's image, written in
    pieces as it downloads), and every cache write after it when `sticky` (full for an image;
    a journal line still fits)."""

    def refuses(path: Path, disk: Disk) -> bool:
        if not _cache_writes(path):
            return False
        entries = list(dict.fromkeys(filter(_cache_writes, disk.writes)))
        if len(entries) == 2 and path == entries[1] and not disk.full:
            disk.full = True
            return True
        return disk.full and sticky

    return refuses


def _full_from_the_second_image(path: Path, disk: Disk) -> bool:
    """Every write fails from the second cache write on: the disk is full for every file."""
    return _cache_writes_from_the_second(sticky=False)(path, disk) or disk.full


@dataclass(frozen=True)
class WriteFault:
    id: str
    error: int
    refuses: Callable[[Path, Disk], bool]
    path: Callable[[Path], str]  # the path the message names (a prefix is enough)
    message: str
    sent: int  # generations the first apply sends
    stops: bool  # the run stops sending (disk full)
    url_kept: bool  # the image never reached the cache: its URL is kept instead
    second_run_sent: int  # new generations the second apply needs


def _image_of(shot: str) -> Callable[[Path, Disk], bool]:
    return lambda path, disk: path.name == f"{shot}.png"


WRITE_FAULTS = [
    WriteFault(
        "image-permission-denied",
        errno.EACCES,
        _image_of(SECOND),
        lambda out: f"{out / SECOND}.png",
        "Permission denied; its image is in the cache",
        sent=SHOTS,
        stops=False,
        url_kept=False,
        second_run_sent=0,
    ),
    WriteFault(
        "image-disk-full",
        errno.ENOSPC,
        _image_of(SECOND),
        lambda out: f"{out / SECOND}.png",
        "disk full writing",
        sent=2,
        stops=True,
        url_kept=False,
        second_run_sent=SHOTS - 2,
    ),
    WriteFault(
        "image-over-quota",
        errno.EDQUOT,
        _image_of(SECOND),
        lambda out: f"{out / SECOND}.png",
        "disk full writing",
        sent=2,
        stops=True,
        url_kept=False,
        second_run_sent=SHOTS - 2,
    ),
    WriteFault(
        "cache-disk-full",
        errno.ENOSPC,
        _cache_writes_from_the_second(sticky=True),
        lambda out: str(out / STATE_DIR / "cache"),
        "disk full writing",
        sent=2,
        stops=True,
        url_kept=True,
        second_run_sent=SHOTS - 2,  # the second shot is fetched from its URL, not paid again
    ),
    WriteFault(
        "cache-permission-denied",
        errno.EACCES,
        _cache_writes_from_the_second(sticky=False),
        lambda out: str(out / STATE_DIR / "cache"),
        "Permission denied; its URL is kept",
        sent=SHOTS,
        stops=False,
        url_kept=True,
        second_run_sent=0,
    ),
]


@pytest.mark.parametrize("case", WRITE_FAULTS, ids=[case.id for case in WRITE_FAULTS])
def test_a_write_error_fails_its_shot_or_stops_the_run_and_loses_nothing_paid(
    case: WriteFault,
    manifest: Path,
    fake_server: FakeDashScope,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = out_of(manifest)
    disk = Disk(case.error, case.refuses)
    disk.install(monkeypatch)

    result = apply(manifest)

    assert result.exit_code == 1, result.output
    assert fake_server.generation_count == case.sent
    entries = results(out)
    failed = entries[SECOND]
    # Billed, and kept nowhere but at its URL: unfetched. Kept in the cache: a failed write.
    assert failed["status"] == ("unfetched" if case.url_kept else "failed")
    assert case.path(out) in failed["error"] and case.message in failed["error"], failed
    assert case.path(out) in result.stderr
    if case.stops:
        assert "free space on the filesystem mounted at" in result.stderr
        assert "paid images already downloaded are kept" in result.stderr
        # The shots never sent are not run: they keep their state (none yet), no failure.
        assert list(entries) == IDS[:2]
        assert entries[IDS[0]]["status"] == "generated"
        assert f"{SHOTS - 2} shots not run" in result.output
    else:
        assert list(entries) == IDS
        others = [entries[shot]["status"] for shot in IDS if shot != SECOND]
        assert others == ["generated"] * (SHOTS - 1)
    # Every paid image is in the cache, or (never written there) its URL is kept.
    in_cache = sum(1 for entry in entries.values() if entry["status"] == "generated")
    if case.url_kept:
        assert failed["image_url"] and failed["request_id"], failed
    else:
        assert failed["image_url"] is None  # the image is in the cache: restored, not fetched
        in_cache += 1
    assert len(cached_images(out)) == in_cache

    disk.enabled = False  # space freed, permissions fixed
    sent = fake_server.generation_count
    again = apply(manifest)

    assert again.exit_code == 0, again.output
    assert fake_server.generation_count - sent == case.second_run_sent
    assert fake_server.generation_count == SHOTS  # no shot paid twice
    assert {entry["status"] for entry in results(out).values()} <= {"generated", "cached"}
    for shot in IDS:
        assert_whole(out / f"{shot}.png")


def test_a_disk_full_for_every_file_says_results_were_not_written_and_pays_twice_only_in_flight(
    manifest: Path, fake_server: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = out_of(manifest)
    # The first shot is saved whole; the disk is full from the second shot's image on, for
    # every file: the cache, the journal and results.json.
    disk = Disk(errno.ENOSPC, _full_from_the_second_image)
    disk.install(monkeypatch)

    result = apply(manifest)

    assert result.exit_code == 1, result.output
    assert fake_server.generation_count == 2
    assert f"disk full writing {out / 'results.json'}" in result.stderr, result.stderr
    assert "free space on the filesystem mounted at" in result.stderr
    assert f"the shots this run finished are in {out / STATE_DIR / 'journal.jsonl'}" in (
        result.stderr
    )
    assert not (out / "results.json").exists()
    assert_whole(out / f"{IDS[0]}.png")
    assert len(cached_images(out)) == 1

    disk.enabled = False
    again = apply(manifest)

    assert again.exit_code == 0, again.output
    # The first shot came back from the journal; at most the shot in flight when the disk
    # filled (the second) is paid again.
    assert results(out)[IDS[0]]["status"] == "generated"  # as the killed run made it
    assert fake_server.generation_count <= SHOTS + 1
    for shot in IDS:
        assert_whole(out / f"{shot}.png")


# ----- damaged cache entries: checked on restore, never followed through a link ---------------


def _truncate(entry: Path, outside: Path) -> None:
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])


def _flip_a_byte(entry: Path, outside: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))


def _link_to_a_secret(entry: Path, outside: Path) -> None:
    secret = outside / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    entry.unlink()
    entry.symlink_to(secret)


def _link_the_shard_folder(entry: Path, outside: Path) -> None:
    # The folder holding the entry is a link to a folder outside, with a real image in it.
    elsewhere = outside / "shard"
    elsewhere.mkdir()
    Image.new("RGB", (1328, 1328), (1, 2, 3)).save(elsewhere / entry.name)
    for sibling in entry.parent.iterdir():
        sibling.unlink()
    entry.parent.rmdir()
    entry.parent.symlink_to(elsewhere, target_is_directory=True)


def _resize(entry: Path, outside: Path) -> None:
    Image.new("RGB", (64, 64), (9, 9, 9)).save(entry, format="PNG")


@dataclass(frozen=True)
class Damage:
    id: str
    damage: Callable[[Path, Path], None]
    notice: str
    forget_results: bool = False  # no record of the entry's hash: it must decode at the size
    expired: bool = False  # the image URL no longer works: generated again
    fetched: bool = True  # fetched from its recorded URL rather than paid again


DAMAGES = [
    Damage("truncated", _truncate, "does not match its record"),
    Damage("same-size-edit", _flip_a_byte, "does not match its record"),
    Damage("link-to-a-secret", _link_to_a_secret, "is a symbolic link"),
    Damage("shard-folder-is-a-link", _link_the_shard_folder, "is a symbolic link"),
    Damage(
        "wrong-size-without-a-record",
        _resize,
        "is 64*64, but the shot is 1328*1328",
        forget_results=True,
        fetched=False,
    ),
    Damage(
        "truncated-without-a-record",
        _truncate,
        "is damaged: its bytes are not a whole image",
        forget_results=True,
        fetched=False,
    ),
    Damage("truncated-url-expired", _truncate, "does not match its record", expired=True),
]


@pytest.mark.parametrize("case", DAMAGES, ids=[case.id for case in DAMAGES])
def test_a_damaged_cache_entry_is_discarded_and_the_image_fetched_or_made_again(
    case: Damage, manifest: Path, fake_server: FakeDashScope, tmp_path: Path
) -> None:
    out = out_of(manifest)
    assert apply(manifest).exit_code == 0
    first = results(out)
    before = first[SECOND]
    original = (out / f"{SECOND}.png").read_bytes()
    entry = out / STATE_DIR / "cache" / before["key"][:2] / f"{before['key']}.png"
    outside = tmp_path / "outside"
    outside.mkdir()
    case.damage(entry, outside)
    outside_before = snapshot(outside)
    (out / f"{SECOND}.png").unlink()  # so that the plan restores it from the cache
    if case.forget_results:  # the state record and results.json: nothing records the hashes
        (out / "results.json").unlink()
        (out / STATE_DIR / "state.json").unlink()
    if case.expired:
        fake_server.forget_images()
    plan = run("plan", manifest)
    assert f"{SECOND}  restore" in plan.output, plan.output
    sent, downloads = fake_server.generation_count, len(fake_server.downloads)

    result = apply(manifest)

    assert result.exit_code == 0, result.output
    assert f"note {SECOND}: cache entry {entry}" in result.stderr, result.stderr
    assert case.notice in result.stderr
    paid_again = 0 if case.fetched and not case.expired else 1
    assert fake_server.generation_count - sent == paid_again
    if case.fetched:
        assert len(fake_server.downloads) - downloads == 1 + paid_again
    image = out / f"{SECOND}.png"
    assert_whole(image)
    assert not image.is_symlink()
    if case.fetched and not case.expired:
        assert image.read_bytes() == original
    after = results(out)[SECOND]
    assert after["status"] == "generated"
    assert after["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    # The entry is a real file again, holding the image; nothing outside was touched.
    assert not entry.is_symlink() and not entry.parent.is_symlink()
    assert entry.read_bytes() == image.read_bytes()
    assert snapshot(outside) == outside_before
    others = {shot: entry for shot, entry in results(out).items() if shot != SECOND}
    if case.forget_results:  # no record of them: restored from the cache
        assert [entry["status"] for entry in others.values()] == ["cached"] * (SHOTS - 1)
    else:  # unchanged: their entries kept exactly
        assert others == {shot: entry for shot, entry in first.items() if shot != SECOND}


def test_a_no_op_plan_opens_no_image(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing is for restores: a plan stays a stat per shot, however many images there are."""
    assert apply(manifest).exit_code == 0
    opened: list[str] = []
    real_open = io.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy)  # what Path.open calls
    assert "4 unchanged" in run("plan", manifest).output
    assert any(path.endswith("results.json") for path in opened)
    assert not [path for path in opened if path.endswith(".png")]


# ----- temporary files and permissions -------------------------------------------------------

IN_PLACE = """\
version: 1
name: in-place
provider: placeholder
output:
  dir: .
shots:
  - id: s1
    prompt: a lighthouse
    size: "1328*1328"
"""


def test_stale_temporaries_are_cleaned_but_a_users_tmp_files_are_not(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, IN_PLACE)
    users = {
        ".notes.tmp": b"my notes",
        ".s1.png.abc123.tmp": b"looks like an old imgbatch name, but imgbatch never made it",
        "draft.tmp": b"draft",
    }
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    stale = [
        tmp_path / f"{TEMP_PREFIX}killed.tmp",
        tmp_path / STATE_DIR / f"{TEMP_PREFIX}killed.tmp",
        tmp_path / STATE_DIR / "cache" / "ab" / f"{TEMP_PREFIX}killed.tmp",
    ]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half an image")

    assert apply(manifest).exit_code == 0

    assert {name: (tmp_path / name).read_bytes() for name in users} == users
    assert not [path for path in stale if path.exists()]
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))  # and none of its own left behind
    assert_whole(tmp_path / "s1.png")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    manifest = write_manifest(tmp_path, IN_PLACE)
    image = tmp_path / "s1.png"
    old = os.umask(umask)
    try:
        assert apply(manifest).exit_code == 0
        written = [
            image,
            tmp_path / "results.json",
            *(tmp_path / STATE_DIR / "cache").rglob("*.png"),
        ]
        assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [mode] * 3
        # An image made again (its prompt changed) is replaced with the same permissions.
        text = manifest.read_text(encoding="utf-8").replace("a lighthouse", "a lighthouse at dusk")
        manifest.write_text(text, encoding="utf-8")
        assert apply(manifest).exit_code == 0
        assert stat.S_IMODE(image.stat().st_mode) == mode
    finally:
        os.umask(old)


# ----- hostile files a pull request commits: nothing run, nothing of the user's touched -------
#
# A project applied once with `output.dir: .` (the images beside the shot list, as some keep
# them), then files committed by someone else: an EPS where an image was, a results.json naming
# the user's files, a cache entry copying a user's image, a page of the user's at index.html.
# Each command runs with a recording `gs` first on PATH, beside a folder outside the project:
# Ghostscript never runs, the user's files keep their bytes, nothing outside the project changes.

USERS_PAGE = b"<!doctype html><title>My portfolio</title><p>Hand-written, not a contact sheet.\n"
USERS_README = b"# My project\n\nNotes nobody else has a copy of.\n"


def _plain_png(colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _edit_results(project: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = project / "results.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    edit(document)
    path.write_text(json.dumps(document), encoding="utf-8")


def _orphan_naming(name: str) -> Callable[[Path], None]:
    """results.json gains an orphan entry naming `name` with that file's real size and SHA-256."""

    def commit(project: Path) -> None:
        data = (project / name).read_bytes()

        def edit(document: dict[str, Any]) -> None:
            entry = dict(document["shots"][0])
            entry.update(id="old-shot", file=name, bytes=len(data))
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            document["orphans"] = [entry]

        _edit_results(project, edit)

    return commit


def _eps_at_the_image(project: Path) -> None:
    # No cache entry to prefer: the sheet's thumbnail would be made from the committed file.
    shutil.rmtree(project / STATE_DIR / "cache")
    shutil.rmtree(project / STATE_DIR / "thumbs", ignore_errors=True)
    (project / "s1.png").write_bytes(hostile_images.eps())


def _cache_entry_copying_a_users_image(project: Path) -> None:
    logo = _plain_png()
    (project / "logo.png").write_bytes(logo)
    key = "c0" * 32
    entry = project / STATE_DIR / "cache" / key[:2] / f"{key}.png"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_bytes(logo)

    def edit(document: dict[str, Any]) -> None:
        orphan = dict(document["shots"][0])
        orphan.update(id="old-logo", key=key, file="old-logo.png")
        document["orphans"] = [orphan]

    _edit_results(project, edit)


def _results_field(
    field: str, value: Callable[[Path], Any], orphan: bool = False
) -> Callable[[Path], None]:
    """results.json's first shot (or an orphan copy of it) gets `field` = `value(project)`."""

    def commit(project: Path) -> None:
        def edit(document: dict[str, Any]) -> None:
            entry = document["shots"][0]
            if orphan:
                entry = dict(entry, id="old-shot")
                document["orphans"] = [entry]
            entry[field] = value(project)

        _edit_results(project, edit)

    return commit


def _outside_path(project: Path) -> str:
    return str(project.parent / "outside" / "x")


def _outside_victim(project: Path) -> str:
    return str(project.parent / "outside" / "victim.txt")


NO_FOLDERS = "(a file name in the output folder, no folders)"


def _users_page(project: Path) -> None:
    (project / "index.html").write_bytes(USERS_PAGE)


def _nothing(project: Path) -> None:
    pass


@dataclass(frozen=True)
class Committed:
    id: str
    commits: Callable[[Path], None]
    command: tuple[str, ...]  # "{manifest}" and "{project}" are substituted
    exit_code: int
    messages: tuple[str, ...] = ()  # each in the output, "{project}" substituted
    kept: tuple[str, ...] = ()  # files of the project whose bytes must not change


PATH_IN_STATE = [
    ("key-dotdot", _results_field("key", lambda project: "../../outside/x"), "'../../outside/x'"),
    ("key-absolute", _results_field("key", _outside_path), "/outside/x'"),
    ("file-dotdot", _results_field("file", lambda project: "../outside/victim.txt"), NO_FOLDERS),
    ("orphan-file-absolute", _results_field("file", _outside_victim, orphan=True), NO_FOLDERS),
]
COMMANDS = [("sheet", "{manifest}"), ("gc", "{manifest}", "--yes"), ("apply", "{manifest}")]


def _entry_replaced_by(value: Any) -> Callable[[Path], None]:
    def commit(project: Path) -> None:
        _edit_results(project, lambda document: document["shots"].__setitem__(0, value))

    return commit


# Hand-edited value types: the sheet formats every field, and crashed with a traceback.
TYPES_IN_STATE = [
    ("width-text", _results_field("width", lambda project: "wide"), "bad width"),
    ("prompt-list", _results_field("prompt", lambda project: ["a"]), "bad prompt (text, not"),
    ("size-number", _results_field("size", lambda project: 5), "bad size (text, not 5)"),
    ("entry-list", _entry_replaced_by([1, 2]), "an entry is a JSON list, not an object"),
]


def _thumbs_linked_outside(project: Path) -> None:
    thumbs = project / STATE_DIR / "thumbs"
    shutil.rmtree(thumbs, ignore_errors=True)
    thumbs.symlink_to(project.parent / "outside")


COMMITTED = [
    Committed(
        "thumbs-linked-outside-sheet",
        _thumbs_linked_outside,
        ("sheet", "{manifest}"),
        1,
        ("thumbs is a symbolic link",),
    ),
    *(
        Committed(
            f"{name}-sheet",
            commits,
            ("sheet", "{manifest}"),
            1,
            ("{project}/results.json cannot be read", shown),
        )
        for name, commits, shown in TYPES_IN_STATE
    ),
    *(
        Committed(
            f"{name}-{'-'.join(command[0::2])}",
            commits,
            command,
            1,
            ("{project}/results.json cannot be read", shown),
        )
        for name, commits, shown in PATH_IN_STATE
        for command in [*COMMANDS, ("apply", "{manifest}", "--prune")]
    ),
    Committed("eps-image-sheet", _eps_at_the_image, ("sheet", "{manifest}"), 0),
    Committed("eps-image-apply", _eps_at_the_image, ("apply", "{manifest}"), 0),
    Committed(
        "eps-image-inspect",
        _eps_at_the_image,
        ("inspect", "{project}/s1.png"),
        2,
        ("is not a PNG image",),
    ),
    Committed(
        "prune-orphan-naming-readme",
        _orphan_naming("README.md"),
        ("apply", "{manifest}", "--prune"),
        0,
        kept=("README.md",),
    ),
    Committed(
        "prune-orphan-naming-the-manifest",
        _orphan_naming("shots.yaml"),
        ("apply", "{manifest}", "--prune"),
        0,
        kept=("shots.yaml",),
    ),
    Committed(
        "gc-cache-entry-copying-a-users-image",
        _cache_entry_copying_a_users_image,
        ("gc", "{manifest}", "--yes"),
        0,
        kept=("logo.png",),
    ),
    Committed(
        "sheet-over-a-users-page",
        _users_page,
        ("sheet", "{manifest}"),
        1,
        ("{project}/index.html is not a contact sheet imgbatch drew", "output.dir"),
        kept=("index.html",),
    ),
    Committed(
        "apply-beside-a-users-page",
        _users_page,
        ("apply", "{manifest}"),
        0,
        ("{project}/index.html is not a contact sheet imgbatch drew",),
        kept=("index.html",),
    ),
]


def _outside(root: Path, project: Path) -> dict[str, bytes | None]:
    """Every path under `root` but the project's, with a file's bytes (None for a folder)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        if path == project or project in path.parents:
            continue
        found[str(path)] = path.read_bytes() if path.is_file() else None
    return found


@pytest.mark.parametrize("case", COMMITTED, ids=[case.id for case in COMMITTED])
def test_committed_files_run_nothing_and_lose_nothing_of_the_users(
    case: Committed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = hostile_images.fake_gs(tmp_path / "gs", monkeypatch)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_bytes(b"outside the project")
    project = tmp_path / "project"
    project.mkdir()
    manifest = write_manifest(project, IN_PLACE)
    (project / "README.md").write_bytes(USERS_README)
    assert apply(manifest).exit_code == 0
    case.commits(project)
    kept = {name: (project / name).read_bytes() for name in case.kept}
    outside = _outside(tmp_path, project)

    command = [part.format(manifest=manifest, project=project) for part in case.command]
    result = run(*command)

    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    assert result.exit_code == case.exit_code, result.output
    for message in case.messages:
        assert message.format(project=project) in " ".join(result.output.split()), result.output
    assert not marker.exists(), marker.read_text()
    assert {name: (project / name).read_bytes() for name in case.kept} == kept
    assert _outside(tmp_path, project) == outside


def test_the_sheet_replaces_a_page_it_drew_itself(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, IN_PLACE)
    assert apply(manifest).exit_code == 0
    page = tmp_path / "index.html"
    drawn = page.read_text(encoding="utf-8")
    page.write_text(drawn.replace("</title>", "</title><!-- stale -->"), encoding="utf-8")

    result = run("sheet", manifest)

    assert result.exit_code == 0, result.output
    assert page.read_text(encoding="utf-8") == drawn


@pytest.mark.parametrize("damaged", ["last-run.json", "state.json"])
def test_state_nested_too_deep_is_unreadable_not_a_crash(tmp_path: Path, damaged: str) -> None:
    """json.loads raises RecursionError, not a ValueError, on JSON nested past its depth: a
    last-run.json (it only decorates the sheet) or a state.json owner line of 100,000 "[" was
    "unexpected RecursionError" from `sheet` and `apply` instead of unreadable state."""
    manifest = write_manifest(tmp_path, IN_PLACE)
    assert apply(manifest).exit_code == 0
    path = tmp_path / STATE_DIR / damaged
    if damaged == "last-run.json":
        path.write_text("[" * 100_000)
    else:
        lines = path.read_text().splitlines()
        lines = [f'  "owner": {"[" * 100_000},' if '"owner"' in line else line for line in lines]
        path.write_text("\n".join(lines) + "\n")
    for command in ("sheet", "apply"):
        result = run(command, manifest)
        assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
