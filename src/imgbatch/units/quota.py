"""A quota as the account states it: at most K requests in any P seconds, and how to write one.

Takes text such as `2/60s`, `2/min` or `25/s` (the manifest's `limits.quota`, `--quota`, what
the service's flow-control header states); gives a `Quota`. A plain value: the manifest declares
one, an error from the service carries one, the pacer obeys one.

    >>> parse_quota("2/min")
    Quota(count=2, period=60.0)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Quota:
    """At most `count` requests in any `period` seconds; `count` may all go at once."""

    count: int
    period: float

    def __post_init__(self) -> None:
        if self.count < 1 or not self.period > 0 or math.isinf(self.period):
            raise ValueError(f"a quota needs a count >= 1 and a period > 0, not {self}")

    @classmethod
    def per_second(cls, rate: float) -> Quota:
        """Evenly spaced requests at `rate` a second, with no burst."""
        return cls(1, 1.0 / rate)

    @property
    def rate(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        if self.count == 1 and self.period < 1:
            # An even spacing: "23.6/s" reads better than "1/0.0424s" (and --rps takes it).
            return f"{1 / self.period:.3g}/s"
        return f"{self.count}/{self.period:g}s"


_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS |= {"h": 3600.0, "hour": 3600.0}
# The grammar of the manifest schema's limits.quota pattern, which checks it first.
_QUOTA = re.compile(
    r"^ *(?P<count>[0-9]+) */ *"
    r"(?:(?P<number>[0-9]*\.?[0-9]+) *(?P<unit>[a-z]+)?|(?P<alone>[a-z]+)) *$"
)


def parse_quota(text: str) -> Quota:
    """`2/60s`, `2/min`, `25/s`, `10/1m`, `100/hour`: K requests per period. ValueError if not."""
    match = _QUOTA.match(text.strip().lower())
    unit = (match.group("unit") or match.group("alone") or "s") if match else ""
    unit = unit if unit in _UNITS else unit.removesuffix("s")
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"quota {text!r} is not K/P: write requests per period, such as 2/60s, 2/min or 25/s"
        )
    count = int(match.group("count"))
    period = float(match.group("number") or 1) * _UNITS[unit]
    if count < 1 or period <= 0:
        raise ValueError(
            f"quota {text!r} needs at least 1 request per a period longer than 0, such as 2/60s"
        )
    return Quota(count, period)
