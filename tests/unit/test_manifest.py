"""load_manifest: YAML with positions, the JSON Schema, the model rules, and their messages.

Every bad case asserts the whole message a user sees, so a lost line number, a wrong field name
or a missing hint fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import fastjsonschema
import jsonschema
import pytest
import yaml

from imgbatch.errors import ManifestError, ManifestProblem
from imgbatch.manifest import Limits, load_manifest, manifest_schema
from imgbatch.manifest import reference as reference_module
from imgbatch.manifest.catalogue import QWEN_IMAGE_SIZES, nearest_size
from tests.support.files import EXAMPLE, REPO, write_manifest
from tests.support.reference_images import PNG, PNG_OTHER

SUPPORTED = "1664*928, 1472*1104, 1328*1328, 1104*1472, 928*1664"
SHOT_ALLOWED = (
    "id, matrix, model, negative_prompt, pick, prompt, prompt_extend, reference_image, seed, "
    "size, style, variants, watermark"
)
# The loader uses libyaml when PyYAML has it; its syntax error texts differ from pure Python's.
LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))
TOP_ALLOWED = (
    "defaults, limits, name, output, pricing, provider, shots, simplify, trust, vars, version"
)


def manifest_error(path: Path) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return caught.value


def message_of(path: Path) -> str:
    return str(manifest_error(path))


def single(path: Path, line: int, column: int, where: str, message: str) -> str:
    """The whole text of a ManifestError holding exactly one problem."""
    return f"1 problem in the manifest:\n  {path}:{line}:{column}: {where}: {message}"


# --- valid manifests ---------------------------------------------------------------------------


def test_valid_manifest_loads_with_defaults_merged_and_shot_fields_winning(
    tmp_path: Path,
) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
name: spot
provider: placeholder
defaults:
  size: "1664*928"
  seed: 1234
  negative_prompt: blurry
output:
  dir: renders
limits:
  concurrency: 3
  rps: 1.5
shots:
  - id: s01
    prompt: a road at dawn
  - id: s02
    prompt: a helmet
    size: "1328*1328"
    seed: 7
""",
    )
    manifest = load_manifest(path)

    assert manifest.path == path
    assert manifest.base_dir == tmp_path
    assert manifest.name == "spot"
    assert manifest.provider == "placeholder"
    assert manifest.output_dir == "renders"
    assert manifest.limits == Limits(concurrency=3, rps=1.5)
    assert [shot.id for shot in manifest.shots] == ["s01", "s02"]
    assert [shot.index for shot in manifest.shots] == [0, 1]
    assert dict(manifest.shots[0].fields) == {
        "id": "s01",
        "prompt": "a road at dawn",
        "size": "1664*928",
        "seed": 1234,
        "negative_prompt": "blurry",
    }
    # The shot's own fields win over the defaults; untouched defaults still apply.
    assert dict(manifest.shots[1].fields) == {
        "id": "s02",
        "prompt": "a helmet",
        "size": "1328*1328",
        "seed": 7,
        "negative_prompt": "blurry",
    }


def test_minimal_manifest_takes_its_name_from_the_file(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n", name="my-spot.yaml"
    )
    manifest = load_manifest(path)

    assert manifest.name == "my-spot"
    assert manifest.provider is None
    assert manifest.output_dir is None
    assert manifest.limits == Limits(None, None)
    assert dict(manifest.shots[0].fields) == {"id": "a", "prompt": "x"}


def test_load_manifest_accepts_a_string_path(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n")
    assert load_manifest(str(path)).path == path


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
defaults: &base
  size: "1328*1328"
  seed: 5
shots:
  - &hero
    id: hero
    prompt: &text a red bicycle against a white wall
    style: studio
  - id: again
    prompt: *text
  - <<: *base
    id: merged
    prompt: merged shot
""",
    )
    manifest = load_manifest(path)

    hero, again, merged = manifest.shots
    assert again.fields["prompt"] == "a red bicycle against a white wall"
    assert hero.fields["style"] == "studio"
    assert dict(merged.fields) == {
        "id": "merged",
        "prompt": "merged shot",
        "size": "1328*1328",
        "seed": 5,
    }


def test_merge_key_fields_can_be_overridden(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
shots:
  - &hero
    id: hero
    prompt: hero shot
    seed: 3
  - <<: *hero
    id: hero-alt
    seed: 4
""",
    )
    manifest = load_manifest(path)

    assert dict(manifest.shots[1].fields) == {"id": "hero-alt", "prompt": "hero shot", "seed": 4}
    assert dict(manifest.shots[0].fields) == {"id": "hero", "prompt": "hero shot", "seed": 3}


