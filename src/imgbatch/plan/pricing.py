"""What images cost: the price per image by model and region, estimates, and `--max-cost`.

Takes the provider's name, the base URL it calls and the manifest's `pricing:`; gives a
`PriceList` (a currency and a price per image for each model it knows), the `Cost` of a list of
billed images, and `MaxCost`, the bound that says, before each request, whether sending it could
go past `--max-cost`. Only images the service delivers are billed; a refused request (429, 400, 5xx)
costs nothing, and one whose answer was lost may have cost one image. A model or region with no
known price has an unknown cost (None), never a guessed 0; the offline placeholder costs 0.

    >>> prices = price_list("dashscope", "https://dashscope-intl.aliyuncs.com/api/v1", None)
    >>> format_money(cost(["qwen-image-max"] * 3, prices))
    '0.225 USD'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

from imgbatch.errors import CostLimitError
from imgbatch.providers import is_metered

if TYPE_CHECKING:
    from imgbatch.run.bounds import Tally
    from imgbatch.shots.request import ImageRequest

# What the dashscope SDK calls when DASHSCOPE_HTTP_BASE_URL is not set (its own default).
DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"


@dataclass(frozen=True)
class Region:
    name: str
    currency: str
    per_image: Mapping[str, Decimal]


def _prices(**by_model: str) -> dict[str, Decimal]:
    return {model.replace("_", "-"): Decimal(price) for model, price in by_model.items()}


# Reported prices per image, as found in 2026 and UNVERIFIED (third-party pages, not Alibaba's
# own price list; gathered with the API facts in the project's API notes, "Quotas and price").
# Beijing bills in CNY, the international (Singapore) endpoint in USD; keys are bound to their
# region, so the endpoint says which table applies. For qwen-image-plus on the international
# endpoint only resellers' figures (about 0.03 USD) were found: left out, so its cost shows as
# unknown until the manifest's `pricing:` gives it. New accounts get a free quota for 90 days,
# which these figures ignore.
REGIONS: dict[str, Region] = {
    "dashscope.aliyuncs.com": Region(
        "Beijing",
        "CNY",
        _prices(
            qwen_image_max="0.50",
            qwen_image_max_2025_12_30="0.50",
            qwen_image_plus="0.20",
            qwen_image_plus_2026_01_09="0.20",
        ),
    ),
    "dashscope-intl.aliyuncs.com": Region(
        "international (Singapore)",
        "USD",
        _prices(qwen_image_max="0.075", qwen_image_max_2025_12_30="0.075"),
    ),
}
PRICES_AS_OF = "reported in 2026, unverified"


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


@dataclass(frozen=True)
class PriceList:
    """The price of one image for each model priced, in one currency; `source` says where the
    prices come from, for the summary."""

    currency: str | None
    per_image: Mapping[str, Decimal]
    source: str
    free: bool = False  # an offline provider: everything costs 0

    def price(self, model: str) -> Decimal | None:
        if self.free:
            return Decimal(0)
        return self.per_image.get(model)


@dataclass(frozen=True)
class Cost:
    """An amount of money; None when some image in it has no known price (`unpriced`)."""

    amount: Decimal | None
    currency: str | None
    unpriced: tuple[str, ...] = field(default=())


def region_of(base_url: str) -> Region | None:
    """The region whose built-in prices apply to calls to `base_url`; None for another host (a
    proxy, a test server, a region imgbatch has no prices for)."""
    return REGIONS.get((urlsplit(base_url).hostname or "").lower())


def price_list(
    provider: str,
    base_url: str | None,
    pricing: Pricing | None,
    *,
    metered: bool | None = None,
) -> PriceList:
    """The prices a run with `provider` calling `base_url` (None: the dashscope SDK's default)
    pays: the manifest's `pricing:` over the built-in table of the endpoint's region, when that
    is in the same currency. `metered` defaults to what imgbatch knows of the provider."""
    if not (is_metered(provider) if metered is None else metered):
        currency = pricing.currency if pricing else None
        return PriceList(currency, {}, f"the {provider} provider costs nothing", free=True)
    if base_url is None and provider == "dashscope":
        base_url = DEFAULT_BASE_URL
    region = region_of(base_url) if base_url else None
    where = _host(base_url) if base_url else f"the {provider} provider"
    if pricing is None:
        if region is None:
            return PriceList(None, {}, f"imgbatch has no prices for {where}")
        return PriceList(
            region.currency,
            region.per_image,
            f"built-in {region.name} prices, {PRICES_AS_OF}",
        )
    if region is not None and region.currency == pricing.currency:
        per_image = {**region.per_image, **pricing.per_image}
        source = f"pricing: in the manifest over the built-in {region.name} prices"
    else:
        per_image = dict(pricing.per_image)
        source = "pricing: in the manifest"
    return PriceList(pricing.currency, per_image, source)


def _host(base_url: str) -> str:
    """Host and port only: a proxy's URL may carry a user and password, never to be shown."""
    parts = urlsplit(base_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "an endpoint imgbatch cannot read"
    return f"{host}:{port}" if port else host


def cost(models: Iterable[str], prices: PriceList) -> Cost:
    """What one image of each model in `models` (repeats included) costs."""
    total = Decimal(0)
    unpriced: dict[str, None] = {}
    for model in models:
        price = prices.price(model)
        if price is None:
            unpriced[model] = None
        else:
            total += price
    return Cost(None if unpriced else total, prices.currency, tuple(unpriced))


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


# ----- --max-cost ----------------------------------------------------------------------------

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


def check_estimate(estimate: Cost, limit: CostLimit, *, prices: PriceList) -> None:
    """Refuse (CostLimitError) a run whose estimate exceeds `limit`, or that cannot be shown
    to stay within it (a price unknown, another currency)."""
    if estimate.amount == 0:
        return
    if estimate.amount is None:
        raise CostLimitError(
            f"{limit.origin} {limit}: the cost cannot be estimated, as there is no price for "
            f"{', '.join(estimate.unpriced)} ({prices.source}); give one under pricing: in the "
            "manifest; nothing was sent or written"
        )
    if limit.currency is not None and limit.currency != estimate.currency:
        raise CostLimitError(
            f"{limit.origin} {limit}: prices are in {estimate.currency} ({prices.source}); "
            f"give the limit in {estimate.currency}; nothing was sent or written"
        )
    if estimate.amount > limit.amount:
        raise CostLimitError(
            f"the estimated cost {format_money(estimate)} exceeds {limit.origin} "
            f"{format_money(limit.amount, estimate.currency)}; nothing was sent or written (raise "
            "the limit, or apply part of the shot list)"
        )


@dataclass(frozen=True)
class MaxCost:
    """`--max-cost` during a run, as a `imgbatch.run.bounds.Bound`. A request is sent only if the
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
