"""ImageRequest and its cache key; expand(): defaults, output folder, reference images."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from imgbatch.errors import ManifestError, PermanentError
from imgbatch.manifest import load_manifest
from imgbatch.manifest.catalogue import DEFAULT_MODEL, DEFAULT_SIZE
from imgbatch.manifest.reference import ReferenceImage, load_local_reference
from imgbatch.shots.expand import expand, output_dir_for
from imgbatch.shots.request import (
    KEY_FORMAT_VERSION,
    ImageRequest,
    changed_fields,
)
from tests.support.files import write_manifest
from tests.support.reference_images import JPEG, PNG, PNG_OTHER, image_bytes

PNG_BYTES = PNG
BASE = ImageRequest(prompt="a red bicycle", size="1328*1328", seed=7)
# Pinned (computed in another process, so it also shows the key is stable across runs):
# if this changes, every user's cache is invalidated; bump KEY_FORMAT_VERSION on purpose.
BASE_KEY = "563c9a1086291171dc5e9db5fd64ba1ff3649031e671bdc665b7252c17956dc2"


# --- the key ----------------------------------------------------------------------------------


def test_equal_requests_have_equal_keys() -> None:
    again = ImageRequest(prompt="a red bicycle", size="1328*1328", seed=7)
    assert again is not BASE
    assert again.key == BASE.key
    assert len(BASE.key) == 64
    int(BASE.key, 16)  # hex


def test_key_is_pinned_and_matches_its_documented_canonical_form() -> None:
    assert BASE.key == BASE_KEY
    payload = {
        "key_format": KEY_FORMAT_VERSION,
        "provider": "dashscope",
        "model": "qwen-image-max",
        "text": "a red bicycle",
        "size": "1328*1328",
        "seed": 7,
        "prompt_extend": False,
        "watermark": False,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(blob.encode("utf-8")).hexdigest() == BASE_KEY


REFERENCE_A = ReferenceImage.from_bytes(PNG)
REFERENCE_B = ReferenceImage.from_bytes(PNG_OTHER)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provider", "placeholder"),
        ("model", "qwen-image-plus"),
        ("prompt", "a blue bicycle"),
        ("size", "1664*928"),
        ("negative_prompt", "blurry"),
        ("seed", 8),
        ("style", "watercolour"),
        ("reference", REFERENCE_A),
        ("prompt_extend", True),
        ("watermark", True),
    ],
)
def test_key_changes_with_each_field(field: str, value: Any) -> None:
    changed = replace(BASE, **{field: value})
    assert changed.key != BASE.key


def test_key_changes_with_reference_content() -> None:
    with_a = replace(BASE, reference=REFERENCE_A)
    with_b = replace(BASE, reference=REFERENCE_B)
    assert with_a.key != with_b.key


def test_seed_unset_differs_from_seed_zero() -> None:
    assert replace(BASE, seed=None).key != replace(BASE, seed=0).key


def test_key_ignores_the_reference_path_when_the_content_is_equal(tmp_path: Path) -> None:
    first = tmp_path / "one" / "face.png"
    second = tmp_path / "elsewhere" / "renamed.png"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(PNG_BYTES)
    ref_one = load_local_reference("one/face.png", tmp_path, allow_outside=False)
    ref_two = load_local_reference("elsewhere/renamed.png", tmp_path, allow_outside=False)

    assert ref_one.source != ref_two.source
    assert ref_one.sha256 == ref_two.sha256
    assert ref_one.sha256 == hashlib.sha256(PNG_BYTES).hexdigest()
    assert replace(BASE, reference=ref_one).key == replace(BASE, reference=ref_two).key


def test_key_ignores_shot_id_and_output_file(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n"
        "  - id: first\n    prompt: same\n    seed: 1\n"
        "  - id: second\n    prompt: same\n    seed: 1\n",
    )
    first, second = expand(load_manifest(path), provider="dashscope", environ={}).shots
    assert (first.id, first.file) != (second.id, second.file)
    assert first.request == second.request
    assert first.request.key == second.request.key


def test_same_text_written_two_ways_gives_the_same_key() -> None:
    # The key covers the text sent, not how the manifest spelt it.
    styled = ImageRequest(prompt="a bicycle  ", style="ink")
    inline = ImageRequest(prompt="a bicycle\nStyle: ink")
    assert styled.key == inline.key


def test_canonical_leaves_out_unset_fields() -> None:
    request = ImageRequest(prompt="p")
    assert request.canonical() == {
        "provider": "dashscope",
        "model": DEFAULT_MODEL,
        "text": "p",
        "size": DEFAULT_SIZE,
        "prompt_extend": False,
        "watermark": False,
    }
    full = ImageRequest(
        prompt="p", negative_prompt="n", seed=3, style="s", reference=REFERENCE_A
    ).canonical()
    assert full["negative_prompt"] == "n"
    assert full["seed"] == 3
    assert full["text"] == "p\nStyle: s"
    assert full["reference_sha256"] == REFERENCE_A.sha256
    assert "style" not in full and "prompt" not in full and "reference" not in full


# --- text, parameters, dimensions -------------------------------------------------------------


def test_text_without_style_is_the_prompt_unchanged() -> None:
    assert ImageRequest(prompt="  a bicycle  ").text == "  a bicycle  "
    assert ImageRequest(prompt="a bicycle", style="").text == "a bicycle"


def test_text_appends_style_after_stripping_trailing_space() -> None:
    request = ImageRequest(prompt="a bicycle \n", style="35mm film")
    assert request.text == "a bicycle\nStyle: 35mm film"


def test_parameters_always_include_size_prompt_extend_and_watermark() -> None:
    assert ImageRequest(prompt="p", size="928*1664").parameters() == {
        "size": "928*1664",
        "prompt_extend": False,
        "watermark": False,
    }


def test_parameters_include_seed_and_negative_prompt_only_when_set() -> None:
    request = ImageRequest(
        prompt="p", seed=0, negative_prompt="blurry", prompt_extend=True, watermark=True
    )
    assert request.parameters() == {
        "size": DEFAULT_SIZE,
        "prompt_extend": True,
        "watermark": True,
        "seed": 0,
        "negative_prompt": "blurry",
    }
    assert "negative_prompt" not in ImageRequest(prompt="p", negative_prompt="").parameters()
    assert "style" not in request.parameters()


def test_dimensions() -> None:
    assert ImageRequest(prompt="p", size="1104*1472").dimensions == (1104, 1472)
    with pytest.raises(ValueError, match="is not W\\*H"):
        _ = ImageRequest(prompt="p", size="1104x1472").dimensions


# --- changed_fields ---------------------------------------------------------------------------


def test_changed_fields_names_what_differs_in_stable_order() -> None:
    old = BASE.canonical()
    new = replace(BASE, prompt="a blue bicycle", seed=9, watermark=True).canonical()
    assert changed_fields(old, new) == ["text", "seed", "watermark"]


def test_changed_fields_counts_added_and_removed_fields() -> None:
    old = replace(BASE, negative_prompt="blurry").canonical()
    new = replace(BASE, seed=None, reference=REFERENCE_A).canonical()
    assert changed_fields(old, new) == ["reference_sha256", "negative_prompt", "seed"]


def test_changed_fields_of_equal_requests_is_empty() -> None:
    assert changed_fields(BASE.canonical(), dict(BASE.canonical())) == []


# --- reference images -------------------------------------------------------------------------


def test_media_type_comes_from_the_decoded_format() -> None:
    assert ReferenceImage.from_bytes(JPEG).media_type == "image/jpeg"
    assert ReferenceImage.from_bytes(image_bytes("WEBP")).media_type == "image/webp"
    assert ReferenceImage.from_bytes(PNG).media_type == "image/png"


def test_reference_message_value_is_a_data_uri_or_the_url(tmp_path: Path) -> None:
    path = tmp_path / "face.jpg"
    path.write_bytes(JPEG)
    from_path = load_local_reference("face.jpg", tmp_path, allow_outside=False)
    assert from_path.media_type == "image/jpeg"
    assert from_path.data is None  # not held in memory
    expected = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode("ascii")
    assert from_path.message_value() == expected
    url = ReferenceImage("0" * 64, "https://example.invalid/face.png")
    assert url.is_url
    assert url.message_value() == "https://example.invalid/face.png"


# --- expand -----------------------------------------------------------------------------------


def test_expand_applies_defaults_and_shot_overrides(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
name: spot
defaults:
  model: qwen-image-plus
  size: "1328*1328"
  negative_prompt: blurry
  seed: 11
  watermark: true
shots:
  - id: a
    prompt: first
  - id: b
    prompt: second
    size: "928*1664"
    seed: 12
    style: ink
    negative_prompt: ""
    prompt_extend: true
  - id: c
    prompt: bare
    model: qwen-image-max
""",
    )
    expansion = expand(load_manifest(path), provider="placeholder", environ={})

    assert expansion.provider == "placeholder"
    assert [(shot.id, shot.file) for shot in expansion.shots] == [
        ("a", "a.png"),
        ("b", "b.png"),
        ("c", "c.png"),
    ]
    a, b, c = (shot.request for shot in expansion.shots)
    assert a == ImageRequest(
        prompt="first",
        model="qwen-image-plus",
        size="1328*1328",
        negative_prompt="blurry",
        seed=11,
        watermark=True,
        provider="placeholder",
    )
    # An empty negative prompt means none: it is neither sent nor part of the key.
    assert b == ImageRequest(
        prompt="second",
        model="qwen-image-plus",
        size="928*1664",
        negative_prompt=None,
        style="ink",
        seed=12,
        prompt_extend=True,
        watermark=True,
        provider="placeholder",
    )
    assert c.model == "qwen-image-max"
    assert (c.size, c.seed, c.prompt_extend) == ("1328*1328", 11, False)


