"""The GitHub Actions job summary: `plan` and `apply` append markdown to $GITHUB_STEP_SUMMARY.

Takes: small manifests run with the offline placeholder provider, and against the fake DashScope
server for a refused shot whose error is hostile markdown.
Gives: evidence that each command appends (never replaces) its counts, requests, cost and a table
of the shots with something to do or that changed or failed; that user and service text cannot
break the table; that a long table is capped; and that a summary file that cannot be written
is a warning, never a failed run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgbatch.review.step_summary import MAX_ROWS, apply_markdown, plan_markdown
from tests.cli.test_cli import FAST, assert_clean, run
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest, write_many_shots

OFFLINE = ("--provider", "placeholder")
EARLIER = "## An earlier step\n\nits own summary\n"


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of every markdown table, cell text unstripped of escapes."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith(("| shot ", "|---")):
            # Split on bars that are not escaped.
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            rows.append([cell.strip() for cell in cells])
    return rows


@pytest.fixture
def summary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "step_summary.md"
    path.write_text(EARLIER, encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(path))
    return path


def test_plan_and_apply_append_their_summaries(summary_file: Path, tmp_path: Path) -> None:
    manifest = write_many_shots(tmp_path, "three", 3)

    assert run("plan", manifest, *OFFLINE).exit_code == 0
    text = summary_file.read_text(encoding="utf-8")
    assert text.startswith(EARLIER)
    plan_part = text[len(EARLIER) :]
    assert f"### `imgbatch plan {manifest}`" in plan_part
    # The placeholder costs nothing (no currency: nothing is priced).
    assert "3 create · 3 offline requests · estimated cost: 0.00" in plan_part
    assert table_rows(plan_part) == [[f"shot-00{i}", "create", "new shot"] for i in range(3)]

    assert run("apply", manifest, *OFFLINE).exit_code == 0
    text = summary_file.read_text(encoding="utf-8")
    assert text.startswith(EARLIER + plan_part)
    apply_part = text[len(EARLIER + plan_part) :]
    assert f"### `imgbatch apply {manifest}`" in apply_part
    assert "3 generated · 3 offline requests sent · 0 throttled (429) · cost: 0.00" in apply_part
    assert table_rows(apply_part) == [[f"shot-00{i}", "generated", ""] for i in range(3)]

    # Nothing to do: the counts, and no table of unchanged shots.
    before = summary_file.read_text(encoding="utf-8")
    assert run("apply", manifest, *OFFLINE, "--only", "shot-001").exit_code == 0
    last = summary_file.read_text(encoding="utf-8")[len(before) :]
    assert f"### `imgbatch apply {manifest} --only shot-001`" in last
    assert "1 unchanged · 0 offline requests sent" in last
    assert table_rows(last) == []


def test_a_failed_shot_is_a_row_and_its_error_cannot_break_the_table(
    summary_file: Path, api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = write_manifest(
        tmp_path,
        "version: 1\nname: two\nshots:\n"
        "  - id: good\n    prompt: a lighthouse\n"
        "  - id: refused\n    prompt: a lighthouse at dusk\n",
    )
    assert run("apply", manifest, *FAST).exit_code == 0
    manifest.write_text(manifest.read_text().replace("at dusk", "at noon"))
    hostile = "bad | pipe\nsecond line <img src=x> **bold** [link](http://x)"
    fake_server.enqueue_error(400, "InvalidParameter", hostile)
    result = run("apply", manifest, *FAST)
    assert result.exit_code == 1, result.output
    assert_clean(result)

    part = summary_file.read_text(encoding="utf-8").split("### `imgbatch apply")[-1]
    assert "0 generated" not in part  # the counts are of what the run did
    assert "1 unchanged, 1 failed · 1 request sent" in part
    (row,) = table_rows(part)
    assert row[:2] == ["refused", "failed"]
    # One line, every bar and markup character escaped.
    assert row[2] == (
        r"400 InvalidParameter: bad \| pipe second line \<img src=x\> \*\*bold\*\* "
        r"\[link\]\(http://x\)"
    )
    assert "\n" not in row[2]


def test_a_long_table_is_capped(summary_file: Path, tmp_path: Path) -> None:
    count = MAX_ROWS + 7
    manifest = write_many_shots(tmp_path, "many", count)
    assert run("plan", manifest, *OFFLINE).exit_code == 0
    part = summary_file.read_text(encoding="utf-8")[len(EARLIER) :]
    assert len(table_rows(part)) == MAX_ROWS
    assert part.rstrip().endswith("and 7 more")
    assert f"{count} create" in part


@pytest.mark.parametrize("where", ["missing-folder/summary.md", "a-folder"])
def test_an_unwritable_summary_is_a_warning_not_a_failure(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-folder").mkdir()
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / where))
    manifest = write_many_shots(tmp_path, "one", 1)
    for command in ("plan", "apply"):
        result = run(command, manifest, *OFFLINE)
        assert result.exit_code == 0, result.output
        assert_clean(result)
        assert f"warning: the job summary was not written to {tmp_path / where}" in result.stderr
    assert (tmp_path / "output" / "one" / "shot-000.png").is_file()


def test_no_summary_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.chdir(tmp_path)
    manifest = write_many_shots(tmp_path, "one", 1)
    result = run("apply", manifest, *OFFLINE)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["output", "shots.yaml"]


def test_a_known_cost_is_shown_with_its_currency() -> None:
    # The documents as `plan --json` and `apply --json` give them once prices are known.
    plan = {
        "shots": [{"id": "a", "action": "create", "reason": "new shot"}],
        "summary": {"paid_requests": 1, "estimated_cost": 0.0375, "currency": "USD"},
    }
    assert "1 paid request · estimated cost: 0.0375 USD" in plan_markdown(plan, "imgbatch plan")
    applied = {
        "shots": [{"id": "a", "status": "generated", "error": None}],
        "summary": {
            "requests": 3,
            "cost": 1.5,
            "possible_extra_cost": 0.5,
            "currency": "CNY",
            "remaining": 4,
        },
    }
    text = apply_markdown(applied, "imgbatch apply", stopped="a bound | was reached")
    assert "3 requests sent · 0 throttled (429) · cost: 1.50 CNY (+0.50 CNY possibly)" in text
    assert "Stopped: a bound \\| was reached" in text
    assert "4 shots remain: run again to continue." in text


def test_a_command_that_ends_in_an_error_says_why_in_the_summary(
    summary_file: Path, tmp_path: Path
) -> None:
    """`apply --frozen` refusing is the CI check saying no: the job's page says which shots."""
    manifest = write_many_shots(tmp_path, "frozen", 2)
    result = run("apply", manifest, *OFFLINE, "--frozen")
    assert result.exit_code == 1, result.output
    part = summary_file.read_text(encoding="utf-8")[len(EARLIER) :]
    assert part.startswith("### `imgbatch apply` failed (exit 1)\n")
    assert "would need a paid request: shot-000 \\(create: new shot\\)" in part

    bad = write_manifest(tmp_path, "version: 1\nshots:\n  - id: a\n    prompt: x\n    sise: 1\n")
    before = summary_file.read_text(encoding="utf-8")
    assert run("plan", bad).exit_code == 2
    part = summary_file.read_text(encoding="utf-8")[len(before) :]
    assert part.startswith("### `imgbatch plan` failed (exit 2)\n")
    assert "sise" in part
