"""Drive the real apply against simulated DashScope accounts on virtual time (no network).

    python bench/sim_pacer.py            # every shape, quota unknown, given and stated
    python bench/sim_pacer.py --quick    # the issue's new shapes only, not the 1,500-shot rows

The simulation is `tests/support/quota_sim.py`: imgbatch's own `apply_async` (manifest, plan,
executor, gate, estimator, journal) with a fake provider whose account is a counted window, a token
bucket, a cap on requests in progress, or several; a sleep jumps virtual time forward, so a
fifteen-minute run takes a second. Each shape runs three ways: the quota unknown (found from the
429s), given (`--quota`, or `--rps` for a bucket without burst), and stated by the service in
its flow-control header. Ideal = the first window's burst at once, then the quota's rate, plus
one latency (a cap: each slot's share of the shots, one latency after another).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from imgbatch.run.apply import ApplyOptions  # noqa: E402
from imgbatch.units.quota import Quota  # noqa: E402
from tests.support.quota_sim import Account, simulate  # noqa: E402

# account, latency, shots; the shapes first, then the token-bucket rows of before.
SHAPES: list[tuple[Account, float, int]] = [
    (Account(window=(2, 60)), 16.5, 30),
    (Account(window=(10, 60)), 16.5, 60),
    (Account(bucket=(2, 1)), 16.5, 100),
    (Account(max_in_progress=1), 16.5, 30),
    (Account(max_in_progress=2), 16.5, 30),
    (Account(max_in_progress=4), 16.5, 30),
    (Account(max_in_progress=4, bucket=(2, 1)), 16.5, 30),
]
BUCKETS: list[tuple[Account, float, int]] = [
    (Account(bucket=(25, 25)), 0.8, 150),
    (Account(bucket=(25, 25)), 0.8, 1500),
    (Account(bucket=(25, 1)), 0.8, 150),
    (Account(bucket=(25, 50)), 0.8, 150),
    (Account(bucket=(25, 25)), 15, 1500),
    (Account(bucket=(4, 4)), 15, 300),
    (Account(bucket=(10, 10)), 5, 300),
    (Account(bucket=(100, 100)), 0.8, 1000),
]


def given(account: Account) -> ApplyOptions | None:
    """The quota as a user who knows it would give it; None when it has no rate to give."""
    if account.window is not None:
        return ApplyOptions(quota=Quota(*account.window))
    if account.bucket is not None:
        rate, burst = account.bucket
        return ApplyOptions(quota=Quota(max(1, int(burst)), max(1, int(burst)) / rate))
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the issue's new shapes only")
    args = parser.parse_args()
    rows = SHAPES if args.quick else SHAPES + BUCKETS
    print("| account | latency | shots | quota | wall s | ideal s | ideal/actual | 429s | found |")
    print("|---|---|---|---|---|---|---|---|---|")
    for account, latency, shots in rows:
        runs: list[tuple[str, Account, ApplyOptions | None]] = [("unknown", account, None)]
        options = given(account)
        if options is not None:
            runs.append(("given", account, options))
        if account.window is not None:
            stated = Account(account.window, account.bucket, account.max_in_progress, states=True)
            runs.append(("stated", stated, None))
        for how, simulated, run_options in runs:
            result = simulate(simulated, latency, shots, options=run_options)
            print(
                f"| {account.describe()} | {latency:g} | {shots} | {how} | {result.wall:.1f} | "
                f"{result.ideal:.1f} | {result.ratio:.3f} | {result.refused}/{result.requests} "
                f"({result.share:.1%}) | {result.found} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
