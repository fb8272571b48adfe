"""What images cost: the price table, `pricing:`, cost in plan and apply, and `--max-cost`.

Takes: small manifests written into tmp_path, the built-in price table, and the fake DashScope
server for every run that sends requests (it lives on 127.0.0.1, a host with no built-in prices,
so runs against it are priced by the manifest's `pricing:`). A plan pointed at the real
endpoints' addresses sends nothing, so those plans show the built-in prices without a network.
Gives: evidence that only delivered images are billed (cached, restored and unchanged shots cost
nothing, lost answers are a possible extra), that an unknown price is unknown and never 0, and
that a cost limit refuses to start (nothing sent or written) or stops sending in time.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from imgbatch import ApplyOptions, ConfigError, CostLimitError, ImageRequest, apply, make_plan
from imgbatch.plan.pricing import cost, price_list, region_of
from imgbatch.run.bounds import MaxCost, Tally
from imgbatch.units.money import Cost, CostLimit, Pricing, format_money
from tests.cli.test_cli import assert_clean, run
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest

INTL = "https://dashscope-intl.aliyuncs.com/api/v1"
BEIJING = "https://dashscope.aliyuncs.com/api/v1"
FAST = ("--rps", "500")


def shots_manifest(
    directory: Path, count: int, *, extra: str = "", model: str = "qwen-image-max"
) -> Path:
    lines = [
        "version: 1",
        "name: priced",
        "defaults:",
        f"  model: {model}",
        '  size: "1328*1328"',
        *extra.splitlines(),
        "shots:",
    ]
    for index in range(count):
        lines += [f"  - id: shot-{index}", f'    prompt: "a lighthouse, take {index}"']
    return write_manifest(directory, "\n".join(lines) + "\n")


PRICED = "pricing:\n  currency: USD\n  per_image:\n    qwen-image-max: 0.25"


# ----- the price table ----------------------------------------------------------------------------


def test_each_endpoint_has_its_own_currency_and_an_unknown_one_has_no_prices() -> None:
    intl = price_list("dashscope", INTL, None)
    assert (intl.currency, intl.price("qwen-image-max")) == ("USD", Decimal("0.075"))
    assert intl.price("qwen-image-max-2025-12-30") == Decimal("0.075")
    # Only resellers' figures were found for plus on the international endpoint: unknown.
    assert intl.price("qwen-image-plus") is None
    beijing = price_list("dashscope", BEIJING, None)
    assert (beijing.currency, beijing.price("qwen-image-plus-2026-01-09")) == (
        "CNY",
        Decimal("0.20"),
    )
    assert beijing.price("qwen-image-max") == Decimal("0.50")
    # The SDK's default endpoint is Beijing's.
    assert price_list("dashscope", None, None) == beijing
    assert region_of("https://DashScope-Intl.aliyuncs.com:443/api/v1") is not None
    assert price_list("my-gateway", None, None).price("qwen-image-max") is None
    proxy = price_list("dashscope", "http://127.0.0.1:8080/api/v1", None)
    assert proxy.currency is None and proxy.price("qwen-image-max") is None
    assert "127.0.0.1:8080" in proxy.source
    secret = price_list("dashscope", "https://me:s3cret@gateway.example/api/v1", None)
    assert secret.source == "imgbatch has no prices for gateway.example"
    free = price_list("placeholder", INTL, None)
    assert free.price("qwen-image-plus") == 0 and free.currency is None


def test_pricing_in_the_manifest_wins_and_keeps_the_table_only_in_its_currency() -> None:
    usd = Pricing("USD", {"qwen-image-plus": Decimal("0.03")})
    over_intl = price_list("dashscope", INTL, usd)
    assert over_intl.price("qwen-image-plus") == Decimal("0.03")
    assert over_intl.price("qwen-image-max") == Decimal("0.075")  # the table's, same currency
    over_beijing = price_list("dashscope", BEIJING, usd)
    assert over_beijing.currency == "USD"
    assert over_beijing.price("qwen-image-max") is None  # never a CNY price read as USD
    assert price_list("dashscope", "http://127.0.0.1:1/api/v1", usd).price("qwen-image-plus")


def test_a_cost_is_unknown_when_any_image_has_no_price_never_zero() -> None:
    prices = price_list("dashscope", INTL, None)
    assert cost(["qwen-image-max"] * 3, prices) == Cost(Decimal("0.225"), "USD")
    unknown = cost(["qwen-image-max", "qwen-image-plus", "qwen-image-plus"], prices)
    assert unknown == Cost(None, "USD", ("qwen-image-plus",))
    assert format_money(unknown) == "unknown"
    assert cost([], prices).amount == 0
    assert format_money(Decimal("1.5"), "CNY") == "1.50 CNY"
    assert format_money(Decimal("0.000"), "USD") == "0.00 USD"
    assert format_money(Decimal("100"), None) == "100.00"
    assert format_money(Decimal("1E+1"), "CNY") == "10.00 CNY"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", CostLimit(Decimal(5))),
        (" 0.5 usd ", CostLimit(Decimal("0.5"), "USD")),
        ("12CNY", CostLimit(Decimal(12), "CNY")),
        (2.25, CostLimit(Decimal("2.25"))),
    ],
)
def test_a_cost_limit_is_an_amount_with_an_optional_currency(
    text: str | float, expected: CostLimit
) -> None:
    assert CostLimit.parse(text) == expected


@pytest.mark.parametrize("text", ["", "five", "-1", "5 dollars", "nan", "inf", True])
def test_a_cost_limit_that_is_not_an_amount_is_refused(text: str | bool) -> None:
    with pytest.raises(ValueError):
        CostLimit.parse(text)


def test_max_cost_counts_requests_in_flight_and_lost_answers_as_spent() -> None:
    bound = MaxCost(CostLimit(Decimal("0.2"), "USD"), price_list("dashscope", INTL, None))
    image = ImageRequest("a lighthouse", model="qwen-image-max")

    def tally(billed: int = 0, in_flight: int = 0, lost: int = 0) -> Tally:
        model = image.model
        return Tally(0, 0.0, {model: billed}, {model: in_flight}, {model: lost})

    assert bound.refuse(image, tally()) is None
    assert bound.refuse(image, tally(in_flight=1)) is None
    # 0.15 in flight: a third image could make 0.225.
    refusal = bound.refuse(image, tally(in_flight=2))
    assert refusal == (
        "--max-cost 0.20 USD reached: 0.00 USD billed or maybe billed and 0.15 USD in flight, so "
        "one more qwen-image-max image (0.075 USD) could exceed it"
    )
    # An image received, or a lost answer (it may have been billed), counts like one in flight.
    assert bound.refuse(image, tally(billed=1)) is None
    assert bound.refuse(image, tally(lost=1)) is None
    assert bound.refuse(image, tally(billed=1, lost=1)) is not None
    assert bound.refuse(image, tally(lost=1, in_flight=1)) is not None
    plus = ImageRequest("a lighthouse", model="qwen-image-plus")
    refusal = bound.refuse(plus, tally())
    assert refusal is not None and "no price is known for qwen-image-plus" in refusal
    assert (
        MaxCost(CostLimit(Decimal(1)), price_list("placeholder", None, None)).refuse(
            image, tally(billed=1000)
        )
        is None
    )


# ----- plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "per_image", "total", "currency"),
    [(INTL, 0.075, 0.3, "USD"), (None, 0.5, 2.0, "CNY")],
)
def test_plan_estimates_the_cost_at_the_endpoints_prices(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    base_url: str | None,
    per_image: float,
    total: float,
    currency: str,
) -> None:
    if base_url is None:
        monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    else:
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", base_url)
    manifest = shots_manifest(tmp_path, 4)
    result = run("plan", manifest, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [shot["cost"] for shot in document["shots"]] == [per_image] * 4
    assert document["summary"]["estimated_cost"] == total
    assert document["summary"]["currency"] == currency
    assert "Plan: 4 create. 4 paid requests.\nEstimated cost: " in result.stderr
    assert "reported in 2026, unverified" in result.stderr


def test_plan_says_unknown_where_no_price_is_known(api_env: dict[str, str], tmp_path: Path) -> None:
    # The fake server's address has no built-in prices.
    manifest = shots_manifest(tmp_path, 2)
    result = run("plan", manifest, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [shot["cost"] for shot in document["shots"]] == [None, None]
    assert document["summary"]["estimated_cost"] is None
    assert "Estimated cost: unknown, no price for qwen-image-max" in result.stderr
    assert "pricing:" in result.stderr


def test_plan_with_the_placeholder_provider_costs_nothing(tmp_path: Path) -> None:
    manifest = shots_manifest(tmp_path, 2)
    result = run("plan", manifest, "--json", "--provider", "placeholder")
    document = json.loads(result.stdout)
    assert document["summary"]["estimated_cost"] == 0
    assert [shot["cost"] for shot in document["shots"]] == [0, 0]


# ----- apply: only delivered images are billed ----------------------------------------------------


def test_apply_bills_generated_images_only_and_a_cached_one_costs_nothing(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = shots_manifest(tmp_path, 3, extra=PRICED)
    plan = json.loads(run("plan", manifest, "--json").stdout)
    assert plan["summary"]["estimated_cost"] == 0.75
    assert plan["summary"]["currency"] == "USD"

    first = run("apply", manifest, "--json", *FAST)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)["summary"]
    assert (summary["billed"], summary["cost"], summary["currency"]) == (3, 0.75, "USD")
    assert summary["possible_extra_cost"] == 0
    assert "Cost: 0.75 USD (pricing: in the manifest)." in first.stderr

    # One file deleted: restored from the cache, no request, no cost; the rest unchanged.
    (tmp_path / "output" / "priced" / "shot-1.png").unlink()
    plan = json.loads(run("plan", manifest, "--json").stdout)
    assert plan["summary"]["estimated_cost"] == 0
    assert {shot["action"]: shot["cost"] for shot in plan["shots"]} == {
        "unchanged": 0,
        "restore": 0,
    }
    again = run("apply", manifest, "--json", *FAST)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)["summary"]
    assert (summary["cached"], summary["cost"]) == (1, 0)
    assert fake_server.generation_count == 3


def test_a_refused_request_costs_nothing_and_a_lost_answer_is_a_possible_extra(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = shots_manifest(tmp_path, 2, extra=PRICED + "\nlimits:\n  concurrency: 1")
    fake_server.enqueue_error(400, "InvalidParameter", "nope")
    # One answer lost: the request is counted once (the SDK's own re-send is refused).
    fake_server.enqueue_disconnect(1)
    # And a 200 without an image (asked again, simplified): no image, no bill.
    fake_server.no_image_next()
    result = run("apply", manifest, "--json", *FAST)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)["summary"]
    assert (summary["billed"], summary["failed"], summary["requests"]) == (1, 1, 4)
    assert summary["cost"] == 0.25
    assert summary["possible_extra_cost"] == 0.25
    assert (
        "Cost: 0.25 USD (pricing: in the manifest); up to 0.25 USD more if the 1 request whose "
        "answer was lost were billed." in result.stderr
    )


# ----- --max-cost ---------------------------------------------------------------------------------


def assert_nothing_sent_or_written(fake_server: FakeDashScope, tmp_path: Path) -> None:
    assert fake_server.generation_count == 0
    assert not (tmp_path / "output").exists()


def test_max_cost_refuses_to_start_when_the_estimate_exceeds_it(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = shots_manifest(tmp_path, 3, extra=PRICED)
    result = run("apply", manifest, "--max-cost", "0.5", *FAST)
    assert result.exit_code == 1, result.output
    assert_clean(result)
    assert result.stderr == (
        "error: the estimated cost 0.75 USD exceeds --max-cost 0.50 USD; nothing was sent or "
        "written (raise the limit, or apply part of the shot list)\n"
    )
    assert_nothing_sent_or_written(fake_server, tmp_path)

    # The same limit in the manifest; the command line's wins over it.
    limited = shots_manifest(tmp_path, 3, extra=PRICED + "\nlimits:\n  max_cost: 0.5 USD")
    refused = run("apply", limited, *FAST)
    assert refused.exit_code == 1
    assert "exceeds limits.max_cost 0.50 USD" in refused.stderr
    assert_nothing_sent_or_written(fake_server, tmp_path)
    allowed = run("apply", limited, "--max-cost", "0.75", *FAST)
    assert allowed.exit_code == 0, allowed.output
    assert fake_server.generation_count == 3


@pytest.mark.parametrize(
    ("extra", "limit", "message"),
    [
        ("", "100", "the cost cannot be estimated, as there is no price for qwen-image-max"),
        (PRICED, "5 CNY", "prices are in USD (pricing: in the manifest); give the limit in USD"),
    ],
)
def test_max_cost_refuses_a_cost_it_cannot_compare(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    tmp_path: Path,
    extra: str,
    limit: str,
    message: str,
) -> None:
    manifest = shots_manifest(tmp_path, 1, extra=extra)
    result = run("apply", manifest, "--max-cost", limit, *FAST)
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert_nothing_sent_or_written(fake_server, tmp_path)


def test_max_cost_with_nothing_to_pay_lets_the_run_go(tmp_path: Path) -> None:
    manifest = shots_manifest(tmp_path, 2)
    result = run("apply", manifest, "--provider", "placeholder", "--max-cost", "0")
    assert result.exit_code == 0, result.output


def test_max_cost_stops_sending_before_the_images_billed_could_exceed_it(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    # Estimated 0.75 USD, within the limit; but the first answer is lost (it may have been
    # billed) and its shot is sent again, so after two more images a third would pass 0.75.
    manifest = shots_manifest(tmp_path, 3, extra=PRICED + "\nlimits:\n  concurrency: 1")
    fake_server.enqueue_disconnect(1)
    result = run("apply", manifest, "--json", "--max-cost", "0.75", *FAST)
    # Stopped at a bound with a shot remaining, as --max-requests does.
    assert result.exit_code == 3, result.output
    assert_clean(result)
    document = json.loads(result.stdout)
    summary = document["summary"]
    assert (summary["generated"], summary["billed"], summary["cost"]) == (2, 2, 0.5)
    assert summary["possible_extra_cost"] == 0.25
    # One POST lost, two images: the third shot was never sent.
    assert fake_server.generation_count == 3
    assert fake_server.successes == 2
    statuses = {shot["id"]: shot["status"] for shot in document["shots"]}
    assert statuses["shot-2"] == "not_run"
    assert (summary["bounded"], summary["remaining"]) == ("max_cost", 1)
    assert (
        "Stopped: --max-cost 0.75 USD reached: 0.75 USD billed or maybe billed and 0.00 USD in "
        "flight, so one more qwen-image-max image (0.25 USD) could exceed it" in result.stderr
    )


def test_max_cost_option_and_manifest_field_are_checked(tmp_path: Path) -> None:
    manifest = shots_manifest(tmp_path, 1)
    bad = run("apply", manifest, "--max-cost", "lots", "--provider", "placeholder")
    assert bad.exit_code == 2
    assert "Invalid value for '--max-cost'" in bad.stderr
    written = shots_manifest(
        tmp_path,
        1,
        extra="limits:\n  max_cost: -2\npricing:\n  currency: USD\n  per_image:\n"
        "    qwen-image-maxx: 1",
    )
    result = run("validate", written)
    assert result.exit_code == 2
    assert "field limits.max_cost: must be an amount such as 5 or '5 USD', got -2" in result.stderr
    assert (
        "field pricing.per_image.qwen-image-maxx: unknown model 'qwen-image-maxx'; did you mean "
        "'qwen-image-max'?" in result.stderr
    )


def test_the_table_prices_only_models_imgbatch_knows_and_each_region_has_a_currency() -> None:
    from imgbatch.manifest.catalogue import MODELS
    from imgbatch.plan.pricing import REGIONS

    for region in REGIONS.values():
        assert set(region.per_image) <= set(MODELS)
        assert len(region.currency) == 3 and region.currency.isupper()


def test_max_cost_from_python(
    api_env: dict[str, str], fake_server: FakeDashScope, tmp_path: Path
) -> None:
    manifest = shots_manifest(tmp_path, 3, extra=PRICED)
    with pytest.raises(ConfigError, match="max_cost: 'lots' is not an amount"):
        ApplyOptions(max_cost="lots")
    with pytest.raises(CostLimitError, match="exceeds --max-cost 0.50 USD"):
        apply(manifest, ApplyOptions(rps=500, max_cost="0.5 USD"))
    assert fake_server.generation_count == 0
    plan = make_plan(manifest)
    assert plan.estimated_cost == Cost(Decimal("0.75"), "USD")
    report = apply(manifest, ApplyOptions(rps=500, max_cost=Decimal("0.75")))
    assert report.cost == Cost(Decimal("0.75"), "USD")
    assert report.possible_extra_cost == Cost(Decimal(0), "USD")