def test_merge_key_list_earlier_sources_win(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
shots:
  - &one {id: a, prompt: p, seed: 1, size: "1328*1328"}
  - &two {id: b, prompt: q, seed: 2, style: ink}
  - <<: [*two, *one]
    id: c
""",
    )
    assert dict(load_manifest(path).shots[2].fields) == {
        "id": "c",
        "prompt": "q",
        "seed": 2,
        "style": "ink",
        "size": "1328*1328",
    }


def test_merge_key_of_a_scalar_is_a_problem(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: a\n    prompt: &p a prompt\n  - <<: *p\n    id: b\n"
        "    prompt: q\n",
    )
    error = manifest_error(path)
    assert [problem.line for problem in error.problems] == [5]


def test_reference_image_that_exists_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "face.png").write_bytes(PNG)
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: a\n    prompt: x\n    reference_image: refs/face.png\n",
    )
    assert load_manifest(path).shots[0].fields["reference_image"] == "refs/face.png"


def test_reference_image_url_is_not_checked_on_disk(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: a\n    prompt: x\n"
        "    reference_image: https://example.invalid/face.png\n",
    )
    assert load_manifest(path).shots[0].fields["reference_image"].startswith("https://")


def test_prompt_of_exactly_800_characters_is_accepted(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, f"version: 1\nshots:\n  - id: a\n    prompt: {'x' * 800}\n")
    assert len(load_manifest(path).shots[0].fields["prompt"]) == 800


def test_seed_bounds_are_inclusive(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: a\n    prompt: x\n    seed: 0\n"
        "  - id: b\n    prompt: x\n    seed: 2147483647\n",
    )
    assert [shot.fields["seed"] for shot in load_manifest(path).shots] == [0, 2147483647]


def test_example_manifest_validates_and_has_at_least_six_shots() -> None:
    manifest = load_manifest(EXAMPLE)

    assert manifest.name == "cyclist-spot"
    assert len(manifest.shots) >= 6
    ids = [shot.id for shot in manifest.shots]
    assert len({shot_id.casefold() for shot_id in ids}) == len(ids)
    assert all(shot.fields["size"] in QWEN_IMAGE_SIZES for shot in manifest.shots)


def test_shipped_schema_is_the_repository_schema() -> None:
    on_disk = json.loads((REPO / "schema" / "manifest.schema.json").read_text(encoding="utf-8"))
    assert manifest_schema() == on_disk
    assert manifest_schema()["$id"] == "urn:imgbatch:manifest:v1"


# --- file and YAML problems -------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    error = manifest_error(path)
    # About the whole file: no line or column.
    assert str(error) == f"1 problem in the manifest:\n  {path}: file: no such file"
    assert error.problems == (ManifestProblem(str(path), 0, 0, "file", "no such file"),)
    assert error.problems[0].to_json()["line"] is None


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write_manifest(tmp_path, text)
    assert message_of(path) == single(path, 1, 1, "file", "the file is empty")


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n\t- id: a\n")
    detail = (
        "found character that cannot start any token"
        if LIBYAML
        else "found character '\\t' that cannot start any token"
    )
    assert message_of(path) == single(path, 3, 1, "YAML", f"{detail}; not valid YAML")


def test_unclosed_flow_sequence_is_a_yaml_error(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: [unclosed\n")
    detail = (
        "did not find expected ',' or ']'"
        if LIBYAML
        else "expected ',' or ']', but got '<stream end>'"
    )
    assert message_of(path) == single(path, 5, 1, "YAML", f"{detail}; not valid YAML")


def test_undefined_alias_is_a_yaml_error(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: *nope\n")
    assert message_of(path) == single(
        path, 4, 13, "YAML", "found undefined alias 'nope'; not valid YAML"
    )


def test_second_yaml_document_is_refused(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: p\n---\nversion: 1\n"
    )
    assert message_of(path) == single(
        path, 5, 1, "file", "a second YAML document ('---'); a manifest is one document"
    )


def test_explicit_document_start_is_fine(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "---\nversion: 1\nshots:\n  - id: a\n    prompt: p\n")
    assert [shot.id for shot in load_manifest(path).shots] == ["a"]


def test_duplicate_key(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    prompt: y\n")
    assert message_of(path) == single(
        path,
        5,
        5,
        "shots[0], field prompt",
        "duplicate field 'prompt' (first given on line 4); keep one",
    )


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nversion: 1\nshots:\n  - id: a\n    prompt: x\n")
    assert message_of(path) == single(
        path, 2, 1, "field version", "duplicate field 'version' (first given on line 1); keep one"
    )


def test_document_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "- 1\n- 2\n")
    assert message_of(path) == single(path, 1, 1, "manifest", "expected a mapping, got [1, 2]")


# --- schema problems --------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshot:\n  - id: a\nshots:\n  - id: a\n    prompt: x\n"
    )
    assert message_of(path) == single(
        path, 2, 1, "field shot", "unknown field 'shot'; did you mean 'shots'?"
    )


def test_unknown_top_level_key_without_close_match_lists_allowed(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nbogus: 1\nshots:\n  - id: a\n    prompt: x\n")
    assert message_of(path) == single(
        path, 2, 1, "field bogus", f"unknown field 'bogus'; allowed: {TOP_ALLOWED}"
    )


def test_unknown_shot_key_suggests_prompt(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    promt: y\n")
    assert message_of(path) == single(
        path, 5, 5, "shot a, field promt", "unknown field 'promt'; did you mean 'prompt'?"
    )


def test_unknown_shot_key_without_close_match_lists_allowed_fields(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    colour: red\n"
    )
    assert message_of(path) == single(
        path, 5, 5, "shot a, field colour", f"unknown field 'colour'; allowed: {SHOT_ALLOWED}"
    )


def test_misspelt_prompt_also_reports_the_missing_prompt(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    promt: x\n")
    assert message_of(path) == (
        "2 problems in the manifest:\n"
        f"  {path}:3:5: shot a: missing required field 'prompt'\n"
        f"  {path}:4:5: shot a, field promt: unknown field 'promt'; did you mean 'prompt'?"
    )


def test_missing_prompt(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    seed: 1\n")
    assert message_of(path) == single(path, 3, 5, "shot a", "missing required field 'prompt'")


def test_missing_id_names_the_shot_by_index(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - prompt: x\n")
    assert message_of(path) == single(path, 3, 5, "shots[0]", "missing required field 'id'")


def test_wrong_types_for_seed_and_size(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    seed: abc\n    size: 1664\n"
    )
    assert message_of(path) == (
        "2 problems in the manifest:\n"
        f"  {path}:5:11: shot a, field seed: seed must be a whole number from 0 to 2147483647 "
        "or auto, got 'abc'\n"
        f"  {path}:6:11: shot a, field size: expected a string, got 1664"
    )


def test_boolean_seed_is_not_a_whole_number(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    seed: true\n"
    )
    assert message_of(path) == single(
        path,
        5,
        11,
        "shot a, field seed",
        "seed must be a whole number from 0 to 2147483647 or auto, got true",
    )


@pytest.mark.parametrize("seed", ["-1", "2147483648"])
def test_seed_out_of_range(tmp_path: Path, seed: str) -> None:
    path = write_manifest(
        tmp_path, f"version: 1\nshots:\n  - id: a\n    prompt: x\n    seed: {seed}\n"
    )
    assert message_of(path) == single(
        path,
        5,
        11,
        "shot a, field seed",
        f"seed must be a whole number from 0 to 2147483647 or auto, got {seed}",
    )


def test_bad_size_pattern(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    size: 1664x928\n"
    )
    assert message_of(path) == single(
        path,
        5,
        11,
        "shot a, field size",
        "'1664x928' is not valid: write it as W*H, for example '1664*928'",
    )


def test_version_2_is_refused(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 2\nshots:\n  - id: a\n    prompt: x\n")
    assert message_of(path) == single(
        path, 1, 10, "field version", "unsupported version 2: this imgbatch reads version 1"
    )


def test_missing_version_and_shots(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "name: spot\n")
    assert message_of(path) == (
        "2 problems in the manifest:\n"
        f"  {path}:1:1: manifest: missing required field 'version'\n"
        f"  {path}:1:1: manifest: missing required field 'shots'"
    )


def test_shot_missing_both_id_and_prompt_is_reported_once_each(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots:\n  - seed: 1\n")
    assert message_of(path) == (
        "2 problems in the manifest:\n"
        f"  {path}:3:5: shots[0]: missing required field 'id'\n"
        f"  {path}:3:5: shots[0]: missing required field 'prompt'"
    )


def test_empty_shots_list(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nshots: []\n")
    assert message_of(path) == single(
        path, 2, 8, "field shots", "the list is empty: add at least one shot"
    )


def test_unknown_provider_lists_the_choices(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nprovider: openai\nshots:\n  - id: a\n    prompt: x\n"
    )
    assert message_of(path) == single(
        path, 2, 11, "field provider", "'openai' is not one of: dashscope, placeholder, auto"
    )


def test_limits_out_of_range(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nlimits:\n  concurrency: 0\n  rps: 0\nshots:\n  - id: a\n    prompt: x\n",
    )
    assert message_of(path) == (
        "2 problems in the manifest:\n"
        f"  {path}:3:16: field limits.concurrency: must be at least 1, got 0\n"
        f"  {path}:4:8: field limits.rps: must be at least 0.001, got 0"
    )


# --- ids ------------------------------------------------------------------------------------


def test_duplicate_ids_including_case_insensitive(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n"
        "  - id: a\n    prompt: x\n"
        "  - id: a\n    prompt: y\n"
        "  - id: A\n    prompt: z\n",
    )
    assert message_of(path) == (
        "2 problems in the manifest:\n"
        f"  {path}:5:9: shot a, field id: id 'a' is already used by shots[0] on line 3; "
        "ids must be unique (ignoring case)\n"
        f"  {path}:7:9: shot A, field id: id 'A' is already used by shots[0] on line 3; "
        "ids must be unique (ignoring case)"
    )


@pytest.mark.parametrize("bad_id", [".hidden", "..", "../up", "a/b", "/etc", "a\\\\b", ""])
def test_ids_cannot_escape_the_output_folder(tmp_path: Path, bad_id: str) -> None:
    path = write_manifest(tmp_path, f'version: 1\nshots:\n  - id: "{bad_id}"\n    prompt: x\n')
    shown = bad_id.replace("\\\\", "\\")
    hint = "use only letters, digits, '.', '_' and '-', not starting with '.'"
    assert message_of(path) == single(
        path,
        3,
        9,
        f"shot {shown}, field id" if shown else "shots[0], field id",
        f"{shown!r} is not valid: {hint}",
    )


def test_name_cannot_escape_the_output_folder(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "version: 1\nname: ../x\nshots:\n  - id: a\n    prompt: x\n")
    assert message_of(path) == single(
        path,
        2,
        7,
        "field name",
        "'../x' is not valid: use only letters, digits, '.', '_' and '-', not starting with '.'",
    )


# --- model rules ----------------------------------------------------------------------------


def test_unsupported_size_lists_supported_and_nearest(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    size: '1024*1024'\n"
    )
    assert message_of(path) == single(
        path,
        5,
        11,
        "shot a, field size",
        f"size '1024*1024' is not supported by qwen-image-max; supported: {SUPPORTED}; "
        "nearest by aspect ratio: 1328*1328",
    )


@pytest.mark.parametrize(
    ("size", "nearest"),
    [
        ("1920*1080", "1664*928"),
        ("1000*1000", "1328*1328"),
        ("768*1024", "1104*1472"),
        ("1080*1920", "928*1664"),
        ("1600*1200", "1472*1104"),
    ],
)
def test_nearest_size_by_aspect_ratio(tmp_path: Path, size: str, nearest: str) -> None:
    assert nearest_size(size, QWEN_IMAGE_SIZES) == nearest
    path = write_manifest(
        tmp_path,
        f"version: 1\nshots:\n  - id: a\n    prompt: x\n    model: qwen-image-plus\n"
        f"    size: '{size}'\n",
    )
    assert message_of(path) == single(
        path,
        6,
        11,
        "shot a, field size",
        f"size '{size}' is not supported by qwen-image-plus; supported: {SUPPORTED}; "
        f"nearest by aspect ratio: {nearest}",
    )


def test_bad_default_size_is_reported_once_naming_the_shots_that_use_it(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\ndefaults:\n  size: '1024*1024'\nshots:\n"
        "  - id: a\n    prompt: x\n"
        "  - id: b\n    prompt: x\n"
        "  - id: c\n    prompt: x\n    size: '1328*1328'\n",
    )
    error = manifest_error(path)
    assert len(error.problems) == 1
    assert str(error) == single(
        path,
        3,
        9,
        "field defaults.size (used by shots a, b)",
        f"size '1024*1024' is not supported by qwen-image-max; supported: {SUPPORTED}; "
        "nearest by aspect ratio: 1328*1328",
    )


def test_bad_default_used_by_many_shots_names_five_and_counts_the_rest(tmp_path: Path) -> None:
    shots = "".join(f"  - id: s{i}\n    prompt: x\n" for i in range(7))
    path = write_manifest(tmp_path, f"version: 1\ndefaults:\n  size: '1*1'\nshots:\n{shots}")
    assert message_of(path) == single(
        path,
        3,
        9,
        "field defaults.size (used by shots s0, s1, s2, s3, s4 and 2 more)",
        f"size '1*1' is not supported by qwen-image-max; supported: {SUPPORTED}; "
        "nearest by aspect ratio: 1328*1328",
    )


def test_unknown_model_suggests_the_close_one(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    model: qwen-image-maxx\n"
    )
    assert message_of(path) == single(
        path,
        5,
        12,
        "shot a, field model",
        "unknown model 'qwen-image-maxx'; did you mean 'qwen-image-max'?",
    )


def test_unknown_model_without_close_match_lists_known(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    model: dall-e-3\n"
    )
    assert message_of(path) == single(
        path,
        5,
        12,
        "shot a, field model",
        "unknown model 'dall-e-3'; known: qwen-image-max, qwen-image-max-2025-12-30, "
        "qwen-image-plus, qwen-image-plus-2026-01-09",
    )


def test_unknown_default_model_used_by_one_shot(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\ndefaults:\n  model: qwen-imag-plus\nshots:\n  - id: a\n    prompt: x\n",
    )
    assert message_of(path) == single(
        path,
        3,
        10,
        "field defaults.model (used by shot a)",
        "unknown model 'qwen-imag-plus'; did you mean 'qwen-image-plus'?",
    )


def test_prompt_over_800_characters(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, f"version: 1\nshots:\n  - id: a\n    prompt: {'x' * 801}\n")
    assert message_of(path) == single(
        path,
        4,
        13,
        "shot a, field prompt",
        "prompt is 801 characters; qwen-image-max takes at most 800",
    )


def test_prompt_with_style_over_800_characters(tmp_path: Path) -> None:
    # 790 + len("\nStyle: ") 8 + len("abcdefgh") 8 = 806, though the prompt alone fits.
    path = write_manifest(
        tmp_path,
        f"version: 1\nshots:\n  - id: a\n    prompt: {'x' * 790}\n    style: abcdefgh\n",
    )
    assert message_of(path) == single(
        path,
        4,
        13,
        "shot a, field prompt",
        "prompt with its style appended is 806 characters; qwen-image-max takes at most 800",
    )


def test_prompt_with_default_style_exactly_800_is_accepted(tmp_path: Path) -> None:
    # 784 + 8 + 8 = 800.
    path = write_manifest(
        tmp_path,
        f"version: 1\ndefaults:\n  style: abcdefgh\nshots:\n  - id: a\n    prompt: {'x' * 784}\n",
    )
    assert load_manifest(path).shots[0].fields["style"] == "abcdefgh"


def test_negative_prompt_over_500_characters(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        f"version: 1\nshots:\n  - id: a\n    prompt: x\n    negative_prompt: {'n' * 501}\n",
    )
    assert message_of(path) == single(
        path,
        5,
        22,
        "shot a, field negative_prompt",
        "negative_prompt is 501 characters; qwen-image-max takes at most 500",
    )


def test_reference_image_path_missing(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: a\n    prompt: x\n    reference_image: refs/missing.png\n",
    )
    assert message_of(path) == single(
        path,
        5,
        22,
        "shot a, field reference_image",
        f"reference image 'refs/missing.png' not found (looked for {tmp_path}/refs/missing.png);"
        " give a path relative to the manifest, a data: URI or an http(s) URL",
    )


def test_reference_image_that_is_a_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    path = write_manifest(
        tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    reference_image: refs\n"
    )
    (problem,) = manifest_error(path).problems
    assert problem.where == "shot a, field reference_image"
    assert problem.message == "reference image 'refs' is a folder, not an image file"


def test_each_reference_is_read_once_per_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many shots share two references; the manifest is invalid, so it is checked twice (the
    # second time with positions): each file is still read once.
    (tmp_path / "face.png").write_bytes(PNG)
    (tmp_path / "other.png").write_bytes(PNG_OTHER)
    reads: list[Path] = []
    real_read = reference_module._read_regular

    def counting_read(path: Path, limit: int) -> bytes:
        reads.append(path)
        return real_read(path, limit)

    monkeypatch.setattr(reference_module, "_read_regular", counting_read)
    shots = "".join(f"  - id: s{index}\n    prompt: p\n" for index in range(50))
    path = write_manifest(
        tmp_path,
        f"version: 1\nbogus: 1\ndefaults:\n  reference_image: face.png\nshots:\n{shots}"
        "  - id: other\n    prompt: p\n    reference_image: ./other.png\n",
    )
    manifest_error(path)
    assert sorted(reads) == [(tmp_path / "face.png").resolve(), (tmp_path / "other.png").resolve()]


@pytest.mark.parametrize("written", ["/proc/self/environ", "/etc/shadow", "../secret"])
def test_a_reference_outside_the_folder_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "secret").write_text("DASHSCOPE_API_KEY=sk-secret")
    monkeypatch.setattr(reference_module, "_read_regular", pytest.fail)
    path = write_manifest(
        project, f"version: 1\nshots:\n  - id: a\n    prompt: x\n    reference_image: {written}\n"
    )
    (problem,) = manifest_error(path).problems
    assert (problem.line, problem.column, problem.where) == (5, 22, "shot a, field reference_image")
    assert "outside the manifest's folder" in problem.message
    assert "--allow-reference-outside" in problem.message


def test_a_manifest_that_is_a_folder_says_so(tmp_path: Path) -> None:
    (problem,) = manifest_error(tmp_path).problems
    assert (problem.file, problem.where) == (str(tmp_path), "file")
    assert problem.message == "is a folder; give the manifest's YAML file"


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "s2\n"), ("name", "nl\n"), ("size", "1328*1328\n"), ("dir", "out\0put")],
)
def test_both_schema_validators_refuse_a_trailing_newline_or_control_character(
    field: str, value: str
) -> None:
    # Python's `$` matches before a final newline; the patterns must hold in Python (both
    # validators) and in ECMA-262 (editors), so they end in a lookahead instead.
    shot = {"id": "a", "prompt": "p"}
    document: dict[str, object] = {"version": 1, "shots": [shot]}
    if field == "dir":
        document["output"] = {"dir": value}
    elif field == "name":
        document["name"] = value
    else:
        shot[field] = value
    valid = json.loads(json.dumps(document).replace(json.dumps(value), json.dumps("ok1")))
    if field == "size":
        valid["shots"][0]["size"] = "1328*1328"
    fast = fastjsonschema.compile(manifest_schema())
    full = jsonschema.Draft202012Validator(manifest_schema())
    fast(valid)
    full.validate(valid)
    with pytest.raises(fastjsonschema.JsonSchemaException):
        fast(document)
    assert [error.validator for error in full.iter_errors(document)] == ["pattern"]


def test_aliases_within_the_budget_still_work(tmp_path: Path) -> None:
    shots = "".join(f"  - <<: *base\n    id: s{index}\n    prompt: p\n" for index in range(300))
    path = write_manifest(
        tmp_path, f"version: 1\ndefaults: &base {{size: '1328*1328', seed: 3}}\nshots:\n{shots}"
    )
    manifest = load_manifest(path)
    assert len(manifest.shots) == 300
    assert manifest.shots[-1].fields == {
        "id": "s299",
        "prompt": "p",
        "size": "1328*1328",
        "seed": 3,
    }


# --- everything at once -----------------------------------------------------------------------


def test_all_problems_are_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
bogus: 1
shots:
  - id: b
    promt: y
    size: '1024*1024'
  - id: a
    prompt: x
    seed: -5
  - id: B
    prompt: z
    model: qwen-image-maxx
""",
    )
    error = manifest_error(path)
    assert str(error) == "\n".join(
        [
            "7 problems in the manifest:",
            f"  {path}:2:1: field bogus: unknown field 'bogus'; allowed: {TOP_ALLOWED}",
            f"  {path}:4:5: shot b: missing required field 'prompt'",
            f"  {path}:5:5: shot b, field promt: unknown field 'promt'; did you mean 'prompt'?",
            f"  {path}:6:11: shot b, field size: size '1024*1024' is not supported by "
            f"qwen-image-max; supported: {SUPPORTED}; nearest by aspect ratio: 1328*1328",
            f"  {path}:9:11: shot a, field seed: seed must be a whole number from 0 to "
            "2147483647 or auto, got -5",
            f"  {path}:10:9: shot B, field id: id 'B' is already used by shots[0] on line 4; "
            "ids must be unique (ignoring case)",
            f"  {path}:12:12: shot B, field model: unknown model 'qwen-image-maxx'; "
            "did you mean 'qwen-image-max'?",
        ]
    )
    assert [problem.line for problem in error.problems] == [2, 4, 5, 6, 9, 10, 12]
    assert all(problem.file == str(path) for problem in error.problems)


