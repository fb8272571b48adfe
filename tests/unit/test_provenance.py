"""Provenance in every PNG imgbatch writes, and `imgbatch inspect`.

Takes: real-sized noisy PNGs (the fake server's encoder), the fake DashScope server, the
placeholder provider, and the CLI through click's runner.
Gives: evidence that the chunks are spliced in losslessly (same pixels, the provider's bytes
kept), that Pillow reads every field back (a non-ASCII prompt included), that every image
`apply` (real and placeholder) and `generate` write carries them, that results.json's `sha256`
and `bytes` describe the file as written, that a restore gives back the very same bytes, that the
API key never goes in, and that `inspect` prints them or exits 2 saying why it cannot.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from imgbatch.cli.main import main
from imgbatch.pacing.gate import RetryPolicy
from imgbatch.png import read_provenance
from imgbatch.review.provenance import FIELDS, Provenance, Stamper, embed
from imgbatch.run.apply import ApplyOptions, apply
from imgbatch.shots.request import ImageRequest
from tests.cli.test_startup import loaded_after
from tests.support.fake_dashscope import FakeDashScope, _encode_real_png
from tests.support.files import FAKE_KEY, write_manifest
from tests.support.reference_images import JPEG

# Chinese, accents and an emoji: what a tEXt chunk (Latin-1) could not hold.
NON_ASCII = "一只在黄昏骑行的自行车手，柔和的轮廓光 — café crème 🚴"
MANIFEST = f"""\
version: 1
name: traced
defaults:
  size: "1328*1328"
  negative_prompt: "blurry, watermark"
shots:
  - id: s01-dusk
    prompt: "{NON_ASCII}"
    seed: 1234
    style: "film photography"
  - id: s02-plain
    prompt: "a studio product photo of a cycling helmet"
