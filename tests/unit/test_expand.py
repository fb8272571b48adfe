"""Saying more in fewer lines: `vars:`, `matrix:`, `variants:`, `seed: auto`, `imgbatch expand`.

Takes: manifests written to tmp_path, the CLI through click's runner, and the fake DashScope
server for the end-to-end runs. Gives: evidence that expansion makes the shots it says, in
manifest order; that every problem in an expanded shot is reported at the line of the shot (or
matrix) it came from; that the model rules and unique ids hold for each expanded shot; that a
version-1 manifest without these fields means what it always meant; and that `simplify: false`
reaches the executor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from imgbatch.cli.main import main
from imgbatch.errors import ManifestError
from imgbatch.manifest import load_manifest, manifest_from_data, manifest_schema
from imgbatch.manifest.expansion import auto_seed
from imgbatch.run.apply import ApplyOptions, apply, expand_shots, make_plan
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest
from tests.support.reference_images import PNG

FIELDS = [
    "id",
    "prompt",
    "negative_prompt",
    "size",
    "seed",
    "style",
    "model",
    "reference_image",
    "file",
    "key",
]


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(problem) for problem in caught.value.problems]


def shots_of(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(shot.id, dict(shot.fields)) for shot in load_manifest(path).shots]


def test_vars_fill_every_string_field_of_shots_and_defaults(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
vars:
  product: trail shoe
  brand: Ridgeline
  square: "1328*1328"
defaults:
  negative_prompt: "blurry, {brand} logo"
  style: "{brand} catalogue"
shots:
  - id: s01
    prompt: "a {product} on a rock, {{not a variable}}"
    size: "{square}"
""",
    )
    ((shot_id, fields),) = shots_of(path)
    assert shot_id == "s01"
    assert fields["prompt"] == "a trail shoe on a rock, {not a variable}"
    assert fields["negative_prompt"] == "blurry, Ridgeline logo"
    assert fields["style"] == "Ridgeline catalogue"
    assert fields["size"] == "1328*1328"


def test_a_manifest_without_vars_or_matrix_keeps_its_braces(tmp_path: Path) -> None:
    # Version 1 stays valid and means what it meant: `{` in a prompt is just a brace.
    path = write_manifest(
        tmp_path, 'version: 1\nshots:\n  - id: s01\n    prompt: "a sign reading {open} {{x}}"\n'
    )
    assert shots_of(path)[0][1]["prompt"] == "a sign reading {open} {{x}}"


def test_a_missing_variable_is_named_at_its_line(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
vars: {product: shoe}
defaults:
  style: "{mood} light"
shots:
  - id: s01
    prompt: "a {product} and a {colour} sock"
""",
    )
    assert problems(path) == [
        f"{path}:4:10: field defaults.style (used by shot s01): unknown variable {{mood}}; "
        "define it under vars: or in the shot's matrix: (known: product); "
        "write {{ for a literal brace",
        f"{path}:7:13: shot s01, field prompt: unknown variable {{colour}}; "
        "define it under vars: or in the shot's matrix: (known: product); "
        "write {{ for a literal brace",
    ]


def test_matrix_makes_the_cartesian_product_in_order(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
vars: {product: helmet}
shots:
  - id: s01
    prompt: first
  - id: "s03-{angle}-{light}"
    prompt: "{product}, {angle} view, {light} light"
    style: "{light}"
    matrix:
      angle: [front, side, top]
      light: [dawn, 5]
  - id: s04
    prompt: last
""",
    )
    shots = shots_of(path)
    assert [shot_id for shot_id, _ in shots] == [
        "s01",
        "s03-front-dawn",
        "s03-front-5",
        "s03-side-dawn",
        "s03-side-5",
        "s03-top-dawn",
        "s03-top-5",
        "s04",
    ]
    fields = dict(shots)["s03-side-5"]
    assert fields["prompt"] == "helmet, side view, 5 light"
    assert fields["style"] == "5"
    assert "matrix" not in fields
    # Every expanded shot remembers the shot it was written as.
    assert {shot.index for shot in load_manifest(path).shots if shot.id.startswith("s03")} == {1}


