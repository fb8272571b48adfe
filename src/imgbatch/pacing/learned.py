"""Quotas learned by earlier runs, kept in the user's cache directory for the next run to start at.

Takes an account (a provider's fingerprint of its key and endpoint, never the key), a model and
what a run found; gives the window and cap to start the next run with, and the credit of 429s
the account's runs saved up to test it (`QuotaEstimator.credit`). One JSON file, `quotas.json`
in `platformdirs.user_cache_dir("imgbatch")` (`$XDG_CACHE_HOME/imgbatch` on Linux), rewritten
atomically. A file that cannot be read is treated as empty: it is only a head start. A record
without a `credit` (written before it was kept) has none.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgbatch.pacing.gate import Finding
from imgbatch.pacing.quota import CREDIT_CAP, plausible
from imgbatch.state.cache import atomic_write
from imgbatch.units.quota import Quota

FILE_NAME = "quotas.json"


def default_store_path() -> Path:
    """`quotas.json` in the user's cache directory (honours XDG_CACHE_HOME)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("imgbatch")) / FILE_NAME


@dataclass(frozen=True)
class Learned:
    window: Quota | None
    cap: int | None
    credit: float = 0.0  # 429s' worth a run may spend testing it, beyond its own budget


@dataclass(frozen=True)
class Remembered:
    """One remembered quota, as `imgbatch quota show` lists it."""

    account: str  # the provider's fingerprint of the key (never the key)
    endpoint: str
    model: str
    learned: Learned
    source: str  # how the run that kept it knew it: "probed" (from 429s) or "stated"
    saved_at: int | None  # seconds since the epoch


class QuotaStore:
    """The learned quotas of every account and model this user has run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, account: str, models: Iterable[str]) -> dict[str, Learned]:
        records = self._read()
        found: dict[str, Learned] = {}
        for model in models:
            record = records.get(_key(account, model))
            learned = _parse(record) if isinstance(record, dict) else None
            if learned is not None:
                found[model] = learned
        return found

    def save(self, account: str, findings: Iterable[Finding]) -> list[str]:
        """Keep what the run found out (not what it was given) with the credit it hands on; the
        models whose quota was kept. A run that kept to the quota it remembered (tested and
        refused, or not tested) keeps that quota, and only its credit changes.

        Raises OSError when the cache directory cannot be written.
        """
        records = self._read()
        kept, changed = [], False
        for finding in findings:
            key = _key(account, finding.model)
            record = _record(finding)
            if record is not None:
                records[key] = record
                kept.append(finding.model)
                changed = True
            elif finding.source == "learned" and isinstance(records.get(key), dict):
                records[key] = {**records[key], "credit": _credit_field(finding.credit)}
                changed = True
        if changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(records, indent=1, sort_keys=True) + "\n"
            atomic_write(self.path, text.encode("utf-8"))
        return kept

    def remembered(self) -> list[Remembered]:
        """Every quota kept, ordered by account and model (records that cannot be read left
        out: they are not used either)."""
        found = []
        for key, record in sorted(self._read().items()):
            account, _, model = key.rpartition(" ")
            learned = _parse(record) if isinstance(record, dict) else None
            if not account or learned is None:
                continue
            fingerprint, _, endpoint = account.partition("@")
            saved_at = record.get("saved_at")
            found.append(
                Remembered(
                    fingerprint,
                    endpoint,
                    model,
                    learned,
                    str(record.get("source", "probed")),
                    saved_at if _a_date(saved_at) else None,
                )
            )
        return found

    def forget(self, model: str | None = None) -> int:
        """Drop the remembered quotas (of `model` only, if given); how many were dropped.

        Raises OSError when the file cannot be rewritten.
        """
        records = self._read()
        kept = {
            key: record
            for key, record in records.items()
            if model is not None and key.rpartition(" ")[2] != model
        }
        if len(kept) != len(records):
            text = json.dumps(kept, indent=1, sort_keys=True) + "\n"
            atomic_write(self.path, text.encode("utf-8"))
        return len(records) - len(kept)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _a_date(saved_at: Any) -> bool:
    """Whether `saved_at` is seconds since the epoch that a date can show (year 1970 to 9999):
    a hand-edited one is shown as unknown, not a crash."""
    return type(saved_at) is int and 0 <= saved_at < _YEAR_10000


# 10000-01-01T00:00:00Z, in seconds since the epoch.
_YEAR_10000 = 253_402_300_800


def _key(account: str, model: str) -> str:
    return f"{account} {model}"


def _record(finding: Finding) -> dict[str, Any] | None:
    """What `quotas.json` keeps of what a run found; None when it found nothing to keep."""
    window = finding.window if finding.source in ("probed", "stated") else None
    cap = finding.cap if finding.cap_confirmed else None
    if window is None and cap is None:
        return None
    record: dict[str, Any] = {"saved_at": int(time.time()), "source": finding.source}
    if window is not None:
        record["count"], record["period"] = window.count, window.period
    if cap is not None:
        record["cap"] = cap
    record["credit"] = _credit_field(finding.credit)
    return record


def _credit_field(credit: float) -> float:
    # (Rounded: the file is read by people too, `imgbatch quota show` prints it.)
    return round(min(max(credit, 0.0), CREDIT_CAP), 3)


def _credit(record: Mapping[str, Any]) -> float:
    """The credit a record carries: 0 when it has none (an older file) or none that makes sense
    (hand-edited: not a number, infinite, negative), at most `CREDIT_CAP`."""
    credit = record.get("credit", 0.0)
    if type(credit) not in (int, float) or not math.isfinite(credit):
        return 0.0
    return float(min(max(credit, 0.0), CREDIT_CAP))


def _parse(record: Mapping[str, Any]) -> Learned | None:
    window = None
    count, period, cap = record.get("count"), record.get("period"), record.get("cap")
    try:
        if count is not None and period is not None:
            window = Quota(int(count), float(period))
            # A remembered quota no service would mean (a poisoned header's, kept by an older
            # version) is not where a run starts.
            window = window if plausible(window) else None
        cap = int(cap) if cap is not None and int(cap) >= 1 else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity, as int
        return None
    if window is None and cap is None:
        return None
    return Learned(window, cap, _credit(record))
