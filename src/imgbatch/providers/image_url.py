"""When an image URL the service gave expires: its signed `Expires` query field, read.

Takes the URL a provider answered with (results keep it for an image billed but not downloaded)
and the time now; gives when it expired, or None while it may still work. The plan decides by it
whether a paid image can still be recovered, and `apply --prune` whether to keep its entry.

    >>> url_expired_at("https://oss.example/x.png?Expires=1", now=2.0)
    '1970-01-01 00:00 UTC'
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit


def url_expired_at(url: str | None, now: float) -> str | None:
    """When a signed image URL expired (its `Expires` query field), if it has; None while it
    may still work, or when it does not say."""
    if not url:
        return None
    try:
        values = parse_qs(urlsplit(url).query).get("Expires")
        expires = int(values[0]) if values else None
    except ValueError:
        return None
    if expires is None or expires > now:
        return None
    try:
        return datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return str(expires)