"""


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def inspected(path: Path) -> dict[str, Any]:
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def chunk_types(data: bytes) -> list[bytes]:
    kinds, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kinds.append(data[position + 4 : position + 8])
        position += 12 + length
    return kinds


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


REQUEST = ImageRequest(
    prompt=NON_ASCII, size="1664*928", seed=42, negative_prompt="blurry", style="ink"
)


def test_the_chunks_are_spliced_in_losslessly_and_pillow_reads_every_field() -> None:
    original = _encode_real_png(1664, 928, (200, 40, 90))  # 3.5 MB of mostly noise
    assert len(original) > 3_000_000
    stamped = embed(original, Provenance("s01", REQUEST, REQUEST.text, "req-7d2c"))

    # The provider's bytes are all still there, in order: signature and IHDR, then ours, then
    # the rest untouched (no re-encode).
    assert stamped[:33] == original[:33] and stamped.endswith(original[33:])
    kinds = chunk_types(stamped)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert set(kinds[1 : kinds.index(b"IDAT")]) == {b"iTXt"}  # before the image data
    with Image.open(io.BytesIO(stamped)) as image, Image.open(io.BytesIO(original)) as before:
        text = dict(image.text)  # read before IDAT: no decode needed
        assert image.tobytes() == before.tobytes()
        assert (image.size, image.mode) == (before.size, before.mode)
    assert text["imgbatch:prompt"] == NON_ASCII
    assert text["imgbatch:prompt_sent"] == f"{NON_ASCII}\nStyle: ink"
    assert text["imgbatch:shot"] == "s01"
    assert text["imgbatch:seed"] == "42"
    assert text["imgbatch:request_id"] == "req-7d2c"
    assert text["imgbatch:key"] == REQUEST.key
    assert text["imgbatch:version"] == version("imgbatch")
    assert set(text) == {f"imgbatch:{name}" for name in FIELDS if name != "reference_sha256"}


def test_stamping_again_replaces_the_fields_and_a_planted_field_does_not_survive() -> None:
    original = _encode_real_png(1328, 1328, (0, 0, 0))
    # A service (or proxy) that plants its own "provenance" in the image it serves.
    body = b"imgbatch:shot\0forged"
    planted_chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    planted_chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body))
    planted = original[:33] + planted_chunk + original[33:]
    request = ImageRequest(prompt="a helmet", size="1328*1328")
    once = embed(planted, Provenance("s02", request, request.text, None))
    twice = embed(once, Provenance("s03", request, request.text, None))
    assert read_provenance(once)["imgbatch:shot"] == "s02"
    assert read_provenance(twice)["imgbatch:shot"] == "s03"
    assert b"forged" not in once
    assert chunk_types(twice).count(b"iTXt") == chunk_types(once).count(b"iTXt")
    assert twice.endswith(original[33:])


def test_bytes_that_are_not_a_png_are_written_unchanged() -> None:
    request = ImageRequest(prompt="a helmet", size="1328*1328")
    assert embed(JPEG, Provenance("s01", request, request.text, None)) == JPEG


def stamped_in_pieces(data: bytes, provenance: Provenance, size: int) -> bytes:
    stamper = Stamper(provenance)
    out: list[bytes] = []
    for start in range(0, len(data), size):
        out += (bytes(piece) for piece in stamper.feed(data[start : start + size]))
    return b"".join(out) + stamper.end()


def text_chunk(kind: bytes, body: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + body))
    return struct.pack(">I", len(body)) + kind + body + crc


@pytest.mark.parametrize("size", [1, 2, 7, 33, 41, 4096, 1 << 20])
def test_a_download_stamped_piece_by_piece_is_what_embed_makes_of_the_whole(size: int) -> None:
    """The executor stamps an image as it arrives, in pieces cut anywhere (in a chunk header,
    a planted field's keyword, the CRC): the file is byte for byte what `embed` makes."""
    original = _encode_real_png(96, 64, (10, 20, 30))
    planted = (
        original[:33]
        + text_chunk(b"tEXt", b"imgbatch:shot\0forged")
        + text_chunk(b"iTXt", b"Comment\0\0\0\0\0kept")
        + text_chunk(b"tEXt", b"")
        + original[33:]
        + b"after IEND"
    )
    provenance = Provenance("s01", REQUEST, REQUEST.text, "req-7d2c")
    for data in (original, planted, JPEG, b"", original[:20], original[:-6]):
        assert stamped_in_pieces(data, provenance, size) == embed(data, provenance)
    assert b"forged" not in stamped_in_pieces(planted, provenance, size)


@pytest.mark.real_images  # stamped without re-encoding megabytes
def test_apply_stamps_every_image_and_results_describe_the_file_as_written(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    result = run("apply", manifest)
    assert result.exit_code == 0, result.output
    out = tmp_path / "output" / "traced"
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    entries = {entry["id"]: entry for entry in document["shots"]}
    for shot_id, entry in entries.items():
        path = out / entry["file"]
        data = path.read_bytes()
        assert len(data) > 1_000_000  # a real-sized image, whole
        assert entry["sha256"] == sha256(path) and entry["bytes"] == len(data)
        assert FAKE_KEY.encode() not in data
        # The cache holds the bytes as written: a restore puts back this very file.
        (cached,) = (out / ".imgbatch" / "cache").rglob(f"{entry['key']}.png")
        assert cached.read_bytes() == data
        fields = inspected(path)
        assert fields["shot"] == shot_id
        assert fields["prompt_sent"] == entry["prompt_sent"]
        assert fields["prompt"] == entry["prompt"]
        assert fields["negative_prompt"] == "blurry, watermark"
        assert fields["size"] == "1328*1328"
        assert fields["model"] == entry["model"] == "qwen-image-max"
        assert fields["provider"] == "dashscope"
        assert fields["key"] == entry["key"]
        assert fields["request_id"] == entry["request_id"] and len(entry["request_id"]) == 36
        assert fields["version"] == version("imgbatch")
    dusk = inspected(out / "s01-dusk.png")
    assert dusk["seed"] == 1234 and dusk["style"] == "film photography"
    assert dusk["prompt_sent"] == f"{NON_ASCII}\nStyle: film photography"
    plain = inspected(out / "s02-plain.png")
    assert plain["seed"] is None and plain["style"] is None
    with Image.open(out / "s01-dusk.png") as image:
        assert image.text["imgbatch:prompt"] == NON_ASCII  # any PNG reader sees it
    # What was sent is the text the image says was sent.
    sent = {r.body["input"]["messages"][0]["content"][-1]["text"] for r in fake_server.requests}
    assert dusk["prompt_sent"] in sent


def test_a_restore_puts_back_the_same_bytes_and_a_rename_keeps_the_shot_it_was_made_for(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    assert run("apply", manifest).exit_code == 0
    out = tmp_path / "output" / "traced"
    original = (out / "s01-dusk.png").read_bytes()
    (out / "s01-dusk.png").unlink()
    manifest.write_text(MANIFEST.replace("id: s02-plain", "id: s02-renamed"), encoding="utf-8")

    result = run("apply", manifest)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == 2  # both restored from the cache
    assert (out / "s01-dusk.png").read_bytes() == original
    assert (out / "s02-renamed.png").read_bytes() == (out / "s02-plain.png").read_bytes()
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for entry in document["shots"]:
        assert entry["status"] == "cached"
        assert entry["sha256"] == sha256(out / entry["file"])
    # The image was made for s02-plain (its request id is that generation's): it says so.
    assert inspected(out / "s02-renamed.png")["shot"] == "s02-plain"
    # And a later restore still trusts the cache entry: nothing is paid for again.
    (out / "s02-renamed.png").unlink()
    assert run("apply", manifest).exit_code == 0
    assert fake_server.generation_count == 2


def test_placeholder_images_carry_provenance_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    manifest = write_manifest(tmp_path, MANIFEST)
    result = run("apply", manifest, "--provider", "placeholder")
    assert result.exit_code == 0, result.output
    out = tmp_path / "output" / "traced"
    (entry, _) = json.loads((out / "results.json").read_text(encoding="utf-8"))["shots"]
    fields = inspected(out / entry["file"])
    assert fields["provider"] == "placeholder"
    assert fields["request_id"] is None  # no service, no request id
    assert fields["shot"] == "s01-dusk" and fields["prompt"] == NON_ASCII
    assert entry["sha256"] == sha256(out / entry["file"])


def test_generate_stamps_its_image(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    request = {"prompt": NON_ASCII, "size": "928*1664", "seed": 5, "negative_prompt": "text"}
    result = run("generate", "--request", json.dumps(request), "--print-response")
    assert result.exit_code == 0, result.output
    response = json.loads(result.stdout)
    fields = inspected(Path(response["file"]))
    assert fields["request_id"] == response["request_id"]
    assert (fields["prompt_sent"], fields["seed"], fields["size"]) == (NON_ASCII, 5, "928*1664")
    assert fields["negative_prompt"] == "text"
    assert fields["shot"] == "request"  # generate has no shot id; the request is its one shot


# A shot whose simplified request (after a 200 without an image) sends only its first sentence.
TWO_SENTENCES = (
    "version: 1\nname: imageless\nshots:\n  - id: s01\n"
    "    prompt: A lighthouse at night. Waves crash below.\n    style: oil painting\n"
)


def test_a_simplified_request_records_the_text_actually_sent(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, TWO_SENTENCES)
    fake_server.no_image_next()
    assert run("apply", manifest).exit_code == 0
    fields = inspected(tmp_path / "output" / "imageless" / "s01.png")
    assert fields["prompt_sent"] == "A lighthouse at night."
    assert fields["prompt"] == "A lighthouse at night. Waves crash below."


def test_a_recovered_simplified_image_keeps_its_simplified_text(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, TWO_SENTENCES)
    options = ApplyOptions(
        retry=RetryPolicy(base_delay=0.001, max_delay=0.01, download_attempts=1),
        environ=api_env,
        home=Path(api_env["HOME"]),
    )
    fake_server.no_image_next()
    fake_server.cut_next_download()
    (entry,) = apply(manifest, options).entries
    assert entry.status == "unfetched" and entry.image_url and entry.simplified
    (entry,) = apply(manifest, options).entries
    assert fake_server.generation_count == 2  # the image paid for was fetched, not made again
    assert entry.status == "generated" and entry.simplified
    assert entry.prompt_sent == "A lighthouse at night."
    out = tmp_path / "output" / "imageless"
    assert inspected(out / "s01.png")["prompt_sent"] == "A lighthouse at night."


def test_inspect_prints_aligned_lines(tmp_path: Path) -> None:
    path = tmp_path / "s01.png"
    request = ImageRequest(prompt="a helmet", size="1328*1328", seed=7, style="studio")
    path.write_bytes(
        embed(
            _encode_real_png(1328, 1328, (1, 2, 3)), Provenance("s01", request, request.text, "r")
        )
    )
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "shot:          s01",
        "prompt_sent:   a helmet",
        "               Style: studio",  # a value's second line, under the first
    ]
    assert lines[-1] == f"version:       {version('imgbatch')}"
    for line in lines:  # every value starts in the same column
        label, value = line[:15], line[15:]
        assert label.rstrip().endswith(":") or not label.strip(), line
        assert value and not value.startswith(" "), line


def test_inspect_shows_control_characters_escaped(tmp_path: Path) -> None:
    # A PNG from anywhere may carry escape sequences that would clear or retitle the terminal.
    path = tmp_path / "hostile.png"
    request = ImageRequest(prompt="a helmet\x1b[2J\x1b]0;owned\x07", size="1328*1328")
    plain = _encode_real_png(1328, 1328, (9, 9, 9))
    path.write_bytes(embed(plain, Provenance("s01", request, request.text, None)))
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "prompt:        a helmet\\x1b[2J\\x1b]0;owned\\x07" in result.stdout
    assert inspected(path)["prompt"] == request.prompt  # JSON escapes them itself


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "missing.png: no such file"),
        ("folder.png", "folder", "folder.png is not a file"),
        ("photo.jpg", JPEG, "photo.jpg is not a PNG image"),
        ("plain.png", "plain", "plain.png has no imgbatch provenance"),
        ("cut.png", "cut", "cut.png is a damaged PNG: it is cut short before its end"),
    ],
)
def test_inspect_exits_2_naming_the_file_when_there_is_nothing_to_show(
    tmp_path: Path, name: str, content: bytes | str | None, message: str
) -> None:
    path = tmp_path / name
    request = ImageRequest(prompt="a helmet", size="1328*1328")
    plain = _encode_real_png(1328, 1328, (9, 9, 9))
    if content == "folder":
        path.mkdir()
    elif content == "plain":
        path.write_bytes(plain)
    elif content == "cut":
        stamped = embed(plain, Provenance("s01", request, request.text, None))
        path.write_bytes(stamped[:1000])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    result = run("inspect", path, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"error: {tmp_path / message}" in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_inspect_loads_no_image_library(tmp_path: Path) -> None:
    path = tmp_path / "s01.png"
    request = ImageRequest(prompt="a helmet", size="1328*1328")
    path.write_bytes(embed(_encode_real_png(1328, 1328, (1, 2, 3)), Provenance(
        "s01", request, request.text, None)))  # fmt: skip
    assert loaded_after("inspect", str(path)) == set()
