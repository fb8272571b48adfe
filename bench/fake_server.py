"""Run tests/support/fake_dashscope.py's FakeDashScope in its own process, with counters on request.

Takes the FakeDashScope options on the command line; prints one JSON line with ``base_url`` once
listening, then answers each line read on stdin:

    stats   one JSON line: generation_count, successes, status_counts, downloads, and when
            the first and last generation request and the last download arrived
    reset   forget every request so far
    quit    (or end of input) stop and exit

A separate process keeps the server's CPU off the benchmarked client's event loop; the stdin
channel gives the bench the server-side counts (429s, POSTs) that subprocess mode cannot
otherwise report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fake_dashscope import FakeDashScope  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--quota-rps", type=float, default=None)
    parser.add_argument("--quota-burst", type=int, default=None)
    parser.add_argument("--retry-after", type=float, default=None)
    # "real": the real service's weight (what the bench measures); "tiny": start-up and pacing
    # only (the whole-process row), no PNG decoding to speak of.
    parser.add_argument("--image-profile", choices=("real", "tiny"), default="real")
    args = parser.parse_args()
    server = FakeDashScope(
        api_key=args.api_key,
        latency=args.latency,
        quota_rps=args.quota_rps,
        quota_burst=args.quota_burst,
        retry_after=args.retry_after,
        image_profile=args.image_profile,
    )
    with server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                counts = {str(k): v for k, v in server.status_counts.items()}
                stats = {
                    "generation_count": server.generation_count,
                    "successes": server.successes,
                    "status_counts": counts,
                    "downloads": len(server.downloads),
                    # time.monotonic() (one clock for every process on the machine): when the
                    # first and last generation request and the last download arrived.
                    **_arrivals(server),
                }
                print(json.dumps(stats), flush=True)
            elif command == "reset":  # forget the requests so far (one line back: "ok")
                server.reset()
                print('"ok"', flush=True)
            elif command == "quit":
                break
    return 0


def _arrivals(server: FakeDashScope) -> dict[str, float]:
    posts = sorted(r.received_at for r in list(server.requests) if r.method == "POST")
    downloads = sorted(r.received_at for r in list(server.downloads))
    if not posts or not downloads:
        return {}
    return {"first_post": posts[0], "last_post": posts[-1], "last_download": downloads[-1]}


if __name__ == "__main__":
    sys.exit(main())
