"""apply makes one plan: before the lock, from the folder's state at a version read again under it.

Takes: small shot lists applied with the offline placeholder (and, between the plan and the lock,
another imgbatch process, a real one, changing the same output folder). Gives: evidence that the
common case plans once (counted at the planning function itself, and in the report), and that
a plan the folder changed under is made again under the lock, so the folder ends up as the
manifest says.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import imgbatch.run.apply as apply_module
from imgbatch import ApplyOptions, apply, make_plan
from imgbatch.cli.main import main
from imgbatch.errors import FrozenError
from imgbatch.housekeeping.gc import collect_garbage
from imgbatch.plan.decide import Action
from imgbatch.state.folder import OutputFolder
from imgbatch.state.results import file_sha256
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest

SHOTS = """\
version: 1
name: once
provider: {provider}
output:
  dir: out
shots:
  - id: s1
    prompt: "{s1}"
  - id: s2
    prompt: "{s2}"
"""


def shots(folder: Path, s1: str, s2: str, provider: str = "placeholder") -> Path:
    return write_manifest(folder, SHOTS.format(provider=provider, s1=s1, s2=s2))


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every plan apply makes: the planning function itself, called through."""
    calls: list[int] = []
    real = apply_module.plan_shots

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_module, "plan_shots", counted)
    return calls


def keyless(tmp_path: Path) -> ApplyOptions:
    return ApplyOptions(environ={}, home=tmp_path)


@pytest.mark.parametrize(
    "case",
    [
        # The placeholder named; the manifest's `auto` with no key (refused over paid images,
        # when there are some); a cost cap and --frozen, each refusing before the lock.
        {"provider": "placeholder"},
        {},
        {"provider": "placeholder", "max_cost": "5"},
        {"provider": "placeholder", "frozen": True},
    ],
    ids=["named", "auto-without-key", "max-cost", "frozen"],
)
def test_an_apply_makes_one_plan(tmp_path: Path, planned: list[int], case: dict[str, Any]) -> None:
    manifest = shots(tmp_path, "a harbour", "a lighthouse", provider="auto")
    first = apply(manifest, ApplyOptions(provider="placeholder"))
    assert first.ok
    planned.clear()

    # Something to do (s1 changed), or, frozen, nothing to pay for (s1 is restored by hand).
    if not case.get("frozen"):
        manifest = shots(tmp_path, "a harbour in fog", "a lighthouse", provider="auto")
    else:
        (tmp_path / "out" / "s1.png").unlink()
    report = apply(manifest, replace(keyless(tmp_path), **case))

    assert report.ok
    assert [shot.action for shot in report.plan.shots][0] in (Action.REPLACE, Action.RESTORE)
    assert len(planned) == 1
    assert (report.plans, report.replanned) == (1, False)


@contextlib.contextmanager
def before_the_lock(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]
) -> Iterator[list[str]]:
    """Run `then` once, as apply is about to take its output folder's lock (after its plan)."""
    real_lock = OutputFolder.lock
    seen: list[str] = []

    @contextlib.contextmanager
    def lock(self: OutputFolder, holder: str = "apply") -> Iterator[None]:
        if holder == "apply" and not seen:
            seen.append(holder)
            then()
        with real_lock(self, holder):
            yield

    monkeypatch.setattr(OutputFolder, "lock", lock)
    yield seen


def imgbatch(*args: str | Path, home: Path) -> None:
    """Another imgbatch process, run to its end."""
    env = {**os.environ, "HOME": str(home)}
    for name in ("OUTPUT_DIR", "DASHSCOPE_API_KEY"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "imgbatch", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_another_apply_between_the_plan_and_the_lock_is_seen_and_planned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planned: list[int]
) -> None:
    manifest = shots(tmp_path, "a harbour", "a lighthouse")
    assert apply(manifest).ok
    manifest = shots(tmp_path, "a harbour in fog", "a lighthouse at night")
    planned.clear()
    # This apply plans s1 alone; before it holds the lock, another one makes s2's new image.
    other = ("apply", manifest, "--only", "s2")
    with before_the_lock(monkeypatch, lambda: imgbatch(*other, home=tmp_path)) as seen:
        report = apply(manifest, ApplyOptions(only=("s1",)))

    assert seen and report.ok
    assert len(planned) == 2
    # The folder is as the manifest says: s2's entry is the other process's new image (a plan
    # from before the lock would have written s2's earlier entry back over it).
    entries = OutputFolder(tmp_path / "out").load().entries
    for shot_id in ("s1", "s2"):
        assert entries[shot_id].sha256 == file_sha256(tmp_path / "out" / f"{shot_id}.png")
    assert all(item.action is Action.UNCHANGED for item in make_plan(manifest).shots)
    assert (report.plans, report.replanned) == (2, True)


