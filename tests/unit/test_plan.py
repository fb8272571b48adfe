"""make_plan: what each shot needs, from the shots, the previous results and the image cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from imgbatch.manifest.reference import ReferenceImage
from imgbatch.plan.decide import Action, Plan, aside_path, make_plan
from imgbatch.run.apply import ApplyOptions, apply
from imgbatch.run.apply import make_plan as plan_manifest
from imgbatch.shots.expand import Shot
from imgbatch.shots.request import ImageRequest
from imgbatch.state.cache import ImageCache
from imgbatch.state.folder import OutputFolder
from imgbatch.state.results import ResultEntry
from tests.support.files import write_manifest

IMAGE = b"\x89PNG pretend image bytes"


def shot(shot_id: str, prompt: str = "a red bicycle", **fields: object) -> Shot:
    request = ImageRequest(prompt=prompt, size="1328*1328", provider="placeholder", **fields)
    return Shot(shot_id, request, f"{shot_id}.png")


def entry(
    made: Shot, status: str = "generated", *, data: bytes = IMAGE, error: str | None = None
) -> ResultEntry:
    """A results.json line as the executor writes it for `made`."""
    request = made.request
    failed = status == "failed"
    return ResultEntry(
        id=made.id,
        status=status,  # type: ignore[arg-type]
        file=None if failed else made.file,
        key=request.key,
        width=None if failed else 1328,
        height=None if failed else 1328,
        seed=request.seed,
        model=request.model,
        size=request.size,
        prompt=request.prompt,
        image_url=None,
        request_id=None,
        error=error,
        bytes=None if failed else len(data),
        attempts=1,
        request=request.canonical(),
    )


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "output" / "spot"


@pytest.fixture
def cache(out: Path) -> ImageCache:
    return OutputFolder(out).cache


def place(out: Path, made: Shot, data: bytes = IMAGE) -> None:
    (out / made.file).parent.mkdir(parents=True, exist_ok=True)
    (out / made.file).write_bytes(data)


def plan_of(out: Path, shots: list[Shot], state: list[ResultEntry], cache: ImageCache) -> Plan:
    return make_plan(
        out, tuple(shots), {item.id: item for item in state}, cache, provider="placeholder"
    )


def single_action(plan: Plan) -> tuple[Action, str]:
    (item,) = plan.shots
    return item.action, item.reason


# --- one shot at a time -----------------------------------------------------------------------


def test_new_shot_is_created(out: Path, cache: ImageCache) -> None:
    new = shot("s01")
    plan = plan_of(out, [new], [], cache)

    (item,) = plan.shots
    assert (item.id, item.action, item.reason) == ("s01", Action.CREATE, "new shot")
    assert item.shot is new
    assert item.previous is None
    assert plan.orphans == ()
    assert (plan.output_dir, plan.provider) == (out, "placeholder")


def test_failed_shot_is_created_again_saying_why_it_failed(out: Path, cache: ImageCache) -> None:
    again = shot("s01")
    failed = entry(again, "failed", error="400 DataInspectionFailed: input text is unsafe")
    plan = plan_of(out, [again], [failed], cache)

    assert single_action(plan) == (
        Action.CREATE,
        "failed last time: 400 DataInspectionFailed: input text is unsafe",
    )
    assert plan.shots[0].previous is failed


def test_failed_shot_without_an_error_message(out: Path, cache: ImageCache) -> None:
    again = shot("s01")
    plan = plan_of(out, [again], [entry(again, "failed")], cache)
    assert single_action(plan) == (Action.CREATE, "failed last time: unknown error")


def test_failed_shot_whose_file_happens_to_exist_is_not_unchanged(
    out: Path, cache: ImageCache
) -> None:
    again = shot("s01")
    place(out, again)
    failed = replace(entry(again), status="failed", error="boom")
    assert single_action(plan_of(out, [again], [failed], cache))[0] is Action.CREATE


def test_failed_shot_edited_since_is_created_not_replaced(out: Path, cache: ImageCache) -> None:
    before = shot("s01", "a rude prompt")
    failed = entry(before, "failed", error="400 DataInspectionFailed: input text is unsafe")
    plan = plan_of(out, [shot("s01", "a polite prompt")], [failed], cache)

    action, reason = single_action(plan)
    assert action is Action.CREATE
    assert "DataInspectionFailed" in reason


URL = "https://dashscope-result-bj.oss-cn-beijing.aliyuncs.com/1.png"
NOW = 1_800_000_000.0


def unfetched(made: Shot, url: str) -> ResultEntry:
    """The entry of `made` billed by the service but never downloaded."""
    return replace(
        entry(made, "failed", error="could not be downloaded"),
        status="unfetched",
        image_url=url,
        request_id="req-1",
    )


def test_billed_but_not_downloaded_is_recovered_not_paid_for(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    billed = unfetched(made, f"{URL}?Expires={int(NOW) + 3600}&Signature=x")
    plan = make_plan(out, (made,), {"s01": billed}, cache, provider="dashscope", now=NOW)

    assert single_action(plan) == (
        Action.RECOVER,
        "billed last time but not downloaded: its URL is fetched (if it no longer works, one "
        "paid request)",
    )
    assert plan.shots[0].previous is billed
    assert plan.paid_requests == 0
    assert plan.has_work  # `plan --detailed-exitcode` exits 2


def test_a_url_without_an_expiry_is_tried(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    plan = plan_of(out, [made], [unfetched(made, URL)], cache)
    assert single_action(plan)[0] is Action.RECOVER


def test_an_expired_url_is_a_paid_create_saying_when_it_expired(
    out: Path, cache: ImageCache
) -> None:
    made = shot("s01")
    billed = unfetched(made, f"{URL}?Expires={int(NOW) - 60}&Signature=x")
    plan = make_plan(out, (made,), {"s01": billed}, cache, provider="dashscope", now=NOW)

    assert single_action(plan) == (
        Action.CREATE,
        "billed last time but not downloaded, and its URL expired at 2027-01-15 07:59 UTC: "
        "one paid request",
    )
    assert plan.paid_requests == 1


def test_billed_but_not_downloaded_and_then_edited_is_created(out: Path, cache: ImageCache) -> None:
    before = shot("s01", "a red bicycle")
    after = shot("s01", "a blue bicycle")
    plan = plan_of(out, [after], [unfetched(before, URL)], cache)
    assert single_action(plan) == (
        Action.CREATE,
        "changed since its image was billed but not downloaded",
    )


def test_billed_but_not_downloaded_with_another_reference_url_is_created_not_replaced(
    out: Path, cache: ImageCache
) -> None:
    before = shot("s01", reference=ReferenceImage("ab" * 32, "http://a.test/old.png"))
    after = shot("s01", reference=ReferenceImage.at_url("http://a.test/new.png"))
    billed = replace(unfetched(before, URL), reference_url="http://a.test/old.png")
    plan = plan_of(out, [after], [billed], cache)
    assert single_action(plan) == (
        Action.CREATE,
        "changed since its image was billed but not downloaded",
    )


def test_billed_but_not_downloaded_whose_image_is_in_the_cache_is_restored(
    out: Path, cache: ImageCache
) -> None:
    made = shot("s01")
    cache.put(made.request.key, IMAGE)
    plan = plan_of(out, [made], [unfetched(made, URL)], cache)
    assert single_action(plan)[0] is Action.RESTORE


def test_changed_request_is_replaced_naming_the_changed_fields(
    out: Path, cache: ImageCache
) -> None:
    before = shot("s01", "a red bicycle", seed=1)
    after = shot("s01", "a blue bicycle", seed=2)
    place(out, before)
    cache.put(before.request.key, IMAGE)

    plan = plan_of(out, [after], [entry(before)], cache)

    assert single_action(plan) == (Action.REPLACE, "changed: text, seed")
    assert plan.paid_requests == 1


def test_changed_style_and_size_are_named(out: Path, cache: ImageCache) -> None:
    before = shot("s01")
    after = Shot("s01", replace(before.request, style="ink", size="928*1664"), "s01.png")
    place(out, before)
    plan = plan_of(out, [after], [entry(before)], cache)
    assert single_action(plan) == (Action.REPLACE, "changed: text, size")


def test_key_format_change_alone_is_a_replace_saying_so(out: Path, cache: ImageCache) -> None:
    current = shot("s01")
    place(out, current)
    # Same canonical request, but made under an older key format: another key.
    old = replace(entry(current), key="0" * 64)
    plan = plan_of(out, [current], [old], cache)
    assert single_action(plan) == (Action.REPLACE, "request format changed")


def test_unchanged_when_the_file_on_disk_has_the_recorded_size(
    out: Path, cache: ImageCache
) -> None:
    made = shot("s01")
    place(out, made)
    previous = entry(made)
    plan = plan_of(out, [made], [previous], cache)

    assert single_action(plan) == (Action.UNCHANGED, "image matches")
    assert plan.shots[0].previous is previous
    assert plan.paid_requests == 0
    assert not plan.has_changes


def test_cached_status_counts_as_made(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    place(out, made)
    plan = plan_of(out, [made], [entry(made, "cached")], cache)
    assert single_action(plan)[0] is Action.UNCHANGED


def test_deleted_file_is_restored_from_the_cache(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    place(out, made)
    cache.put(made.request.key, IMAGE)
    state = [entry(made)]
    assert single_action(plan_of(out, [made], state, cache))[0] is Action.UNCHANGED

    (out / made.file).unlink()
    plan = plan_of(out, [made], state, cache)

    assert single_action(plan) == (Action.RESTORE, "file missing; restored from the cache")
    assert plan.paid_requests == 0
    assert plan.has_changes


def test_a_file_edited_by_hand_is_drift_and_kept(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    place(out, made, IMAGE + b" edited in an image editor")
    cache.put(made.request.key, IMAGE)
    plan = plan_of(out, [made], [entry(made)], cache)

    assert single_action(plan) == (
        Action.DRIFT,
        f"s01.png was edited since imgbatch wrote it ({len(IMAGE) + 26} bytes, not "
        f"{len(IMAGE)}): kept as it is (--overwrite-edited puts imgbatch's image back)",
    )
    assert not plan.shots[0].move_aside
    # Nothing to send, nothing to write: `plan --detailed-exitcode` exits 0 on a drift alone.
    assert plan.paid_requests == 0
    assert not plan.has_work
    assert plan.has_changes


def test_an_edited_file_is_put_back_only_when_told_to_overwrite(
    out: Path, cache: ImageCache
) -> None:
    made = shot("s01")
    place(out, made, IMAGE + b" edited")
    cache.put(made.request.key, IMAGE)
    state = {made.id: entry(made)}

    plan = make_plan(out, (made,), state, cache, provider="placeholder", overwrite_edited=True)
    assert single_action(plan) == (
        Action.RESTORE,
        "edited by hand; imgbatch's image is put back from the cache",
    )
    assert not plan.shots[0].move_aside

    cache.discard(made.request.key)
    plan = make_plan(out, (made,), state, cache, provider="placeholder", overwrite_edited=True)
    assert single_action(plan) == (
        Action.CREATE,
        "edited by hand, and imgbatch's image is not in the cache: made again",
    )
    # Without the flag, an edit is kept even when imgbatch's own image is gone.
    assert single_action(plan_of(out, [made], [entry(made)], cache))[0] is Action.DRIFT


def test_an_edited_file_whose_request_changed_too_is_moved_aside(
    out: Path, cache: ImageCache
) -> None:
    before = shot("s01", "a red bicycle")
    after = shot("s01", "a blue bicycle")
    place(out, before, IMAGE + b" retouched")
    (out / "s01.edited.png").write_bytes(b"an earlier edit, kept")

    plan = plan_of(out, [after], [entry(before)], cache)

    (item,) = plan.shots
    assert (item.action, item.move_aside) == (Action.REPLACE, True)
    assert item.reason == "changed: text; edited s01.png is moved aside to s01.edited-2.png"
    assert plan.paid_requests == 1

    unedited = plan_of(out, [after], [entry(before, data=IMAGE + b" retouched")], cache)
    assert (unedited.shots[0].action, unedited.shots[0].move_aside) == (Action.REPLACE, False)
    told = make_plan(
        out,
        (after,),
        {"s01": entry(before)},
        cache,
        provider="placeholder",
        overwrite_edited=True,
    )
    assert (told.shots[0].reason, told.shots[0].move_aside) == ("changed: text", False)


def test_an_edited_file_is_moved_aside_before_a_restore_of_another_request_too(
    out: Path, cache: ImageCache
) -> None:
    first = shot("s01", "a red bicycle")
    second = shot("s01", "a blue bicycle")
    cache.put(first.request.key, IMAGE)
    place(out, second, b"retouched by hand")

    plan = plan_of(out, [first], [entry(second)], cache)

    (item,) = plan.shots
    assert (item.action, item.move_aside) == (Action.RESTORE, True)
    assert item.reason.endswith("; edited s01.png is moved aside to s01.edited.png")


def test_a_missing_file_is_not_drift(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    plan = plan_of(out, [made], [entry(made)], cache)
    assert single_action(plan)[0] is Action.CREATE
    assert not plan.shots[0].move_aside


def test_aside_path_never_names_a_file_that_exists(tmp_path: Path) -> None:
    image = tmp_path / "s01.png"
    assert aside_path(image) == tmp_path / "s01.edited.png"
    (tmp_path / "s01.edited.png").write_bytes(b"1")
    (tmp_path / "s01.edited-2.png").symlink_to(tmp_path / "nowhere")
    assert aside_path(image) == tmp_path / "s01.edited-3.png"


def test_deleted_file_not_in_the_cache_is_created(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    plan = plan_of(out, [made], [entry(made)], cache)
    assert single_action(plan) == (Action.CREATE, "image missing from disk and cache")


def test_renamed_shot_is_restored_and_its_old_id_is_an_orphan(out: Path, cache: ImageCache) -> None:
    old = shot("s01-dusk")
    place(out, old)
    cache.put(old.request.key, IMAGE)
    renamed = shot("s01-sunset")
    assert renamed.request.key == old.request.key

    plan = plan_of(out, [renamed], [entry(old)], cache)

    (item,) = plan.shots
    assert (item.id, item.action, item.reason) == (
        "s01-sunset",
        Action.RESTORE,
        "this exact request was made before; restored from the cache",
    )
    assert item.previous is None
    (orphan,) = plan.orphans
    assert (orphan.id, orphan.action, orphan.shot) == ("s01-dusk", Action.ORPHAN, None)
    assert plan.paid_requests == 0


def test_reverting_to_an_earlier_prompt_restores_its_cached_image(
    out: Path, cache: ImageCache
) -> None:
    first = shot("s01", "a red bicycle")
    second = shot("s01", "a blue bicycle")
    # Made first, then edited and made again: both images are in the cache.
    cache.put(first.request.key, IMAGE)
    cache.put(second.request.key, IMAGE + b"2")
    place(out, second, IMAGE + b"2")

    plan = plan_of(out, [first], [entry(second, data=IMAGE + b"2")], cache)

    assert single_action(plan) == (
        Action.RESTORE,
        "this exact request was made before; restored from the cache",
    )
    assert plan.shots[0].previous is not None
    assert plan.shots[0].previous.key == second.request.key


def test_orphans_are_listed_with_their_last_entry(out: Path, cache: ImageCache) -> None:
    kept = shot("s01")
    gone = shot("s02", "a helmet")
    failed_gone = shot("s03", "a bottle")
    place(out, kept)
    billed_gone = shot("s04", "a lamp")
    state = [
        entry(kept),
        entry(gone),
        entry(failed_gone, "failed", error="x"),
        replace(entry(billed_gone), status="unfetched", image_url="https://oss.example/s04.png"),
    ]

    plan = plan_of(out, [kept], state, cache)

    assert [item.id for item in plan.orphans] == ["s02", "s03", "s04"]
    for item, previous in zip(plan.orphans, state[1:], strict=True):
        assert item.action is Action.ORPHAN
        assert item.shot is None
        assert item.previous is previous
    # What each leaves behind: a file, nothing, or a paid image still to recover.
    assert [item.reason for item in plan.orphans] == [
        "no longer in the manifest; its file is kept",
        "no longer in the manifest; it has no image",
        "no longer in the manifest; its image was billed but not downloaded, and a shot with "
        "the same request recovers it",
    ]
    assert plan.count(Action.ORPHAN) == 3
    assert plan.paid_requests == 0
    assert plan.has_changes  # orphans are news, though nothing is sent


def test_plan_keeps_manifest_order_and_counts_actions(out: Path, cache: ImageCache) -> None:
    unchanged = shot("a-unchanged", "one")
    replaced_before = shot("b-replaced", "two")
    replaced = shot("b-replaced", "two, edited")
    restored = shot("c-restored", "three")
    created = shot("d-created", "four")
    failed = shot("e-failed", "five")
    place(out, unchanged)
    place(out, replaced_before)
    cache.put(restored.request.key, IMAGE)
    state = [
        entry(failed, "failed", error="500 InternalError"),
        entry(unchanged),
        entry(replaced_before),
        entry(shot("z-orphan", "six")),
    ]

    plan = plan_of(out, [unchanged, replaced, restored, created, failed], state, cache)

    assert [(item.id, item.action) for item in plan.shots] == [
        ("a-unchanged", Action.UNCHANGED),
        ("b-replaced", Action.REPLACE),
        ("c-restored", Action.RESTORE),
        ("d-created", Action.CREATE),
        ("e-failed", Action.CREATE),
    ]
    assert {action: plan.count(action) for action in Action} == {
        Action.CREATE: 2,
        Action.REPLACE: 1,
        Action.UNCHANGED: 1,
        Action.RESTORE: 1,
        Action.RECOVER: 0,
        Action.DRIFT: 0,
        Action.ORPHAN: 1,
    }
    assert plan.paid_requests == 3


def test_plan_never_reads_or_writes_the_output_folder(out: Path, cache: ImageCache) -> None:
    plan = plan_of(out, [shot("s01"), shot("s02", "x")], [], cache)
    assert plan.paid_requests == 2
    assert not out.exists()


# --- the library's make_plan on a manifest file ----------------------------------------------


MANIFEST = """\
version: 1
name: spot
provider: dashscope
defaults:
  size: "928*1664"