def test_expand_without_defaults_uses_imgbatch_defaults(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: p\n")
    (shot,) = expand(load_manifest(path), provider="dashscope", environ={}).shots
    assert shot.request == ImageRequest(prompt="p")
    assert shot.request.model == DEFAULT_MODEL == "qwen-image-max"
    assert shot.request.size == DEFAULT_SIZE == "1664*928"
    assert (shot.request.prompt_extend, shot.request.watermark) == (False, False)


def test_provider_is_part_of_every_key(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: p\n")
    manifest = load_manifest(path)
    (real,) = expand(manifest, provider="dashscope", environ={}).shots
    (fake,) = expand(manifest, provider="placeholder", environ={}).shots
    assert real.request.key != fake.request.key


def test_output_dir_is_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    path = write_manifest(
        tmp_path / "manifests",
        "version: 1\nname: spot\noutput:\n  dir: ../renders/here\ntrust:\n  output_outside: true\n"
        "shots:\n  - id: a\n    prompt: p\n",
    )
    expansion = expand(load_manifest(path), provider="placeholder", environ={})
    assert expansion.output_dir == tmp_path / "manifests" / "../renders/here"
    assert expansion.output_dir.resolve() == tmp_path / "renders" / "here"


def test_default_output_dir_is_output_name_next_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    named = write_manifest(
        tmp_path / "manifests", "version: 1\nname: spot\nshots:\n  - id: a\n    prompt: p\n"
    )
    unnamed = write_manifest(
        tmp_path / "manifests",
        "version: 1\nshots:\n  - id: a\n    prompt: p\n",
        name="teaser.yaml",
    )
    assert output_dir_for(load_manifest(named), {}) == tmp_path / "manifests" / "output" / "spot"
    assert output_dir_for(load_manifest(unnamed), {}) == (
        tmp_path / "manifests" / "output" / "teaser"
    )


def test_output_dir_env_replaces_the_base(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nname: spot\noutput:\n  dir: renders\nshots:\n  - id: a\n    prompt: p\n",
    )
    manifest = load_manifest(path)
    elsewhere = tmp_path / "ci-artifacts"
    environ = {"OUTPUT_DIR": str(elsewhere)}

    assert expand(manifest, provider="placeholder", environ=environ).output_dir == (
        elsewhere / "spot"
    )
    # Empty means unset.
    assert output_dir_for(manifest, {"OUTPUT_DIR": ""}) == tmp_path / "renders"


def test_output_dir_env_does_not_leak_from_the_process_when_environ_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "from-process"))
    path = write_manifest(tmp_path, "version: 1\nname: spot\nshots:\n  - id: a\n    prompt: p\n")
    manifest = load_manifest(path)
    assert output_dir_for(manifest, {}) == tmp_path / "output" / "spot"
    assert output_dir_for(manifest) == tmp_path / "from-process" / "spot"


