"""The end-of-run summary reads what the run recorded as data, never its own words back."""

from __future__ import annotations

from pathlib import Path

from imgbatch.plan.decide import Action, Plan, PlannedShot
from imgbatch.review.outcome import ApplyReport
from imgbatch.review.report import apply_summary, quiet_summary


def _report(not_run: dict[str, str], maybe_billed: frozenset[str], stopped: str) -> ApplyReport:
    shots = tuple(PlannedShot(id, Action.CREATE, "new shot", None, None) for id in not_run)
    plan = Plan(Path("out"), shots, (), "dashscope")
    return ApplyReport(
        plan=plan,
        results_path=Path("out/results.json"),
        entries=(),
        stopped=stopped,
        interrupted=False,
        requests=1,
        billed=0,
        maybe_billed=len(maybe_billed),
        throttled=0,
        retries=0,
        quotas=(),
        elapsed=1.0,
        not_run=not_run,
        maybe_billed_not_run=maybe_billed,
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
