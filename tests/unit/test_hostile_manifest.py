"""Hostile and careless manifests, through the CLI: a clean error, exit 2, nothing sent or written.

Takes: one case per row (a manifest or a thing standing where a manifest should be, the command,
what the message must name) and the fake DashScope server. Gives: evidence that each case ends in
exit 2 with a message naming the file and the field, that the server received nothing, and that
nothing appeared on disk. Cases that need a server of their own (a reference URL that drips its
body) follow the table.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgbatch.cli.main import main
from tests.support import hostile_images
from tests.support.fake_dashscope import FakeDashScope
from tests.support.reference_images import PNG, image_bytes

SECRET = "DASHSCOPE_API_KEY=sk-not-to-be-sent-0123456789"
SHOT = "shots:\n  - id: a\n    prompt: a red bicycle\n"
# 363 bytes (the was 377): nine aliases per level, nine levels: 9**9 strings expanded.
BILLION_LAUGHS = (
    "version: 1\n"
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
    "shots: *i\n"
)


@dataclass(frozen=True)
class Case:
    """`setup` builds the project in a folder and returns the manifest path to pass."""

    name: str
    setup: Callable[[Path], Path]
    expected: tuple[str, ...]  # each must appear in the output; "{manifest}" is substituted
    args: tuple[str, ...] = ()
    command: str = "apply"


def manifest(text: str) -> Callable[[Path], Path]:
    def setup(project: Path) -> Path:
        path = project / "shots.yaml"
        path.write_bytes(text.encode("utf-8"))
        return path

    return setup


def with_reference(make: Callable[[Path], str], extra: str = "") -> Callable[[Path], Path]:
    """A valid one-shot manifest whose reference_image is what `make` prepares and returns."""

    def setup(project: Path) -> Path:
        written = make(project)
        return manifest(f'version: 1\n{extra}{SHOT}    reference_image: "{written}"\n')(project)

    return setup


def fifo_at(relative: str) -> Callable[[Path], str]:
    def make(project: Path) -> str:
        os.mkfifo(project / relative)
        return relative

    return make


def file_at(relative: str, data: bytes) -> Callable[[Path], str]:
    def make(project: Path) -> str:
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        (project / relative).write_bytes(data)
        return relative

    return make


def sparse_file(relative: str, size: int) -> Callable[[Path], str]:
    def make(project: Path) -> str:
        with (project / relative).open("wb") as handle:
            handle.truncate(size)
        return relative

    return make


def folder(project: Path) -> str:
    (project / "refs").mkdir()
    return "refs"


def secret_outside(project: Path) -> Path:
    """A file outside the project holding a secret, as /etc/shadow or /proc/self/environ do."""
    secret = project.parent / "outside" / "environ"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text(SECRET)
    return secret


def link_to_secret(project: Path) -> str:
    (project / "refs").mkdir()
    (project / "refs" / "face.png").symlink_to(secret_outside(project))
    return "refs/face.png"


def absolute_secret(project: Path) -> str:
    return str(secret_outside(project))


def dotdot_secret(project: Path) -> str:
    secret_outside(project)
    return "../outside/environ"


def real_file(path: str) -> Callable[[Path], Path]:
    return lambda project: Path(path)


def a_fifo(project: Path) -> Path:
    os.mkfifo(project / "shots.yaml")
    return project / "shots.yaml"


def oversized(project: Path) -> Path:
    path = project / "shots.yaml"
    with path.open("wb") as handle:
        handle.truncate(65 * 1024 * 1024)
    return path


def output_at(make: Callable[[Path], str], extra: str = "") -> Callable[[Path], Path]:
    """A valid one-shot manifest whose output.dir is what `make` prepares and returns."""

    def setup(project: Path) -> Path:
        text = f'version: 1\noutput:\n  dir: "{make(project)}"\n{extra}{SHOT}'
        return manifest(text)(project)

    return setup


def store_at(make: Callable[[Path], str]) -> Callable[[Path], Path]:
    """A valid one-shot manifest whose output.store is what `make` prepares and returns."""

    def setup(project: Path) -> Path:
        text = f'version: 1\noutput:\n  store: "{make(project)}"\n{SHOT}'
        return manifest(text)(project)

    return setup


def link_outside(name: str) -> Callable[[Path], str]:
    """A link in the project, `name`, to a folder beside the project."""

    def make(project: Path) -> str:
        (project.parent / "elsewhere").mkdir(exist_ok=True)
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).symlink_to(project.parent / "elsewhere")
        return name

    return make


def default_output_through(make: Callable[[Path], str]) -> Callable[[Path], Path]:
    """A valid one-shot manifest named `out` with no output.dir, once `make` prepared the
    project (a link where its default output folder goes)."""

    def setup(project: Path) -> Path:
        make(project)
        return manifest(f"version: 1\nname: out\n{SHOT}")(project)

    return setup


def nested(depth: int) -> str:
    return "version: 1\n" + SHOT + "defaults: " + "{a: " * depth + "1" + "}" * depth + "\n"


CASES = [
    # --- limits.rps: NaN and infinity pass JSON Schema's minimum; nan sends nothing, forever.
    Case("rps-nan", manifest(f"version: 1\nlimits:\n  rps: .nan\n{SHOT}"),
         ("{manifest}:3:8", "field limits.rps", "finite")),
    Case("rps-inf", manifest(f"version: 1\nlimits:\n  rps: .inf\n{SHOT}"),
         ("{manifest}:3:8", "field limits.rps", "finite")),
    Case("rps-tiny", manifest(f"version: 1\nlimits:\n  rps: 1.0e-300\n{SHOT}"),
         ("{manifest}:3:8", "field limits.rps", "at least 0.001")),
    Case("cli-rps-nan", manifest(f"version: 1\n{SHOT}"), ("'--rps'", "finite"), ("--rps", "nan")),
    Case("cli-rps-inf", manifest(f"version: 1\n{SHOT}"), ("'--rps'", "finite"), ("--rps", "inf")),
    Case("cli-rps-tiny", manifest(f"version: 1\n{SHOT}"), ("'--rps'", "0.001"),
         ("--rps", "1e-300")),
    # --- YAML that would take the loader (or what walks its data) forever.
    Case("alias-bomb", manifest(BILLION_LAUGHS),
         ("{manifest}:8:8", "aliases expand to more than 1,000,000 values (at *f)"),
         command="validate"),
    Case("nested-5000", manifest(nested(5000)), ("{manifest}:5:", "nested more than 64 levels")),
    Case("nul-in-yaml", manifest(f"version: 1\n{SHOT}    style: a\0b\n"),
         ("{manifest}:5:13", "YAML", "not allowed")),
    # --- patterns: Python's `$` matches before a final newline.
    Case("id-newline", manifest('version: 1\nshots:\n  - id: "s2\\n"\n    prompt: p\n'),
         ("{manifest}:3:9", "field id", "'s2\\n' is not valid")),
    Case("name-newline", manifest(f'version: 1\nname: "nl\\n"\n{SHOT}'),
         ("{manifest}:2:7", "field name", "'nl\\n' is not valid")),
    Case("size-newline", manifest(f'version: 1\n{SHOT}    size: "1328*1328\\n"\n'),
         ("{manifest}:5:11", "field size", "'1328*1328\\n' is not valid")),
    Case("output-dir-nul", manifest(f'version: 1\noutput:\n  dir: "out\\0put"\n{SHOT}'),
         ("{manifest}:3:8", "field output.dir", "control characters")),
    # --- output.dir: written only inside the manifest's folder tree unless trusted.
    Case("output-dir-absolute", output_at(lambda project: str(project.parent / "elsewhere")),
         ("{manifest}:3:8", "field output.dir", "outside the manifest's folder",
          "'trust: {output_outside: true}'")),
    Case("output-dir-dotdot", output_at(lambda project: "../elsewhere"),
         ("{manifest}:3:8", "field output.dir", "outside the manifest's folder")),
    Case("output-dir-link-outside", output_at(link_outside("renders")),
         ("{manifest}:3:8", "field output.dir", "outside the manifest's folder")),
    # With no output.dir, the folder is output/<name> beside the manifest: a committed link
    # there must not carry the writes outside either.
    Case("output-default-link-outside", default_output_through(link_outside("output")),
         ("{manifest}:2:7", "field name", "output/out", "outside the manifest's folder",
          "'trust: {output_outside: true}'")),
    Case("output-default-deeper-link", default_output_through(link_outside("output/out")),
         ("{manifest}:2:7", "field name", "outside the manifest's folder")),
    Case("output-dir-trusted-references-only",
         output_at(lambda project: "../elsewhere", "trust:\n  references_outside: true\n"),
         ("{manifest}:3:8", "field output.dir", "outside the manifest's folder")),
    # --- output.store, a folder: written (blobs, records, claims) as the output folder is, so
    # held to the same rule; it was written anywhere a shot list said (`../..`, `~/.ssh`).
    Case("output-store-dotdot", store_at(lambda project: "../shared-cache"),
         ("{manifest}:3:10", "field output.store", "outside the manifest's folder",
          "'trust: {output_outside: true}'", "--store")),
    Case("output-store-file-url", store_at(lambda project: f"file://{project.parent}/x"),
         ("{manifest}:3:10", "field output.store", "outside the manifest's folder")),
    Case("output-store-home", store_at(lambda project: "~/cache"),
         ("{manifest}:3:10", "field output.store", "outside the manifest's folder")),
    Case("output-store-link-outside", store_at(link_outside("cache")),
         ("{manifest}:3:10", "field output.store", "outside the manifest's folder")),
    # --- things that are not a manifest file.
    Case("dev-zero", real_file("/dev/zero"), ("/dev/zero", "not a regular file")),
    Case("fifo-manifest", a_fifo, ("{manifest}", "not a regular file"), command="validate"),
    Case("huge-manifest", oversized, ("{manifest}", "at most 64 MiB")),
    # --- reference_image: only images, only inside the manifest's folder unless trusted.
    Case("ref-link-outside", with_reference(link_to_secret),
         ("{manifest}:5:22", "shot a, field reference_image", "outside the manifest's folder")),
    Case("ref-absolute-outside", with_reference(absolute_secret),
         ("{manifest}:5:22", "shot a, field reference_image", "outside the manifest's folder")),
    Case("ref-dotdot-outside", with_reference(dotdot_secret),
         ("{manifest}:5:22", "shot a, field reference_image", "outside the manifest's folder")),
    Case("ref-proc-environ", with_reference(lambda project: "/proc/self/environ"),
         ("{manifest}:5:22", "field reference_image", "outside the manifest's folder")),
    Case("ref-proc-environ-trusted", with_reference(lambda project: "/proc/self/environ"),
         ("{manifest}:5:22", "field reference_image", "is empty"),
         ("--allow-reference-outside",)),
    Case("ref-secret-trusted-in-manifest",
         with_reference(absolute_secret, extra="trust:\n  references_outside: true\n"),
         ("{manifest}:7:22", "field reference_image", "not a readable image")),
    Case("ref-folder", with_reference(folder), ("{manifest}:5:22", "is a folder")),
    Case("ref-fifo", with_reference(fifo_at("face.png")),
         ("{manifest}:5:22", "FIFO", "was not opened")),
    Case("ref-empty", with_reference(file_at("face.png", b"")), ("{manifest}:5:22", "is empty")),
    Case("ref-not-an-image", with_reference(file_at("face.png", SECRET.encode())),
         ("{manifest}:5:22", "not a readable image")),
    Case("ref-too-large", with_reference(sparse_file("face.png", 11 * 1024 * 1024)),
         ("{manifest}:5:22", "the limit is 10.0 MiB")),
    Case("ref-too-small", with_reference(file_at("face.png", image_bytes(size=(64, 64)))),
         ("{manifest}:5:22", "64x64 pixels", "from 384 to 3072")),
    Case("ref-other-format", with_reference(file_at("face.ppm", image_bytes("PPM"))),
         ("{manifest}:5:22", "PPM image", "accepted formats")),
    # Opened in the documented formats only: Pillow left to guess runs Ghostscript on an EPS.
    Case("ref-eps", with_reference(file_at("face.png", hostile_images.eps(1024, 1024))),
         ("{manifest}:5:22", "is a PostScript (EPS) document; accepted formats: JPEG, PNG")),
    Case("ref-dds", with_reference(file_at("face.png", hostile_images.dds_unknown_pixel_format())),
         ("{manifest}:5:22", "is a DDS image; accepted formats")),
    Case("ref-defaults-outside",
         manifest(f'version: 1\ndefaults:\n  reference_image: "../outside/x.png"\n{SHOT}'),
         ("{manifest}:3:20", "field defaults.reference_image", "outside the manifest's folder")),
    # --- control characters hidden by escapes: noise to the model, commands to a terminal.
    Case("prompt-escape", manifest('version: 1\nshots:\n  - id: a\n    prompt: "x\\e[2Jy"\n'),
         ("{manifest}:4:13", "shot a, field prompt", "control character U+001B at position 2")),
    Case("negative-nul", manifest(f'version: 1\n{SHOT}    negative_prompt: "n\\0"\n'),
         ("{manifest}:5:22", "field negative_prompt", "control character U+0000")),
    Case("style-c1", manifest(f'version: 1\n{SHOT}    style: "a\\x9bb"\n'),
         ("{manifest}:5:12", "field style", "control character U+009B")),
]  # fmt: skip


def tree(root: Path) -> dict[str, int]:
    """Every path under `root` with its size (folders -1): what a run may not change."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.join(dirpath, name)] = -1
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[path] = os.lstat(path).st_size
    return found


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_manifest_is_refused_cleanly(
    case: Case,
    tmp_path: Path,
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    path = case.setup(project)
    marker = hostile_images.fake_gs(tmp_path / "gs", monkeypatch)
    before = tree(tmp_path)

    result = CliRunner().invoke(main, [case.command, str(path), *case.args])
    assert not marker.exists()  # nothing handed to Ghostscript, whatever the bytes

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for expected in case.expected:
        assert expected.replace("{manifest}", str(path)) in result.output
    assert SECRET not in result.output
    assert fake_server.requests == []  # nothing sent
    assert tree(tmp_path) == before  # nothing written, nothing removed


# --- what a trusted reference may do, and what it may not --------------------------------------


def test_an_output_folder_outside_is_written_when_the_shot_list_trusts_it(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    text = (
        f"version: 1\nname: out\nprovider: placeholder\noutput:\n  dir: ../renders\n"
        f"trust:\n  output_outside: true\n{SHOT}"
    )
    path = manifest(text)(project)

    result = CliRunner().invoke(main, ["apply", str(path)])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "renders" / "a.png").is_file()


def test_a_folder_store_outside_is_used_when_the_shot_list_trusts_it(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    text = (
        f"version: 1\nname: out\nprovider: placeholder\noutput:\n  store: ../shared-cache\n"
        f"trust:\n  output_outside: true\n{SHOT}"
    )
    path = manifest(text)(project)

    result = CliRunner().invoke(main, ["apply", str(path)])

    assert result.exit_code == 0, result.output
    assert list((tmp_path / "shared-cache" / "cas").iterdir())


def test_a_reference_outside_is_sent_when_the_user_allows_it(
    tmp_path: Path, api_env: dict[str, str], fake_server: FakeDashScope
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    outside = tmp_path / "shared" / "face.png"
    outside.parent.mkdir()
    outside.write_bytes(PNG)
    (project / "face.png").symlink_to(outside)
    path = manifest(f'version: 1\n{SHOT}    reference_image: "face.png"\n')(project)

    refused = CliRunner().invoke(main, ["validate", str(path)])
    assert refused.exit_code == 2 and "outside the manifest's folder" in refused.output

    for command in (["validate"], ["plan", "--provider", "placeholder"]):
        allowed = CliRunner().invoke(main, [*command, str(path), "--allow-reference-outside"])
        assert allowed.exit_code == 0, allowed.output
    applied = CliRunner().invoke(main, ["apply", str(path), "--allow-reference-outside"])
    assert applied.exit_code == 0, applied.output
    assert len(fake_server.requests) >= 1


# --- a reference URL whose server drips its body ------------------------------------------------


class DripServer:
    """HTTP on 127.0.0.1 sending `length` bytes, `chunk` at a time, one every `interval` seconds.

    The length is announced in Content-Length when `declare` is true; else the body ends when
    the connection closes.
    """

    def __init__(self, length: int, interval: float, chunk: int = 1, declare: bool = True) -> None:
        self.length = length
        self.interval = interval
        self.chunk = chunk
        self.declare = declare
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/face.png"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.stopping = threading.Event()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            length = f"Content-Length: {self.length}" if self.declare else "Connection: close"
            connection.sendall(f"HTTP/1.1 200 OK\r\n{length}\r\n\r\n".encode("ascii"))
            try:
                while self.sent < self.length and not self.stopping.is_set():
                    size = min(self.chunk, self.length - self.sent)
                    connection.sendall(bytes(size))
                    self.sent += size
                    if self.interval:
                        time.sleep(self.interval)
            except OSError:  # the client hung up
                return

    def __enter__(self) -> DripServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(timeout=30)


@pytest.fixture
def drip() -> Iterator[DripServer]:
    # 40 bytes at one per 0.25 s: 10 s in all, each read well within any per-read timeout.
    with DripServer(length=40, interval=0.25) as server:
        yield server


def test_a_reference_url_dripping_its_body_is_cut_off_at_the_deadline(
    tmp_path: Path, drip: DripServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("imgbatch.manifest.reference.REFERENCE_URL_DEADLINE", 1.0, raising=False)
    path = manifest(f'version: 1\n{SHOT}    reference_image: "{drip.url}"\n')(tmp_path)

    # Only apply (and generate) fetch it, to key it by its content; validate and plan never do.
    result = CliRunner().invoke(main, ["apply", str(path), "--provider", "placeholder"])

    assert result.exit_code == 1, result.output  # the shot failed; nothing was sent for it
    assert f"failed a: field reference_image: '{drip.url}' cannot be fetched" in result.output
    assert "not received in full within 1 s" in result.output
    assert drip.sent < drip.length


@pytest.mark.parametrize(
    "command",
    [["validate"], ["plan", "--provider", "placeholder"], ["expand", "--json"]],
    ids=["validate", "plan", "expand"],
)
def test_validate_plan_and_expand_never_download_a_reference_url(
    tmp_path: Path, command: list[str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/face.png"
        path = manifest(f'version: 1\n{SHOT}    reference_image: "{url}"\n')(tmp_path)
        result = CliRunner().invoke(main, [*command, str(path)])
        assert result.exit_code == 0, result.output
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # a connection the command made would be waiting here


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "until-close"])
def test_a_reference_url_larger_than_the_cap_is_refused(tmp_path: Path, declare: bool) -> None:
    limit = 10 * 1024 * 1024
    with DripServer(limit + 1, interval=0, chunk=256 * 1024, declare=declare) as server:
        path = manifest(f'version: 1\n{SHOT}    reference_image: "{server.url}"\n')(tmp_path)
        result = CliRunner().invoke(main, ["apply", str(path), "--provider", "placeholder"])

    assert result.exit_code == 1, result.output
    assert "failed a: field reference_image: " in result.output
    assert "is larger than 10 MiB" in result.output