def test_the_id_must_use_every_matrix_variable(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
shots:
  - id: "s03-{angle}"
    prompt: "{angle} {light}"
    matrix: {angle: [front, side], light: [dawn, dusk]}
""",
    )
    assert problems(path) == [
        f"{path}:3:9: shot s03-{{angle}}, field id: id 's03-{{angle}}' does not use matrix "
        "variable {light}; each combination needs its own id, for example "
        "'s03-{angle}-{light}'"
    ]


def test_variants_number_their_ids_and_count_up_their_seeds(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
defaults: {seed: 100}
shots:
  - id: hero
    prompt: a hero shot
    variants: 3
  - id: "s-{light}"
    prompt: "{light}"
    seed: 7
    variants: 2
    matrix: {light: [dawn, dusk]}
""",
    )
    assert [(shot_id, fields["seed"]) for shot_id, fields in shots_of(path)] == [
        ("hero-1", 100),
        ("hero-2", 101),
        ("hero-3", 102),
        ("s-dawn-1", 7),
        ("s-dawn-2", 8),
        ("s-dusk-1", 7),
        ("s-dusk-2", 8),
    ]


def test_variants_need_a_seed_and_must_stay_in_range(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
shots:
  - id: a
    prompt: p
    variants: 2
  - id: b
    prompt: p
    seed: 2147483646
    variants: 3
""",
    )
    assert problems(path) == [
        f"{path}:5:15: shot a, field variants: variants: 2 needs a seed to tell the variants "
        "apart: add seed: auto, or a number (the variants get seed, seed+1, ...)",
        f"{path}:8:11: shot b, field seed: seed 2147483646 with variants: 3 goes past "
        "2147483647 (the last variant would get 2147483648); lower the seed",
    ]


def test_seed_auto_is_the_documented_hash_of_name_and_id(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
name: spot
defaults: {seed: auto}
shots:
  - id: a
    prompt: p
  - id: b
    prompt: p
    variants: 2
""",
    )

    def expected(name: str, shot_id: str) -> int:
        digest = hashlib.sha256(f"{name}/{shot_id}".encode()).digest()
        return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF

    seeds = {shot_id: fields["seed"] for shot_id, fields in shots_of(path)}
    assert seeds == {key: expected("spot", key) for key in ("a", "b-1", "b-2")}
    assert len(set(seeds.values())) == 3
    assert all(0 <= seed <= 2147483647 for seed in seeds.values())
    # Another manifest's shot of the same id gets another seed.
    assert auto_seed("other", "a") != seeds["a"]
    # Without `name:`, the file's stem names the manifest.
    renamed = write_manifest(tmp_path, path.read_text().replace("name: spot\n", ""), "film.yaml")
    assert shots_of(renamed)[0][1]["seed"] == expected("film", "a")