def test_duplicate_key_is_reported_together_with_other_problems(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n"
        "  - id: a\n    prompt: x\n    prompt: y\n"
        "  - id: b\n    prompt: x\n    seed: -1\n",
    )
    assert [(problem.line, problem.where) for problem in manifest_error(path).problems] == [
        (5, "shots[0], field prompt"),
        (8, "shot b, field seed"),
    ]


def test_a_big_shot_list_holds_each_field_name_once_and_its_fields_only_until_expanded(
    tmp_path: Path,
) -> None:
    """Every shot's mapping repeats the same field names: one string each, not one a shot
    (200,000 copies of "id" and "prompt" in a 100,000-shot list). Once expanded, the manifest
    an apply holds drops its shots' merged fields (the expansion has them) and keeps what the
    contact sheet and housekeeping read."""
    from imgbatch.run.apply import load_and_expand
    from tests.support.files import write_many_shots

    path = write_many_shots(tmp_path, "many", 3)
    first, second = load_manifest(path).shots[:2]
    assert [name for name in first.fields] == [name for name in second.fields]
    assert all(a is b for a, b in zip(first.fields, second.fields, strict=True))
    manifest, expansion = load_and_expand(path, "placeholder")
    assert [spec.id for spec in manifest.shots] == [shot.id for shot in expansion.shots]
    assert all(not spec.fields for spec in manifest.shots)
    assert expansion.shots[2].request.prompt == "a lighthouse, take 2"
