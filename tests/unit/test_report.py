"""The end-of-run summary reads what the run recorded as data, never its own words back."""

from __future__ import annotations

from pathlib import Path

from imgbatch.plan.decide import Action, Plan, PlannedShot
from imgbatch.review.outcome import ApplyReport, ShotOutcome
from imgbatch.review.report import apply_summary, quiet_summary


def _report(not_run: dict[str, str], maybe_billed: frozenset[str], stopped: str) -> ApplyReport:
    shots = tuple(PlannedShot(id, Action.CREATE, "new shot", None, None) for id in not_run)
    plan = Plan(Path("out"), shots, (), "dashscope")
    outcomes = tuple(
        ShotOutcome(
            id, Action.CREATE, "not_run", None, why_not_run=why, maybe_billed=id in maybe_billed
        )
        for id, why in not_run.items()
    )
    return ApplyReport(
        plan=plan,
        results_path=Path("out/results.json"),
        shots=outcomes,
        stopped=stopped,
        interrupted=False,
        requests=1,
        billed=0,
        maybe_billed=len(maybe_billed),
        throttled=0,
        retries=0,
        quotas=(),
        elapsed=1.0,
    )


def test_a_stop_reason_that_says_may_have_does_not_make_unsent_shots_maybe_billed() -> None:
    """The summary found the shots that may have been billed by looking for "may have" in
    their reasons, so a stop whose own words had it (the service: "the key may have expired")
    said of shots never sent that DashScope may have billed them."""
    stopped = "401 InvalidApiKey: the API key may have expired"
    report = _report(
        {"s1": f"not run: {stopped}", "s2": f"not run: {stopped}"}, frozenset(), stopped
    )
    summary = apply_summary(report)
    assert "2 shots not run: nothing of theirs was sent or changed" in summary
    assert "may have billed" not in summary
    assert quiet_summary(report).splitlines()[1:] == [
        f"Stopped: {stopped}",
        "2 shots not run: nothing of theirs was sent or changed, and the next apply makes them.",
    ]


def test_a_shot_sent_and_never_answered_is_said_to_be_maybe_billed() -> None:
    reason = "abandoned in flight when interrupted; DashScope may have billed it"
    report = _report({"s1": reason, "s2": "not run: interrupted"}, frozenset({"s1"}), "interrupted")
    summary = apply_summary(report)
    assert "1 shot not run: nothing of its" not in summary
    assert "1 shot sent and not answered (s1): DashScope may have billed it" in summary


def test_the_summary_and_the_json_read_the_same_outcome_per_shot() -> None:
    """Each shot's outcome is decided once, as data: the counts, `--json`'s shots and the
    summary's lines all read it (they once each worked it out from the plan and entries)."""
    from dataclasses import replace

    from imgbatch.review.report import apply_json
    from tests.unit.test_store_results import result

    refused = replace(
        result("s2", "failed", file=None),
        error="400 DataInspectionFailed: Input data may contain inappropriate content.",
        error_code="DataInspectionFailed",
        error_status=400,
    )
    outcomes = (
        ShotOutcome("s1", Action.CREATE, "generated", result("s1"), billed=True),
        ShotOutcome("s2", Action.CREATE, "failed", refused),
        ShotOutcome("s3", Action.UNCHANGED, "unchanged", result("s3", "cached")),
        ShotOutcome(
            "s4", Action.REPLACE, "not_run", result("s4"), why_not_run="lost", maybe_billed=True
        ),
    )
    plan = Plan(
        Path("out"),
        tuple(PlannedShot(o.id, o.action, "why", None, o.entry) for o in outcomes),
        (),
        "dashscope",
    )
    report = replace(_report({}, frozenset(), "interrupted"), plan=plan, shots=outcomes)
    document = apply_json(report)
    assert [(shot["id"], shot["status"]) for shot in document["shots"]] == [
        ("s1", "generated"),
        ("s2", "failed"),
        ("s3", "unchanged"),
        ("s4", "not_run"),
    ]
    assert document["shots"][1]["error_code"] == "DataInspectionFailed"
    assert document["shots"][3] == {
        "id": "s4",
        "status": "not_run",
        "file": "s4.png",  # kept from before, untouched
        "error": "lost",
        "error_code": None,
        "request_id": None,
        "moved_aside": None,
    }
    counts = {name: document["summary"][name] for name in ("generated", "failed", "not_run")}
    assert counts == {"generated": 1, "failed": 1, "not_run": 1}
    assert document["summary"]["unchanged"] == report.unchanged == 1
    assert report.entries == tuple(o.entry for o in outcomes)
    assert report.maybe_billed_not_run == frozenset({"s4"})
    summary = apply_summary(report)
    assert "1 generated, 0 cached, 1 failed, 1 unchanged, 1 not run" in summary
    assert "1 shot sent and not answered (s4)" in summary
