"""`imgbatch quota show` and `imgbatch quota forget`: what earlier runs remembered, and dropping it.

Takes a quota store in a temporary user cache directory (XDG_CACHE_HOME), written as a run
writes it; gives evidence that show lists account fingerprint, endpoint, model, quota, source
and when (never the key) and the credit of 429s saved up to test it, that forget drops one
model's or every one, that a remembered quota no service would mean (a poisoned header's) is
neither listed nor where a run starts, and that a file written before the credit was kept loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgbatch.pacing.gate import Finding
from imgbatch.pacing.learned import QuotaStore, default_store_path
from imgbatch.pacing.quota import CREDIT_CAP
from imgbatch.units.quota import Quota
from tests.cli.test_cli import assert_clean, run

ACCOUNT = "0123456789abcdef@https://dashscope-intl.aliyuncs.com/api/v1"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> QuotaStore:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quotas = QuotaStore(default_store_path())
    quotas.save(
        ACCOUNT,
        [
            Finding("qwen-image-max", Quota(3, 3), "probed", None, False, None, 2, 1.25),
            Finding("qwen-image-plus", Quota(2, 60), "stated", 1, True, Quota(2, 60), 0),
        ],
    )
    return quotas


def test_show_lists_each_remembered_quota_where_it_came_from_and_when(store: QuotaStore) -> None:
    result = run("quota", "show")
    assert_clean(result)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 2
    max_line, plus_line = lines
    assert max_line.startswith("0123456789abcdef  https://dashscope-intl.aliyuncs.com/api/v1  ")
    assert "qwen-image-max  3/3s  (found from 429s, 20" in max_line
    assert "qwen-image-plus  2/60s, 1 in progress  (stated by the service, 20" in plus_line
    assert max_line.endswith(")  probe credit: 1.25 429s")
    assert plus_line.endswith(")  probe credit: 0 429s")


def test_a_file_written_before_the_credit_was_kept_loads_with_none(store: QuotaStore) -> None:
    records = json.loads(store.path.read_text())
    for record in records.values():
        del record["credit"]
    store.path.write_text(json.dumps(records))
    learned = store.load(ACCOUNT, ["qwen-image-max"])["qwen-image-max"]
    assert learned.window == Quota(3, 3) and learned.credit == 0.0
    assert "3/3s  (found from 429s, 20" in run("quota", "show").output


@pytest.mark.parametrize(
    ("credit", "loaded"),
    [("NaN", 0.0), ("Infinity", 0.0), ('"lots"', 0.0), (True, 0.0), (-2, 0.0), (1e9, CREDIT_CAP)],
)
def test_a_hand_edited_credit_is_never_more_than_the_cap(
    store: QuotaStore, credit: object, loaded: float
) -> None:
    """A credit is 429s a run may spend: one no run could have earned is not spent."""
    text = store.path.read_text().replace('"credit": 1.25', f'"credit": {json.dumps(credit)}')
    store.path.write_text(text.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity"))
    assert store.load(ACCOUNT, ["qwen-image-max"])["qwen-image-max"].credit == loaded
    assert run("quota", "show").exit_code == 0


def test_a_run_that_kept_its_remembered_quota_changes_only_the_credit(store: QuotaStore) -> None:
    before = json.loads(store.path.read_text())[f"{ACCOUNT} qwen-image-max"]
    kept = Finding("qwen-image-max", Quota(3, 3), "learned", None, False, None, 1, 0.4)
    assert store.save(ACCOUNT, [kept]) == []  # (no quota newly kept: the summary says so)
    after = json.loads(store.path.read_text())[f"{ACCOUNT} qwen-image-max"]
    assert after == {**before, "credit": 0.4}


def test_forget_drops_one_models_quota_or_every_one(store: QuotaStore) -> None:
    result = run("quota", "forget", "--model", "qwen-image-plus")
    assert_clean(result)
    assert result.output == "Forgot 1 remembered quota.\n"
    assert [item.model for item in store.remembered()] == ["qwen-image-max"]
    assert run("quota", "forget").output == "Forgot 1 remembered quota.\n"
    assert store.remembered() == []
    assert "No quota remembered" in run("quota", "show").output


def test_a_remembered_quota_no_service_would_mean_is_not_where_a_run_starts(
    store: QuotaStore,
) -> None:
    """Issue 18: a flow-control header of 1 per 1e9 s was remembered and stalled the next run."""
    records = json.loads(store.path.read_text())
    records[f"{ACCOUNT} qwen-image-max"].update(count=1, period=1e9)
    store.path.write_text(json.dumps(records))
    assert store.load(ACCOUNT, ["qwen-image-max"]) == {}
    assert "qwen-image-max" not in run("quota", "show").output


@pytest.mark.parametrize(
    "fields",
    [
        {"count": "Infinity", "period": 60},
        {"cap": "Infinity"},
        {"count": 5, "period": 60, "saved_at": 10**17},
        {"count": 5, "period": 60, "saved_at": -(10**17)},
    ],
    ids=["infinite count", "infinite cap", "saved in year 3e9", "saved before year 1"],
)
def test_a_hostile_quota_store_is_a_head_start_lost_never_a_crash(
    fields: dict[str, object], store: QuotaStore
) -> None:
    # quotas.json is JSON as Python reads it: `Infinity` parses, and int() of it overflowed,
    # crashing every apply of that account (and `quota show`), as did a saved_at no date has.
    records = json.loads(store.path.read_text())
    records[f"{ACCOUNT} qwen-image-max"] = {"source": "probed", **fields}
    text = json.dumps(records).replace('"Infinity"', "Infinity")
    store.path.write_text(text)
    learned = store.load(ACCOUNT, ["qwen-image-max", "qwen-image-plus"])
    assert "qwen-image-plus" in learned  # the other record still counts
    result = run("quota", "show")
    assert result.exit_code == 0, result.output
    assert "qwen-image-plus  2/60s" in result.output
    assert "unexpected" not in result.output


def test_show_prints_no_control_character_the_file_holds(store: QuotaStore) -> None:
    records = json.loads(store.path.read_text())
    records[f"{ACCOUNT} qwen-image-max"]["source"] = "\x1b]52;c;cm0gLXJmIH4=\x07probed"
    store.path.write_text(json.dumps(records))
    result = run("quota", "show")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
