"""Money: an amount in a currency, written and read back as people write it.

Takes numbers or text (`5`, `"0.5 USD"`, the manifest's `pricing:`); gives exact decimals:
a `Cost` (None when some price is unknown), a `CostLimit` (`--max-cost`, `limits.max_cost`),
a `Pricing` (the manifest's own prices), and their words for people and JSON.

    >>> format_money(CostLimit.parse("0.225 USD").amount, "USD")
    '0.225 USD'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation


@dataclass(frozen=True)
class Cost:
    """An amount of money; None when some image in it has no known price (`unpriced`)."""

    amount: Decimal | None
    currency: str | None
    unpriced: tuple[str, ...] = field(default=())


def to_decimal(value: object) -> Decimal:
    """A price or amount as written (number or text) as an exact decimal; ValueError if not a
    finite amount of at least 0."""
    try:
        # str() first: the float 0.075 becomes Decimal("0.075"), not its binary approximation.
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {value!r}") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"not a finite amount of at least 0: {value!r}")
    return number


def format_money(money: Cost | Decimal | None, currency: str | None = None) -> str:
    """`1.5` -> "1.50 CNY", `0.225` -> "0.225 USD"; an unknown cost -> "unknown"."""
    if isinstance(money, Cost):
        return format_money(money.amount, money.currency)
    if money is None:
        return "unknown"
    # At least cents, more only where the price has them (0.075 x 3 is 0.225).
    whole, _, cents = format(money.normalize(), "f").partition(".")
    text = f"{whole}.{cents:0<2}"
    return f"{text} {currency}" if currency else text


def as_json(money: Cost | Decimal | None) -> float | None:
    """A cost for a JSON document: a number, or null when unknown."""
    if isinstance(money, Cost):
        money = money.amount
    return None if money is None else float(money)


_LIMIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]{3})?\s*")


@dataclass(frozen=True)
class CostLimit:
    """`--max-cost 5` or `--max-cost "5 USD"`: with a currency, prices in another one refuse
    the run instead of comparing CNY with USD."""

    amount: Decimal
    currency: str | None = None
    origin: str = field(default="--max-cost", compare=False)  # where it was set, for messages

    @classmethod
    def parse(cls, value: object, origin: str = "--max-cost") -> CostLimit:
        """From a number or text such as `5`, `0.5 USD`, `12CNY`; ValueError if not one."""
        if isinstance(value, CostLimit):
            return value
        if isinstance(value, bool):
            raise ValueError(f"not an amount: {value!r}")
        if isinstance(value, str):
            match = _LIMIT.fullmatch(value)
            if match is None:
                raise ValueError(
                    f"{value!r} is not an amount: write a number, optionally with its "
                    "currency, such as 5 or '5 USD'"
                )
            amount, currency = match.groups()
            return cls(to_decimal(amount), currency.upper() if currency else None, origin)
        return cls(to_decimal(value), None, origin)

    def __str__(self) -> str:
        return format_money(self.amount, self.currency)


@dataclass(frozen=True)
class Pricing:
    """The manifest's `pricing:`: a currency and the price of one image for some models."""

    currency: str
    per_image: Mapping[str, Decimal]

    @classmethod
    def from_data(cls, data: Mapping[str, object]) -> Pricing:
        """From a `pricing:` mapping the schema has checked."""
        per_image = data["per_image"]
        assert isinstance(per_image, Mapping)
        return cls(str(data["currency"]), {str(m): to_decimal(p) for m, p in per_image.items()})
