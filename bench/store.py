"""Benchmark one shared store across processes and accounts (issue "Images in object storage").

    python bench/store.py                 # 1,000 shots (about 13 minutes: row 1 alone is 500 s)
    python bench/store.py --shots 200     # the same rows, scaled down

Four fake accounts: four FakeDashScope servers, each with its own key and a quota of 2 requests a
second (a token bucket holding 2), 1 s per generation. Every process is a real
`imgbatch apply` in its own output folder, paced with `--quota 2/s`, sharing one store on a real
S3 server (SeaweedFS, `weed mini`, on 127.0.0.1; `--store folder` for a local folder). Rows:

1. one process with one key;
2. four processes with four keys on one store, the same shot list: claims split the work;
3. four shards (`--shard K/4`), one key each, then an assembling run (`apply --frozen`).

For each: wall time against the ideal (shots / (accounts x 2/s) + latency), images paid (must be
the distinct keys), store requests per image, and the assembling run's time. Prints ONE markdown
table. Nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.fake_dashscope import FakeDashScope  # noqa: E402
from tests.support.object_servers import BUCKET, s3_environ, seaweed_server  # noqa: E402

QUOTA = 2.0
LATENCY = 1.0
ACCOUNTS = 4


def manifest(folder: Path, shots: int) -> Path:
    lines = ["version: 1", "name: bench", "defaults:", '  size: "1328*1328"', "shots:"]
    for index in range(shots):
        lines += [f"  - id: shot-{index:04d}", f'    prompt: "a lighthouse, take {index}"']
    path = folder / "shots.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start(
    path: Path, out: Path, env: dict[str, str], server: FakeDashScope | None, *extra: str
) -> subprocess.Popen[str]:
    run_env = {**env, "OUTPUT_DIR": str(out)}
    if server is not None:
        run_env |= {"DASHSCOPE_API_KEY": server.api_key, "DASHSCOPE_HTTP_BASE_URL": server.base_url}
    command = [sys.executable, "-m", "imgbatch", "apply", str(path), "--json"]
    if server is not None:
        command += ["--provider", "dashscope", "--quota", f"{QUOTA:g}/s"]
    return subprocess.Popen(
        [*command, *extra], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(processes: Sequence[subprocess.Popen[str]]) -> list[dict[str, object]]:
    documents = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"apply exited {process.returncode}: {err[-2000:]}")
        documents.append(json.loads(out))
    return documents


def store_requests(documents: Sequence[dict[str, object]]) -> int:
    total = 0
    for document in documents:
        store = document.get("store")
        if isinstance(store, dict):
            total += sum(store["requests"].values())
    return total


@contextlib.contextmanager
def a_store(kind: str, folder: Path) -> Iterator[dict[str, str]]:
    if kind == "folder":
        yield {"IMGBATCH_STORE": str(folder / "store")}
        return
    with seaweed_server(folder) as endpoint:
        yield {**s3_environ(endpoint), "IMGBATCH_STORE": f"s3://{BUCKET}/bench"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, default=1000)
    parser.add_argument("--store", choices=("seaweed", "folder"), default="seaweed")
    parser.add_argument("--quick", action="store_true", help="16 shots (CI runs this)")
    args = parser.parse_args()
    shots = 16 if args.quick else args.shots
    rows = []
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgbatch-store-")))
        servers = [
            stack.enter_context(
                FakeDashScope(
                    api_key=f"sk-bench-account-{index}",
                    latency=LATENCY,
                    quota_rps=QUOTA,
                    quota_burst=int(QUOTA),
                    image_profile="tiny",
                )
            )
            for index in range(ACCOUNTS)
        ]
        path = manifest(root, shots)
        env = {**os.environ, "HOME": str(root), "XDG_CACHE_HOME": str(root / "xdg")}
        env.pop("OUTPUT_DIR", None)

        def paid() -> int:
            return sum(server.successes for server in servers)

        cases = (
            ("1 process, 1 key", 1, ()),
            ("4 processes, 4 keys, one store", ACCOUNTS, ()),
            ("4 shards, 4 keys, one store", ACCOUNTS, ("--shard",)),
        )
        for number, (name, accounts, extra) in enumerate(cases):
            folder = root / f"case{number}"
            folder.mkdir()
            store = stack.enter_context(a_store(args.store, folder))
            for server in servers:
                server.reset()
            started = time.monotonic()
            processes = [
                start(
                    path,
                    folder / f"out{index}",
                    {**env, **store},
                    servers[index],
                    *((*extra, f"{index + 1}/{accounts}") if extra else ()),
                )
                for index in range(accounts)
            ]
            documents = finish(processes)
            wall = time.monotonic() - started
            ideal = shots / (accounts * QUOTA) + LATENCY
            assembling = None
            if extra:
                started = time.monotonic()
                documents += finish(
                    [start(path, folder / "all", {**env, **store}, None, "--frozen")]
                )
                assembling = time.monotonic() - started
            rows.append((name, wall, ideal, paid(), store_requests(documents) / shots, assembling))
    print(
        f"{shots} shots, quota {QUOTA:g}/s per account, {LATENCY:g} s per generation, "
        f"store: {args.store}\n"
    )
    print(
        "| run | wall (s) | ideal (s) | ideal/wall | images paid | distinct keys "
        "| store requests/image | assembling run (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, wall, ideal, paid_images, per_image, assembling in rows:
        shown = f"{assembling:.1f}" if assembling is not None else "-"
        print(
            f"| {name} | {wall:.1f} | {ideal:.1f} | {ideal / wall:.2f} | {paid_images} | {shots} "
            f"| {per_image:.1f} | {shown} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
