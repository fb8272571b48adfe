"""Drive the real Pacer against a simulated DashScope quota in virtual time (no network).

    python bench/sim_pacer.py            # a grid of quotas, bursts, latencies

No rate is given: the pacer has to find each quota. The simulation is `tests/quota_sim.py`
(workers as the executor's, the account a token bucket full at the start) on a virtual clock: a
sleep jumps time forward, so a 150-second scenario takes milliseconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from imgbatch.executor import DEFAULT_CONCURRENCY  # noqa: E402
from tests.quota_sim import simulate  # noqa: E402

GRID = [
    # quota, burst, latency, shots, concurrency (None: imgbatch's default)
    (25, 25, 0.8, 150, None),
    (25, 25, 0.8, 1500, None),
    (25, 1, 0.8, 150, None),
    (25, 5, 0.8, 150, None),
    (25, 50, 0.8, 150, None),
    (25, 25, 15, 1500, None),
    (25, 25, 15, 1500, 64),
    (4, 4, 15, 300, None),
    (2, 2, 15, 200, None),
    (1, 1, 15, 100, None),
    (10, 10, 5, 300, None),
    (100, 100, 0.8, 1000, None),
    (0.5, 1, 15, 60, None),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rtt", type=float, default=0.004)
    args = parser.parse_args()
    print("| quota | burst | latency | shots | conc | wall | ideal/actual | 429s | settled | est |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for quota, burst, latency, shots, cap in GRID:
        concurrency = cap or DEFAULT_CONCURRENCY
        r = simulate(quota, burst, latency, shots, concurrency=concurrency, rtt=args.rtt)
        est = f"{r.estimate:.2f}" if r.estimate is not None else "-"
        print(
            f"| {quota} | {burst} | {latency} | {shots} | {concurrency} | {r.wall:.1f} | "
            f"{r.ratio:.3f} | {r.refused}/{r.requests} ({r.share:.1%}) | "
            f"{r.settled_rate:.2f} | {est} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
