"""`reroll` and `pick` edit the shot list in place: one value changed or one line added, every
other byte (comments, order, quoting, blank lines, line endings) as it was; a value other shots
share is refused with what to edit instead, and nothing is written when anything is refused.
"""

from __future__ import annotations

import difflib
import os
import random
from pathlib import Path

import pytest

from imgbatch.errors import ManifestError
from imgbatch.manifest import load_manifest
from imgbatch.manifest.edit import PickChange, SeedChange, pick, reroll
from imgbatch.shots.expand import expand

LIST = """\
# The spring campaign: keep these comments.
version: 1
name: spring   # folder name
defaults:
  model: qwen-image-max
  seed: 1234          # every shot's unless it has its own
shots:
  - id: s01-road      # the opener
    prompt: "an empty mountain road at dawn, 山间薄雾"

  - id: s02-helmet
    prompt: 'a studio product photo of a helmet'
    seed: 7           # chosen by hand
    size: "1328*1328"
  - {id: s03-flow, prompt: a flow mapping shot}
  - id: poster
    prompt: >-
      a minimalist poster
      of a cyclist
    seed: 40
    variants: 3
  - id: "s05-{angle}"
    prompt: "a helmet, {angle} view"
    matrix:
      angle: [front, side]
"""


def write(tmp_path: Path, text: str = LIST) -> Path:
    path = tmp_path / "shots.yaml"
    path.write_bytes(text.encode("utf-8"))
    return path


def changed_lines(before: str, after: str) -> list[str]:
    """The diff's changed lines, without the headers."""
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def keys_by_id(path: Path) -> dict[str, str]:
    expansion = expand(load_manifest(path), provider="placeholder", environ={})
    return {shot.id: shot.request.key for shot in expansion.shots}


def seeded(*seeds: int) -> random.Random:
    """A random source whose randint gives `seeds` in order."""

    class Fixed(random.Random):
        def __init__(self) -> None:
            super().__init__(0)
            self.left = list(seeds)

        def randint(self, a: int, b: int) -> int:
            value = self.left.pop(0)
            assert a <= value <= b
            return value

    return Fixed()


def test_reroll_replaces_only_the_seed_characters_of_a_shot_with_its_own_seed(
    tmp_path: Path,
) -> None:
    path = write(tmp_path)
    keys = keys_by_id(path)
    changes = reroll(path, ["s02-helmet"], rng=seeded(99))
    assert changes == (SeedChange("s02-helmet", 7, 99),)
    after = path.read_text(encoding="utf-8")
    assert changed_lines(LIST, after) == [
        "-    seed: 7           # chosen by hand",
        "+    seed: 99           # chosen by hand",
    ]
    new_keys = keys_by_id(path)
    assert [shot for shot in keys if keys[shot] != new_keys[shot]] == ["s02-helmet"]


def test_reroll_of_a_shot_whose_seed_is_a_default_adds_its_own_seed_after_its_id(
    tmp_path: Path,
) -> None:
    path = write(tmp_path)
    reroll(path, ["s01-road"], rng=seeded(5))
    after = path.read_text(encoding="utf-8")
    # The default is left alone: the other shots keep their seed.
    assert changed_lines(LIST, after) == ["+    seed: 5"]
    assert after.index("seed: 5") > after.index("# the opener")
    assert load_manifest(path).shots[0].fields["seed"] == 5
    assert load_manifest(path).shots[2].fields["seed"] == 1234


def test_reroll_in_a_flow_mapping_and_of_several_shots_at_once(tmp_path: Path) -> None:
    path = write(tmp_path)
    changes = reroll(path, ["s03-flow", "poster", "s02-helmet"], rng=seeded(11, 22, 33))
    assert [str(change) for change in changes] == [
        "s03-flow: seed 1234 -> 11",
        "poster: seed 40 -> 22 (3 takes)",
        "s02-helmet: seed 7 -> 33",
    ]
    after = path.read_text(encoding="utf-8")
    assert "  - {id: s03-flow, seed: 11, prompt: a flow mapping shot}\n" in after
    manifest = load_manifest(path)
    seeds = {shot.id: shot.fields.get("seed") for shot in manifest.shots}
    assert [seeds[f"poster-{n}"] for n in (1, 2, 3)] == [22, 23, 24]


def test_reroll_keeps_crlf_line_endings_and_a_zero_indented_list(tmp_path: Path) -> None:
    text = "version: 1\r\nshots:\r\n- id: a\r\n  prompt: one\r\n- id: b\r\n  prompt: two\r\n"
    path = write(tmp_path, text)
    reroll(path, ["b"], rng=seeded(3))
    assert path.read_bytes().decode() == text.replace("- id: b\r\n", "- id: b\r\n  seed: 3\r\n")


def test_reroll_of_an_auto_seed_writes_a_number_and_a_last_line_without_newline(
    tmp_path: Path,
) -> None:
    text = "version: 1\nname: n\nshots:\n  - prompt: p\n    id: a\n    seed: auto"
    path = write(tmp_path, text)
    old = load_manifest(path).shots[0].fields["seed"]
    assert reroll(path, ["a"], rng=seeded(old, 8)) == (SeedChange("a", old, 8),)
    assert path.read_text() == text.replace("seed: auto", "seed: 8")

    text = "version: 1\nshots:\n  - prompt: p\n    id: a"
    path = write(tmp_path, text)
    reroll(path, ["a"], rng=seeded(9))
    assert path.read_text() == text + "\n    seed: 9\n"


