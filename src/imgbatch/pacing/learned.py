"""Quotas learned by earlier runs, kept in the user's cache directory for the next run to start at.

Takes an account (a provider's fingerprint of its key and endpoint, never the key), a model and
what a run found; gives the window and cap to start the next run with. One JSON file,
`quotas.json` in `platformdirs.user_cache_dir("imgbatch")` (`$XDG_CACHE_HOME/imgbatch` on Linux),
rewritten atomically. A file that cannot be read is treated as empty: it is only a head start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgbatch.pacing.gate import Finding
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
        """Keep what the run found out (not what it was given); the models whose quota was kept.

        Raises OSError when the cache directory cannot be written.
        """
        records = self._read()
        kept = []
        for finding in findings:
            window = finding.window if finding.source in ("probed", "stated") else None
            cap = finding.cap if finding.cap_confirmed else None
            if window is None and cap is None:
                continue
            record: dict[str, Any] = {"saved_at": int(time.time())}
            if window is not None:
                record["count"], record["period"] = window.count, window.period
            if cap is not None:
                record["cap"] = cap
            records[_key(account, finding.model)] = record
            kept.append(finding.model)
        if kept:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(records, indent=1, sort_keys=True) + "\n"
            atomic_write(self.path, text.encode("utf-8"))
        return kept

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _key(account: str, model: str) -> str:
    return f"{account} {model}"


def _parse(record: Mapping[str, Any]) -> Learned | None:
    window = None
    count, period, cap = record.get("count"), record.get("period"), record.get("cap")
    try:
        if count is not None and period is not None:
            window = Quota(int(count), float(period))
        cap = int(cap) if cap is not None and int(cap) >= 1 else None
    except (TypeError, ValueError):
        return None
    return Learned(window, cap) if window is not None or cap is not None else None