shots:
  - id: s01
    prompt: a red bicycle
  - id: s02
    prompt: a helmet
"""


def test_api_make_plan_on_a_fresh_manifest(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, MANIFEST)

    plan = plan_manifest(path, provider="placeholder", environ={})

    assert plan.provider == "placeholder"  # the argument wins over the manifest
    assert plan.output_dir == tmp_path / "output" / "spot"
    assert [(item.id, item.action, item.reason) for item in plan.shots] == [
        ("s01", Action.CREATE, "new shot"),
        ("s02", Action.CREATE, "new shot"),
    ]
    assert plan.paid_requests == 2
    assert not (tmp_path / "output").exists()


def test_api_make_plan_after_apply_then_edit(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, MANIFEST)
    report = apply(path, ApplyOptions(provider="placeholder", environ={}))
    assert report.ok

    settled = plan_manifest(path, provider="placeholder", environ={})
    assert [item.action for item in settled.shots] == [Action.UNCHANGED, Action.UNCHANGED]
    assert not settled.has_changes

    edited = MANIFEST.replace("a red bicycle", "a red bicycle at night").replace(
        "  - id: s02\n    prompt: a helmet\n", "  - id: s03\n    prompt: a helmet\n"
    )
    path.write_text(edited, encoding="utf-8")
    plan = plan_manifest(path, provider="placeholder", environ={})

    assert [(item.id, item.action, item.reason) for item in plan.shots] == [
        ("s01", Action.REPLACE, "changed: text"),
        ("s03", Action.RESTORE, "this exact request was made before; restored from the cache"),
    ]
    assert [(item.id, item.action) for item in plan.orphans] == [("s02", Action.ORPHAN)]
    assert plan.paid_requests == 1


# --- the record a restore is checked against --------------------------------------------------


def recorded(made: Shot, sha256: str, status: str = "generated") -> ResultEntry:
    return replace(entry(made, status), sha256=sha256)


def restore_record(
    out: Path, cache: ImageCache, wanted: Shot, state: list[ResultEntry]
) -> str | None:
    cache.put(wanted.request.key, IMAGE)
    (item,) = plan_of(out, [wanted], state, cache).shots
    assert item.action is Action.RESTORE
    return item.record.sha256 if item.record else None


def test_a_restore_is_checked_against_its_own_record(out: Path, cache: ImageCache) -> None:
    made = shot("s01")
    assert restore_record(out, cache, made, [recorded(made, "a" * 64)]) == "a" * 64


def test_a_renamed_shot_is_checked_against_the_record_its_old_id_left(
    out: Path, cache: ImageCache
) -> None:
    old = shot("s01-old")
    assert restore_record(out, cache, shot("s01-new"), [recorded(old, "b" * 64)]) == "b" * 64


def test_a_failed_entry_or_an_unrecorded_key_leaves_nothing_to_check_but_the_decode(
    out: Path, cache: ImageCache
) -> None:
    made = shot("s01")
    failed = recorded(made, "c" * 64, status="failed")
    assert restore_record(out, cache, made, [failed]) is None
    # A revert to an earlier prompt: results.json only holds the later request's record.
    later = recorded(shot("s01", "a blue bicycle"), "d" * 64)
    assert restore_record(out, cache, made, [later]) is None