def test_ids_are_unique_after_expansion(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
shots:
  - id: hero
    prompt: p
    seed: 1
    variants: 2
  - id: HERO-2
    prompt: q
  - id: "x-{v}"
    prompt: r
    matrix: {v: [a, A]}
""",
    )
    assert problems(path) == [
        f"{path}:7:9: shot HERO-2, field id: id 'HERO-2' is already used by shots[0] on line "
        "3; ids must be unique (ignoring case)",
        f"{path}:9:9: shot x-A, field id: id 'x-A' is already used by shots[2] on line 9; "
        "ids must be unique (ignoring case)",
    ]


def test_model_rules_apply_to_each_expanded_shot_at_its_written_line(tmp_path: Path) -> None:
    long = "x" * 796
    path = write_manifest(
        tmp_path,
        f"""\
version: 1
vars: {{tail: "{long}", wide: "1664*928"}}
shots:
  - id: "s-{{size_name}}{{other}}"
    prompt: "{{size_name}} {{tail}}"
    size: "{{wide}}"
    matrix:
      size_name: [wide, big]
      other: [x]
  - id: "t-{{n}}"
    prompt: p
    size: "{{n}}"
    matrix: {{n: ["1024*1024", "bad"]}}
""",
    )
    assert problems(path) == [
        # Only the combination whose prompt is too long; at the prompt's line.
        f"{path}:5:13: shot s-widex, field prompt: prompt is 801 characters; qwen-image-max "
        "takes at most 800",
        f"{path}:10:9: shot t-1024*1024, field id: 't-1024*1024' (from 't-{{n}}') is not "
        "valid: use only letters, digits, '.', '_' and '-', not starting with '.'",
        f"{path}:12:11: shot t-1024*1024, field size: size '1024*1024' is not supported by "
        "qwen-image-max; supported: 1664*928, 1472*1104, 1328*1328, 1104*1472, 928*1664; "
        "nearest by aspect ratio: 1328*1328",
        f"{path}:12:11: shot t-bad, field size: 'bad' is not valid: write it as W*H, for "
        "example '1664*928'",
    ]


def test_a_placeholder_without_vars_is_not_a_valid_id(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, 'version: 1\nshots:\n  - id: "s-{x}"\n    prompt: p\n')
    assert problems(path) == [
        f"{path}:3:9: shot s-{{x}}, field id: 's-{{x}}' is not valid: use only letters, "
        "digits, '.', '_' and '-', not starting with '.'; {name} placeholders are filled only "
        "with vars: or a shot's matrix:"
    ]


def test_a_matrix_too_large_is_refused_before_it_is_built(tmp_path: Path) -> None:
    values = json.dumps([str(number) for number in range(40)])
    path = write_manifest(
        tmp_path,
        f"""\
version: 1
shots:
  - id: "s-{{a}}-{{b}}-{{c}}-{{d}}"
    prompt: p
    matrix: {{a: {values}, b: {values}, c: {values}, d: {values}}}
""",
    )
    assert problems(path) == [
        f"{path}:5:13: shot s-{{a}}-{{b}}-{{c}}-{{d}}, field matrix: the matrix makes "
        "2,560,000 combinations: more than 1,000,000 shots"
    ]


def test_schema_errors_in_the_new_fields_are_explained(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
vars: {"bad name": x}
shots:
  - id: a
    prompt: p
    seed: sometimes
    variants: 0
    matrix: {v: []}
""",
    )
    messages = problems(path)
    assert messages == [
        f"{path}:2:7: field vars: 'bad name' is not valid: a variable name is letters, digits "
        "and '_', not starting with a digit",
        f"{path}:6:11: shot a, field seed: seed must be a whole number from 0 to 2147483647 or "
        "auto, got 'sometimes'",
        f"{path}:7:15: shot a, field variants: must be at least 1, got 0",
        f"{path}:8:17: shot a, field matrix.v: the list is empty: give at least one value",
    ]


def test_every_schema_field_has_a_description() -> None:
    schema = manifest_schema()
    missing = []

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else node

    def walk(node: dict[str, Any], where: str) -> None:
        for name, child in node.get("properties", {}).items():
            target = resolve(child)
            if "description" not in child and "description" not in target:
                missing.append(f"{where}.{name}")
            walk(target, f"{where}.{name}")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and "description" not in extra:
            missing.append(f"{where}.*")

    walk(schema, "")
    walk(schema["$defs"]["shot"], "shot")
    assert missing == []
    assert {"vars", "simplify"} <= set(schema["properties"])
    assert {"matrix", "variants"} <= set(schema["$defs"]["shot"]["properties"])


def test_expand_prints_the_expanded_shots_as_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "r.png").write_bytes(PNG)
    path = write_manifest(
        tmp_path,
        """\
version: 1
name: ex
provider: placeholder
shots:
  - id: "s-{v}"
    prompt: "p {v}"
    seed: auto
    matrix: {v: [a, b]}
    reference_image: refs/r.png
  - id: u
    prompt: q
    style: film
    reference_image: http://127.0.0.1:9/never-fetched.png
""",
    )
    result = run("expand", "--json", str(path))
    assert result.exit_code == 0, result.output
    shots = json.loads(result.stdout)["shots"]
    assert [list(shot) for shot in shots] == [FIELDS] * 3
    first = shots[0]
    assert first["id"] == "s-a"
    assert first["prompt"] == "p a"
    assert first["seed"] == auto_seed("ex", "s-a")
    assert (first["negative_prompt"], first["style"]) == (None, None)
    assert (first["model"], first["size"]) == ("qwen-image-max", "1664*928")
    assert first["reference_image"] == "refs/r.png"
    assert Path(first["file"]) == tmp_path / "output" / "ex" / "s-a.png"
    # The keys are the ones apply would use (plan, on the shots without a URL).
    text = path.read_text()
    without_url = write_manifest(tmp_path, text[: text.index("  - id: u")], "local.yaml")
    plan = make_plan(without_url)
    assert [shot["key"] for shot in shots[:2]] == [
        item.shot.request.key for item in plan.shots if item.shot
    ]
    # A URL's content is unknown until apply fetches it: no key, and nothing downloaded.
    assert shots[2]["key"] is None
    assert shots[2]["style"] == "film"
    assert shots[2]["seed"] is None

    as_yaml = run("expand", str(path))
    assert as_yaml.exit_code == 0, as_yaml.output
    assert yaml.safe_load(as_yaml.stdout) == {"shots": shots}


