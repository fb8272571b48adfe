"""Checks that refuse a run before anything is fetched, sent or written.

Takes a `Plan` (and what the user chose: `--frozen`, a cost limit, the provider option); gives
nothing, or raises the error that names the shots and says how to proceed: `FrozenError` when a
shot would need a paid request under `--frozen`, `CostLimitError` when the estimate exceeds
`--max-cost`, `PaidImagesError` when placeholders not chosen by name would replace images a paid
provider made, `StoreOnlyError` when a run without a store would pay for images kept in one.
"""

from __future__ import annotations

from imgbatch.errors import FrozenError, PaidImagesError, StoreOnlyError
from imgbatch.manifest import Manifest
from imgbatch.plan.decide import WORK_ACTIONS, Plan
from imgbatch.plan.pricing import check_estimate
from imgbatch.providers import is_metered
from imgbatch.units.money import CostLimit


def refuse_to_start(plan: Plan, frozen: bool, limit: CostLimit | None) -> None:
    """Refuse to start a run that --frozen or a cost limit does not allow."""
    if frozen:
        refuse_paid(plan)
    if limit is not None and plan.prices is not None:
        check_estimate(plan.estimated_cost, limit, prices=plan.prices)


def refuse_paid(plan: Plan) -> None:
    """FrozenError naming the shots that would need a paid request, if any."""
    paid = [item for item in plan.shots if item.paid]
    if not paid:
        return
    shown = [f"{item.id} ({item.action}: {item.reason})" for item in paid[:20]]
    more = f", and {len(paid) - 20} more" if len(paid) > 20 else ""
    raise FrozenError(
        f"--frozen: {len(paid)} shot{'s' if len(paid) != 1 else ''} would need a paid request: "
        f"{', '.join(shown)}{more}; nothing was sent or written (run apply without --frozen "
        "to make them)"
    )


def may_replace_paid(provider: str, chosen: str | None) -> bool:
    """Whether `provider` (resolved) is the offline placeholder without having been chosen by
    name (`chosen`: the provider option, before `auto` is resolved)."""
    return not is_metered(provider) and chosen != provider


def refuse_placeholder_over_paid(plan: Plan, chosen: str | None, manifest: Manifest) -> None:
    """PaidImagesError naming the shots whose image, made by a paid provider, an unmetered one
    not chosen by name (`auto` without a key, the manifest's `provider:`) would replace."""
    if plan.metered or chosen == plan.provider:
        return
    paid = [
        item
        for item in plan.shots
        if item.action in WORK_ACTIONS
        and item.previous is not None
        and item.previous.status != "failed"
        and is_metered(str(item.previous.request.get("provider", plan.provider)))
    ]
    if not paid:
        return
    made_by = sorted({str(item.previous.request.get("provider")) for item in paid if item.previous})
    source = "--provider" if chosen is not None else "the manifest's provider:"
    given = chosen or manifest.provider
    if given == "auto":
        why = f"{source} auto found no DashScope API key, so it chose"
    else:
        why = f"{source} {given} chose"
    shown = ", ".join(item.id for item in paid[:20])
    more = f", and {len(paid) - 20} more" if len(paid) > 20 else ""
    count = f"{len(paid)} image{'s' if len(paid) != 1 else ''}"
    raise PaidImagesError(
        f"{why} the offline {plan.provider} provider, which would replace {count} made by "
        f"{', '.join(made_by)} (a paid provider) with placeholders: {shown}{more}; nothing was "
        "sent or written. Configure the API key (see Credentials in the README) to keep "
        f"using {made_by[0]}, or pass --provider {plan.provider} to replace them on purpose"
    )


def refuse_paying_for_store_only(plan: Plan) -> None:
    """StoreOnlyError naming the shots the plan would pay for again although results.json
    keeps their image in a shared store only, one the run does not name (`kept_in`: decided
    when the plan is made, `decide._kept_elsewhere`)."""
    kept = [item for item in plan.shots if item.paid and item.kept_in is not None]
    if not kept:
        return
    stores = sorted({item.kept_in for item in kept if item.kept_in is not None})
    shown = ", ".join(item.id for item in kept[:20]) + (
        f", and {len(kept) - 20} more" if len(kept) > 20 else ""
    )
    store = plan.store
    raise StoreOnlyError(
        f"{len(kept)} shot{'s' if len(kept) != 1 else ''} ({shown}) would be paid for again: "
        f"results.json says their images are kept in a shared store only ({', '.join(stores)}), "
        f"{'not in ' + store if store else 'which this run does not name'}; name it (--store "
        "URL or IMGBATCH_STORE) to restore them, with or without --no-local-copy. Nothing was "
        "sent or written (if that store is gone, move results.json aside: apply then makes "
        "every image again)"
    )