def test_a_seed_from_a_merge_key_is_overridden_on_the_shot_not_at_its_anchor(
    tmp_path: Path,
) -> None:
    text = "version: 1\nshots:\n  - &first {id: a, prompt: p, seed: 3}\n  - <<: *first\n    id: b\n"
    path = write(tmp_path, text)
    reroll(path, ["b"], rng=seeded(4))
    manifest = load_manifest(path)
    assert [shot.fields["seed"] for shot in manifest.shots] == [3, 4]
    assert path.read_text() == text.replace("    id: b\n", "    id: b\n    seed: 4\n")


def test_a_matrix_combination_or_one_take_is_refused_with_what_to_edit_instead(
    tmp_path: Path,
) -> None:
    path = write(tmp_path)
    with pytest.raises(ManifestError) as caught:
        reroll(path, ["s05-front", "poster-2", "s02-helmet", "s01-rod"], rng=seeded(1))
    assert str(caught.value) == (
        "3 problems in the reroll:\n"
        f"  {path}:22:5: shot s05-front: one combination of the matrix of shots[4] "
        "('s05-{angle}', 2 shots), which share one seed: to reroll all 2, set a new seed: on "
        "that shot; to reroll only s05-front, take it out of the matrix into a shot of its own\n"
        f"  {path}:16:5: shot poster-2: take 2 of shot 'poster' (variants: 3, seeds 40 to 42), "
        "whose seeds all come from that shot's: reroll 'poster' for new takes of all 3, or "
        "raise variants: to 4 for one more take\n"
        f"  {path}: shot s01-rod: no such shot in {path}; did you mean s01-road?"
    )
    # Nothing was written, not even the edit that was possible.
    assert path.read_text(encoding="utf-8") == LIST


def test_pick_writes_the_take_number_after_variants_and_a_second_pick_replaces_it(
    tmp_path: Path,
) -> None:
    path = write(tmp_path)
    assert pick(path, ["poster-2"]) == (PickChange("poster", 2, "poster-2"),)
    after = path.read_text(encoding="utf-8")
    assert changed_lines(LIST, after) == ["+    pick: 2"]
    assert after.index("pick: 2") == after.index("variants: 3") + len("variants: 3\n    ")
    assert load_manifest(path).picks == {"poster": "poster-2"}
    assert [str(c) for c in pick(path, ["poster-3"])] == ["poster: pick 3 (poster-3, was 2)"]
    assert changed_lines(LIST, path.read_text(encoding="utf-8")) == ["+    pick: 3"]


def test_pick_refuses_what_is_not_one_take_of_a_shot(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(ManifestError) as caught:
        pick(path, ["s02-helmet", "poster-1", "poster-3"])
    assert str(caught.value) == (
        "2 problems in the pick:\n"
        f"  {path}:11:5: shot s02-helmet: not one of a shot's takes: pick names a take of a "
        "shot with variants: N, as <id>-<number> (poster-2 is the second take of a shot poster "
        "with variants: 3)\n"
        f"  {path}:16:5: shot poster-3: poster-1 and poster-3 are takes of the same shot: pick "
        "one of them"
    )
    assert path.read_text(encoding="utf-8") == LIST


@pytest.mark.parametrize(
    ("shot", "message"),
    [
        (
            "  - {id: a, prompt: p, seed: 1, pick: 1}\n",
            "shot a, field pick: pick: 1 chooses among a shot's variants, and this shot has "
            "no variants:; add variants: N, or remove pick:",
        ),
        (
            "  - {id: a, prompt: p, seed: 1, variants: 2, pick: 3}\n",
            "shot a, field pick: pick: 3 names a take this shot does not have (variants: 2)",
        ),
        (
            "  - {id: 'a-{x}', prompt: p, seed: 1, variants: 2, pick: 1, matrix: {x: [1, 2]}}\n",
            "shot a-{x}, field pick: pick: 1 would choose take 1 of every matrix combination at "
            "once; pick works on a shot with variants: and no matrix: (write the combination "
            "you want to pick from as its own shot)",
        ),
        (
            "  - {id: a, prompt: p, seed: 1, variants: 2, pick: 1}\n  - {id: A, prompt: q}\n",
            "shot a, field pick: pick: writes the chosen take as a.png, the file of shots[1] "
            "('A'); rename one of the two",
        ),
    ],
)
def test_a_pick_that_cannot_be_is_a_manifest_problem(
    tmp_path: Path, shot: str, message: str
) -> None:
    path = write(tmp_path, "version: 1\nshots:\n" + shot)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    column = shot.index("pick: ") + len("pick: ") + 1  # at the value
    assert str(caught.value) == f"1 problem in the manifest:\n  {path}:3:{column}: {message}"


def test_the_edit_is_atomic_keeps_the_mode_and_follows_a_link(tmp_path: Path) -> None:
    real = write(tmp_path)
    os.chmod(real, 0o640)
    link = tmp_path / "link.yaml"
    link.symlink_to(real.name)
    reroll(link, ["s02-helmet"], rng=seeded(12))
    assert link.is_symlink()
    assert "seed: 12" in real.read_text(encoding="utf-8")
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.yaml", "shots.yaml"]


def test_an_invalid_list_is_not_edited(tmp_path: Path) -> None:
    path = write(tmp_path, LIST.replace('size: "1328*1328"', 'size: "1*1"'))
    with pytest.raises(ManifestError, match="size '1\\*1' is not supported"):
        reroll(path, ["s02-helmet"])
    assert "seed: 7 " in path.read_text(encoding="utf-8")


def test_a_new_seed_is_never_the_old_one(tmp_path: Path) -> None:
    path = write(tmp_path)
    assert reroll(path, ["s02-helmet"], rng=seeded(7, 7, 8)) == (SeedChange("s02-helmet", 7, 8),)