def test_expand_reports_an_invalid_manifest_with_exit_2(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, 'version: 1\nvars: {}\nshots:\n  - id: a\n    prompt: "{x}"\n')
    result = run("expand", str(path))
    assert result.exit_code == 2
    assert "unknown variable {x}" in result.stderr
    assert result.stdout == ""


def test_a_dict_manifest_expands_too(tmp_path: Path) -> None:
    data = {
        "version": 1,
        "vars": {"thing": "lamp"},
        "shots": [{"id": "s-{n}", "prompt": "{thing} {n}", "matrix": {"n": [1, 2]}}],
    }
    manifest = manifest_from_data(data, display="manifest", base_dir=tmp_path)
    assert [shot.fields["prompt"] for shot in manifest.shots] == ["lamp 1", "lamp 2"]
    assert [shot["id"] for shot in expand_shots(data, provider="placeholder")] == ["s-1", "s-2"]


def test_a_generate_request_cannot_carry_a_matrix() -> None:
    result = run("generate", "--request", json.dumps({"prompt": "p", "matrix": {"a": [1, 2]}}))
    assert result.exit_code == 2
    assert "field matrix: unknown field 'matrix'" in result.stderr


def test_expanded_shots_are_made_end_to_end(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    path = write_manifest(
        tmp_path,
        """\
version: 1
name: grid
shots:
  - id: "g-{angle}"
    prompt: "a lamp, {angle} view"
    size: "1328*1328"
    seed: 5
    variants: 2
    matrix: {angle: [front, side]}
""",
    )
    report = apply(path)
    assert report.ok
    assert [entry.id for entry in report.entries] == [
        "g-front-1",
        "g-front-2",
        "g-side-1",
        "g-side-2",
    ]
    sent = sorted(
        (
            request.body["input"]["messages"][0]["content"][-1]["text"],
            request.body["parameters"]["seed"],
        )
        for request in fake_server.requests
    )
    assert sent == [
        ("a lamp, front view", 5),
        ("a lamp, front view", 6),
        ("a lamp, side view", 5),
        ("a lamp, side view", 6),
    ]


@pytest.mark.parametrize("flag", [None, "manifest", "option"])
def test_simplify_false_in_the_manifest_turns_the_retry_off(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path, flag: str | None
) -> None:
    setting = "simplify: false\n" if flag == "manifest" else ""
    path = write_manifest(
        tmp_path,
        f"version: 1\nname: s\n{setting}shots:\n  - id: a\n    prompt: One. Two.\n",
    )
    fake_server.no_image_next()
    report = apply(path, ApplyOptions(simplify=flag != "option"))
    if flag is None:
        assert report.ok
        assert fake_server.generation_count == 2
    else:
        assert not report.ok
        assert fake_server.generation_count == 1


def test_huge_variants_are_refused_without_being_built(tmp_path: Path) -> None:
    # The schema refuses it; the rules, which run on invalid files too, must not build it.
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: a\n    prompt: p\n    seed: 1\n    variants: 1000000000\n",
    )
    assert problems(path) == [
        f"{path}:6:15: shot a, field variants: must be at most 10000, got 1000000000"
    ]
    # 1000 x 600 combinations are within the bound; twice that, with two variants each, is not.
    many, fewer = (json.dumps([str(n) for n in range(count)]) for count in (1000, 600))
    path = write_manifest(
        tmp_path,
        "version: 1\nshots:\n  - id: 's-{a}-{b}'\n    prompt: p\n    seed: 1\n"
        f"    variants: 2\n    matrix: {{a: {many}, b: {fewer}}}\n",
    )
    (message,) = problems(path)
    assert message.endswith(
        "field matrix: the matrix makes 600,000 combinations x 2 variants: more than "
        "1,000,000 shots"
    )
