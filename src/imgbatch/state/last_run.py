"""What the last apply changed (the folder's last-run record) and where thumbnails are kept.

Takes the changes an apply made (shot id -> action, reason, the entry it had before) and gives
them back to whoever draws the contact sheet later or must keep the images it shows beside a
replaced one (`imgbatch gc`). The record only decorates the sheet, so a damaged one reads as
nothing changed rather than an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from imgbatch.state.folder import OutputFolder
from imgbatch.state.results import ResultEntry

_LAST_RUN_VERSION = 1


@dataclass(frozen=True, slots=True)
class Change:
    """What the last apply did to one shot, and the entry it had before."""

    action: str  # create, replace, restore or recover
    reason: str
    previous: ResultEntry | None


def thumb_path(output_dir: Path, key: str) -> Path:
    return OutputFolder(output_dir).thumb_path(key)


def save_changes(output_dir: Path, changes: Mapping[str, Change], when: datetime) -> None:
    document = {
        "version": _LAST_RUN_VERSION,
        "finished_at": when.isoformat(timespec="seconds"),
        "changes": {
            shot_id: {
                "action": change.action,
                "reason": change.reason,
                "previous": change.previous.to_json() if change.previous else None,
            }
            for shot_id, change in changes.items()
        },
    }
    OutputFolder(output_dir).write_last_run(document)


def load_changes(output_dir: Path) -> tuple[dict[str, Change], datetime | None]:
    """What the last apply changed, and when it finished; nothing if it is unknown or unreadable.

    The record only decorates the sheet, so a damaged one is ignored rather than reported.
    """
    document = OutputFolder(output_dir).read_last_run()
    try:
        changes = {
            shot_id: Change(
                str(raw["action"]),
                str(raw["reason"]),
                ResultEntry.from_json(raw["previous"]) if raw.get("previous") else None,
            )
            for shot_id, raw in document["changes"].items()
        }
        finished = datetime.fromisoformat(document["finished_at"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}, None
    return changes, finished