def test_apply_verbose_says_it_planned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = shots(tmp_path, "a harbour", "a lighthouse")
    assert apply(manifest).ok
    manifest = shots(tmp_path, "a harbour in fog", "a lighthouse at night")
    other = ("apply", manifest, "--only", "s2")
    with before_the_lock(monkeypatch, lambda: imgbatch(*other, home=tmp_path)):
        result = CliRunner().invoke(main, ["apply", str(manifest), "--only", "s1", "-v"])

    assert result.exit_code == 0, result.output
    assert "changed the output folder between the plan and the lock; planned again" in (
        result.stderr
    )


def test_a_gc_that_deletes_between_the_plan_and_the_lock_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = shots(tmp_path, "a harbour", "a lighthouse")
    assert apply(manifest).ok
    old_key = OutputFolder(tmp_path / "out").load().entries["s1"].key
    assert apply(shots(tmp_path, "a harbour in fog", "a lighthouse")).ok
    assert apply(shots(tmp_path, "a harbour at noon", "a lighthouse")).ok
    # s1's first image is garbage now (neither its image nor the last change's previous one);
    # reverting to it is planned as a restore from the cache, which gc then deletes.
    manifest = shots(tmp_path, "a harbour", "a lighthouse")
    cache = OutputFolder(tmp_path / "out").cache
    assert cache.path(old_key).is_file()
    with (
        before_the_lock(monkeypatch, lambda: collect_garbage([manifest], delete=True)) as seen,
        # Planned again: s1 is a new request now, which --frozen refuses before anything is
        # sent (the plan from before the lock would have restored it, found it gone, and failed
        # the shot only).
        pytest.raises(FrozenError, match="s1"),
    ):
        apply(manifest, ApplyOptions(frozen=True))

    assert seen and not cache.path(old_key).exists()


def test_with_a_store_one_more_plan_says_what_to_fetch_from_it(
    tmp_path: Path, planned: list[int]
) -> None:
    manifest = shots(tmp_path, "a harbour", "a lighthouse")
    options = ApplyOptions(provider="placeholder", store=str(tmp_path / "store"))
    assert apply(manifest, options).ok
    manifest = shots(tmp_path, "a harbour in fog", "a lighthouse")
    planned.clear()

    report = apply(manifest, options)

    assert report.ok
    assert len(planned) == report.plans == 2


def test_an_image_generate_put_in_the_cache_between_the_plan_and_the_lock_is_not_paid_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    api_env: dict[str, str],
    fake_server: FakeDashScope,
) -> None:
    # `imgbatch generate --output` into the folder keeps its image in the folder's cache (under
    # the folder's lock) and changes nothing the folder's version sees: an apply that planned
    # the same request as a create before taking the lock sent it again, and paid twice.
    manifest = shots(tmp_path, "a harbour", "a lighthouse", provider="dashscope")
    options = ApplyOptions(environ=api_env, home=tmp_path, rps=1000.0, quota_store=False)
    assert apply(manifest, options).ok
    manifest = shots(tmp_path, "a harbour", "a black cherry", provider="dashscope")
    request = '{"prompt": "a black cherry", "model": "qwen-image-max", "size": "1664*928"}'
    other = ("generate", "--request", request, "--output", tmp_path / "out" / "extra.png")

    def generate() -> None:
        done = subprocess.run(
            [sys.executable, "-m", "imgbatch", *map(str, other)],
            env={**os.environ, **api_env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert OutputFolder(tmp_path / "out").cache.has(planned_now.shot.request.key)

    planned_now = make_plan(manifest, environ=api_env, home=tmp_path).shots[1]
    assert planned_now.action is Action.REPLACE
    assert planned_now.shot.request.size == "1664*928"
    with before_the_lock(monkeypatch, generate) as seen:
        paid = fake_server.generation_count
        report = apply(manifest, options)
        assert seen and report.ok
    assert fake_server.generation_count == paid + 1  # generate's; apply restored it
