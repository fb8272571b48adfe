"""`imgbatch reroll` and `imgbatch pick` against the fake DashScope server: a reroll makes the
next apply pay for those shots only, a revert of it pays nothing, and a pick makes apply write
the chosen take as `<shot>.png`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imgbatch.cli.main import main
from tests.conftest import write_manifest
from tests.support.fake_dashscope import FakeDashScope

LIST = """\
version: 1
name: review
defaults:
  size: "1328*1328"
  seed: auto      # a stable seed per shot
limits:
  rps: 500
shots:
  - id: road
    prompt: an empty mountain road at dawn
  - id: helmet
    prompt: a studio photo of a helmet
    seed: 7
  - id: poster
    prompt: a minimalist poster of a cyclist
    variants: 3
"""


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def prompts_sent(server: FakeDashScope) -> list[tuple[str, int]]:
    """(prompt, seed) of every generation request the server answered."""
    sent = []
    for request in server.requests:
        if request.method == "POST" and isinstance(request.body, dict):
            text = request.body["input"]["messages"][0]["content"][0]["text"]
            sent.append((text, request.body["parameters"]["seed"]))
    return sent


def test_reroll_then_apply_pays_for_those_shots_only_and_a_revert_pays_nothing(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, LIST)
    assert run("apply", manifest).exit_code == 0
    assert fake_server.successes == 5
    original = manifest.read_text(encoding="utf-8")
    fake_server.reset()

    result = run("reroll", manifest, "helmet", "poster")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("helmet: seed 7 -> ")
    assert lines[1].startswith("poster: seed ") and lines[1].endswith(" (3 takes)")
    assert lines[2] == f"Next: imgbatch apply {manifest}"
    result = run("apply", manifest)
    assert result.exit_code == 0, result.output
    # Four requests: helmet and poster's three takes; road was not sent.
    assert fake_server.successes == 4
    assert sorted(text for text, _ in prompts_sent(fake_server)) == sorted(
        ["a studio photo of a helmet"] + ["a minimalist poster of a cyclist"] * 3
    )
    assert all(seed != 7 for text, seed in prompts_sent(fake_server) if "helmet" in text)

    # The old takes stayed in the cache: the revert (git checkout, here by hand) is free.
    fake_server.reset()
    manifest.write_text(original, encoding="utf-8")
    result = run("apply", manifest)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == 0
    assert "4 cached" in result.stdout


def test_pick_makes_apply_write_the_chosen_take_as_the_shot_file(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, LIST)
    assert run("apply", manifest).exit_code == 0
    out = tmp_path / "output" / "review"
    assert not (out / "poster.png").exists()

    result = run("pick", manifest, "poster-2")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "poster: pick 2 (poster-2)"
    assert "    variants: 3\n    pick: 2\n" in manifest.read_text(encoding="utf-8")
    fake_server.reset()
    result = run("apply", manifest)
    assert result.exit_code == 0, result.output
    assert fake_server.generation_count == 0  # a pick pays for nothing
    assert "Picked takes written: poster.png" in result.stdout
    assert (out / "poster.png").read_bytes() == (out / "poster-2.png").read_bytes()
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    before = (out / "poster.png").stat().st_mtime_ns

    # Nothing changed: the file is left as it is, and results.json too.
    result = run("apply", manifest)
    assert "Picked takes written" not in result.stdout
    assert (out / "poster.png").stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == results

    assert run("pick", manifest, "poster-3").exit_code == 0
    assert run("apply", manifest).exit_code == 0
    assert (out / "poster.png").read_bytes() == (out / "poster-3.png").read_bytes()


def test_a_refused_reroll_exits_2_says_what_to_edit_and_changes_nothing(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, LIST)
    result = run("reroll", manifest, "poster-2")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: 1 problem in the reroll:\n"
        f"  {manifest}:14:5: shot poster-2: take 2 of shot 'poster' (variants: 3, each with "
        "its own auto seed), whose seeds all come from that shot's: reroll 'poster' for new "
        "takes of all 3, or raise variants: to 4 for one more take\n"
    )
    assert manifest.read_text(encoding="utf-8") == LIST
    assert run("pick", manifest).exit_code == 2  # at least one take is needed


def test_the_edit_reads_as_one_line_in_git(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, LIST)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "list"], check=True)
    assert run("reroll", manifest, "road").exit_code == 0
    stat = subprocess.run([*git, "diff", "--numstat"], check=True, capture_output=True, text=True)
    assert stat.stdout.split()[:2] == ["1", "0"]  # one line added, none removed


def test_gc_keeps_the_picked_take_s_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    manifest = write_manifest(
        tmp_path, LIST.replace("version: 1\n", "version: 1\nprovider: placeholder\n")
    )
    assert run("pick", manifest, "poster-2").exit_code == 0
    assert run("apply", manifest).exit_code == 0
    picked = tmp_path / "output" / "review" / "poster.png"
    assert picked.is_file()
    result = run("gc", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert "poster.png" not in result.output
    assert picked.is_file()


def test_a_picked_take_that_is_a_link_or_no_png_is_never_copied_into_the_shot_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A take committed as a link to a secret (a pull request's `poster-2.png ->
    # ~/.aws/credentials`) was read through the link and copied into `poster.png`, the file a
    # pipeline publishes; so was any file put in the take's place. The take is read as every
    # image is: never through a link, a PNG only; else its image from the cache.
    monkeypatch.setenv("HOME", str(tmp_path))
    manifest = write_manifest(
        tmp_path, LIST.replace("version: 1\n", "version: 1\nprovider: placeholder\n")
    )
    assert run("pick", manifest, "poster-2").exit_code == 0
    assert run("apply", manifest).exit_code == 0
    out = tmp_path / "output" / "review"
    made = (out / "poster-2.png").read_bytes()
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2\n")
    for hostile in ("link", "text"):
        (out / "poster.png").unlink()
        (out / "poster-2.png").unlink()
        if hostile == "link":
            (out / "poster-2.png").symlink_to(secret)
        else:
            (out / "poster-2.png").write_bytes(secret.read_bytes())
        result = run("apply", manifest)
        assert result.exit_code == 0, result.output
        assert b"hunter2" not in (out / "poster.png").read_bytes(), hostile
        assert (out / "poster.png").read_bytes() == made, hostile
