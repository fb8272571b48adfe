"""What images cost: the price per image by model and region, estimates, and `--max-cost`.

Takes the provider's name, the base URL it calls and the manifest's `pricing:`; gives a
`PriceList` (a currency and a price per image for each model it knows), the `Cost` of a list of
billed images, and whether an estimate stays within `--max-cost` (the bound that checks it
before each request is `imgbatch.run.bounds.MaxCost`; money itself is `imgbatch.units.money`).
Only images the service delivers are billed; a refused request (429, 400, 5xx) costs nothing,
and one whose answer was lost may have cost one image. A model or region with no known price
has an unknown cost (None), never a guessed 0; the offline placeholder costs 0.

    >>> prices = price_list("dashscope", "https://dashscope-intl.aliyuncs.com/api/v1", None)
    >>> format_money(cost(["qwen-image-max"] * 3, prices))
    '0.225 USD'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit

from imgbatch.errors import CostLimitError
from imgbatch.providers import is_metered
from imgbatch.units.money import Cost, CostLimit, Pricing, format_money

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


# ----- --max-cost ----------------------------------------------------------------------------


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