def test_expand_hashes_reference_images_by_content(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "face.png").write_bytes(PNG_BYTES)
    (tmp_path / "refs" / "copy.png").write_bytes(PNG_BYTES)
    (tmp_path / "refs" / "other.jpg").write_bytes(JPEG)
    path = write_manifest(
        tmp_path,
        """\
version: 1
defaults:
  reference_image: refs/face.png
shots:
  - id: a
    prompt: p
  - id: b
    prompt: p
    reference_image: refs/copy.png
  - id: c
    prompt: p
    reference_image: refs/other.jpg
  - id: d
    prompt: p
    reference_image: ./refs/../refs/face.png
""",
    )
    a, b, c, d = (
        shot.request for shot in expand(load_manifest(path), provider="dashscope", environ={}).shots
    )
    assert a.reference is not None and c.reference is not None
    assert a.reference.sha256 == hashlib.sha256(PNG_BYTES).hexdigest()
    assert a.reference.source == str((tmp_path / "refs" / "face.png").resolve())
    assert a.reference.media_type == "image/png"
    assert c.reference.media_type == "image/jpeg"
    # Same bytes under another name: same key. Other bytes: another key.
    assert a.key == b.key == d.key
    assert a.key != c.key


def test_expand_reads_a_local_reference_once_at_validation(tmp_path: Path) -> None:
    reference = tmp_path / "face.png"
    reference.write_bytes(PNG_BYTES)
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: p\n    reference_image: face.png\n"
    )
    manifest = load_manifest(path)
    reference.unlink()  # expand keys what validation read; it does not read again

    (shot,) = expand(manifest, provider="dashscope", environ={}).shots
    assert shot.request.reference is not None
    assert shot.request.reference.sha256 == hashlib.sha256(PNG_BYTES).hexdigest()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("delete", "cannot be read: No such file or directory"),
        ("rewrite", "changed after it was checked"),
        ("folder", "is a folder"),
        ("huge", "the limit is 10.0 MiB"),
    ],
)
def test_a_reference_changed_after_validation_is_not_sent(
    tmp_path: Path, change: str, expected: str
) -> None:
    reference = tmp_path / "face.png"
    reference.write_bytes(PNG_BYTES)
    checked = load_local_reference("face.png", tmp_path, allow_outside=False)
    if change == "delete":
        reference.unlink()
    elif change == "rewrite":
        reference.write_bytes(PNG_OTHER)
    elif change == "folder":
        reference.unlink()
        reference.mkdir()
    else:
        with reference.open("r+b") as handle:
            handle.truncate(11 * 1024 * 1024)

    with pytest.raises(PermanentError) as caught:
        checked.message_value()
    assert str(caught.value).startswith(f"reference image {reference} ")
    assert expected in str(caught.value)


def test_whole_float_seed_is_the_same_request_as_the_integer(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: a\n    prompt: p\n    seed: 5.0\n"
        "  - id: b\n    prompt: p\n    seed: 5\n",
    )
    try:
        manifest = load_manifest(path)
    except ManifestError as error:  # refusing it is a fix too
        assert [problem.where for problem in error.problems] == ["shot a, field seed"]
        return
    as_float, as_int = expand(manifest, provider="dashscope", environ={}).shots
    assert type(as_float.request.seed) is int
    assert as_float.request.key == as_int.request.key
