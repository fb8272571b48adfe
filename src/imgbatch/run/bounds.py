"""Bounds on one apply: asked before each request, they say when to stop sending.

Takes the limits a run was given (`--max-requests`, `--max-duration`, or any other `Bound`);
gives the executor one answer before each request it would send: None (send it), or the reason
to stop. A refusal stops the run as a first Ctrl-C does: nothing new is sent, requests in flight
finish, every shot finished is written, and the shots not run keep their previous state, so
the next apply carries on where this one stopped (`apply` exits 3: shots remain).

A bound only reads the `Tally` it is given, so a new one is one small class with a `name` and
`refuse`: `MaxCost` (`--max-cost`) prices what is billed, may have been billed
and is in flight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, ClassVar, Protocol

from imgbatch.plan.pricing import PriceList
from imgbatch.units.money import CostLimit, format_money

if TYPE_CHECKING:
    from imgbatch.shots.request import ImageRequest


@dataclass(frozen=True)
class Tally:
    """What the run has done so far, as a bound sees it before the next request."""

    requests: int  # requests sent, every try counted (429s and retries included)
    elapsed: float  # seconds since the run began sending
    billed: Mapping[str, int]  # images answered, by model (billed when the provider is metered)
    in_flight: Mapping[str, int]  # requests sent and not yet answered, by model
    # Requests whose answer was lost after they were sent (each may have been billed), by model.
    maybe_billed: Mapping[str, int] = field(default_factory=dict)


class Bound(Protocol):
    @property
    def name(self) -> str:
        """What `ApplyReport.bounded` says ended the run, such as max_requests."""
        ...

    def refuse(self, request: ImageRequest, tally: Tally) -> str | None:
        """None when `request` may be sent now; else why the run stops, for the user."""
        ...


@dataclass(frozen=True)
class MaxRequests:
    """At most `limit` requests in all, retries included: a run's share of a long list."""

    limit: int
    name: ClassVar[str] = "max_requests"

    def refuse(self, request: ImageRequest, tally: Tally) -> str | None:
        if tally.requests < self.limit:
            return None
        return f"reached --max-requests {self.limit}"


@dataclass(frozen=True)
class MaxDuration:
    """No request sent `seconds` or more after sending began: a CI job's time limit, less the
    time the requests in flight take to finish."""

    seconds: float
    name: ClassVar[str] = "max_duration"

    def refuse(self, request: ImageRequest, tally: Tally) -> str | None:
        if tally.elapsed < self.seconds:
            return None
        return f"reached --max-duration {format_duration(self.seconds)}"


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds in `5h`, `90m`, `45s` or `1h30m`; ValueError naming the accepted forms."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(
            f"{text!r} is not a duration: give a number with a unit, such as 45s, 90m, 5h or 1h30m"
        )
    seconds = sum(
        float(value) * _UNITS[unit]
        for value, unit in zip(match.groups(), "hms", strict=True)
        if value
    )
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{text!r} is not a duration longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """`seconds` as `parse_duration` reads it back: 5h, 1h30m, 45s, 1.5s."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(
        f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if value
    )
    return text or "0s"


@dataclass(frozen=True)
class MaxCost:
    """`--max-cost` during a run, as a `Bound`. A request is sent only if the
    images already received, the requests whose answer was lost (each may have been billed),
    the requests in flight and this one, each at its image's price, stay within the limit; so
    the images actually billed can never exceed it, whatever answers come back."""

    limit: CostLimit
    prices: PriceList
    name: ClassVar[str] = "max_cost"

    def refuse(self, request: ImageRequest, tally: Tally) -> str | None:
        model = request.model
        price = self.prices.price(model)
        currency = self.prices.currency
        shown = format_money(self.limit.amount, self.limit.currency or currency)
        limit = f"{self.limit.origin} {shown}"
        if price is None:
            return f"{limit}: no price is known for {model} ({self.prices.source})"
        if price and self.limit.currency not in (None, currency):
            return f"{limit}: prices are in {currency} ({self.prices.source})"
        spent = self._total(tally.billed) + self._total(tally.maybe_billed)
        in_flight = self._total(tally.in_flight)
        if spent + in_flight + price <= self.limit.amount:
            return None
        return (
            f"{limit} reached: {format_money(spent, currency)} billed or maybe billed and "
            f"{format_money(in_flight, currency)} in flight, so one more {model} image "
            f"({format_money(price, currency)}) could exceed it"
        )

    def _total(self, counts: Mapping[str, int]) -> Decimal:
        # Every model counted here was sent under this bound, so its price is known.
        return sum(
            ((self.prices.price(model) or Decimal(0)) * count for model, count in counts.items()),
            Decimal(0),
        )
