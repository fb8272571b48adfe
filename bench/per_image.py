"""CPU and memory per image: an apply of real-sized images against the fake server, and the floor.

    python bench/per_image.py                 # 200 and 2,000 images, default and --concurrency 8
    python bench/per_image.py --quick         # 20 images, default concurrency
    python bench/per_image.py --images 2000 --concurrency 8   # one row (each option repeats)

Takes the base URL of a fake DashScope serving real-sized images (3.3 to 3.7 MB) in a process of
its own, so that its CPU and memory are not counted. Each row runs `imgbatch apply` in a process
of its own, at a quota it cannot reach, and reads its user + system CPU and peak resident memory
from the kernel (`wait4`); CPU per image is the apply's less that of a one-image apply (the
interpreter, the imports, the plan), divided by the images past the first. The floor is measured
in the same run, against the same server: a small aiohttp script that receives each image the
apply made (from its URL in results.json), hashes it (SHA-256) and writes it to one new file, at
the same concurrency; its CPU is counted around that work only. Target: at most twice the floor
a image, and a peak memory that does not grow with concurrency or the number of images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Receive, hash, write one file: what any client must do with an image, and nothing more.
FLOOR_SCRIPT = r"""
import asyncio, hashlib, json, os, resource, sys
import aiohttp

with open(sys.argv[1], encoding="utf-8") as listing:  # a file: 2,000 URLs exceed argv's limit
    urls = json.load(listing)
out, concurrency = sys.argv[2], int(sys.argv[3])

async def one(session, index, url, gate):
    async with gate, session.get(url) as response:
        digest = hashlib.sha256()
        fd = os.open(f"{out}/{index}.png", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            async for chunk in response.content.iter_chunked(256 * 1024):
                digest.update(chunk)
                os.write(fd, chunk)
        finally:
            os.close(fd)

async def main():
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(one(session, i, url, gate) for i, url in enumerate(urls)))
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"cpu": cpu}))

asyncio.run(main())
"""


@dataclass(frozen=True)
class Measured:
    cpu: float  # seconds, user + system
    peak_mb: float


def write_manifest(directory: Path, count: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["version: 1", "name: perimage", "defaults:", '  size: "1664*928"', "shots:"]
    for index in range(count):
        lines += [f"  - id: s{index:05d}", f'    prompt: "a lighthouse at dusk, take {index}"']
    path = directory / "shots.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def apply_once(
    base_url: str, key: str, work: Path, count: int, concurrency: int | None
) -> Measured:
    """`imgbatch apply` of `count` new images in a process of its own: its CPU and peak RSS."""
    manifest = write_manifest(work, count)
    env = {**os.environ, "DASHSCOPE_API_KEY": key, "DASHSCOPE_HTTP_BASE_URL": base_url}
    env["HOME"] = str(work)
    env.pop("OUTPUT_DIR", None)
    command = [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--quota", "10000/s"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stderr is not None
        errors = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"apply failed: {errors[-2000:]}")
    return Measured(usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def floor_cpu(work: Path, concurrency: int) -> float:
    """CPU seconds to receive, hash and write (one file each) the images the apply in `work`
    made, fetched again from their URLs."""
    results = json.loads((work / "output" / "perimage" / "results.json").read_text("utf-8"))
    urls = [shot["image_url"] for shot in results["shots"]]
    out = work / "floor"
    out.mkdir()
    listing = work / "floor-urls.json"
    listing.write_text(json.dumps(urls), encoding="utf-8")
    answer = subprocess.run(
        [sys.executable, "-c", FLOOR_SCRIPT, str(listing), str(out), str(concurrency)],
        capture_output=True,
        text=True,
        check=True,
    )
    cpu: float = json.loads(answer.stdout)["cpu"]
    return cpu


def per_image_row(
    base_url: str, key: str, work: Path, count: int, concurrency: int | None
) -> tuple[str, str, str, bool]:
    """One table row: case, measure, target, met."""
    fixed = apply_once(base_url, key, work / "one", 1, concurrency)
    run = apply_once(base_url, key, work / "many", count, concurrency)
    per_image = (run.cpu - fixed.cpu) / (count - 1)
    floor = floor_cpu(work / "many", concurrency or 512) / count
    ratio = per_image / floor
    label = f"--concurrency {concurrency}" if concurrency else "default concurrency"
    case = f"{count:,} real-sized images (3.3-3.7 MB), {label}"
    measure = (
        f"CPU {per_image * 1000:.1f} ms/image (whole process {run.cpu / count * 1000:.1f}); "
        f"floor {floor * 1000:.1f} ms (**{ratio:.1f}x**); peak RSS **{run.peak_mb:.0f} MB** "
        f"(one image: {fixed.peak_mb:.0f} MB)"
    )
    return case, measure, "<= 2x floor; peak flat", ratio <= 2.0


def main() -> int:
    import argparse
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import KEY, FakeServer  # the bench's fake server, in a process of its own

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 images, default concurrency")
    parser.add_argument(
        "--images", type=int, action="append", help="images in a row (repeat: 200 and 2000)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="apply's --concurrency in a row, 0 for its default (repeat: 0 and 8)",
    )
    args = parser.parse_args()
    counts = args.images or ([20] if args.quick else [200, 2000])
    levels = args.concurrency or ([0] if args.quick else [0, 8])
    cases = [(count, level or None) for count in counts for level in levels]

    import asyncio

    async def measure() -> list[tuple[str, str, str, bool]]:
        rows = []
        async with FakeServer("subprocess") as server:
            for count, concurrency in cases:
                print(f"  {count} images, concurrency {concurrency} ...", file=sys.stderr)
                with tempfile.TemporaryDirectory() as folder:
                    row = await asyncio.to_thread(
                        per_image_row, server.base_url, KEY, Path(folder), count, concurrency
                    )
                rows.append(row)
        return rows

    print("| case | measure | target | met |\n|---|---|---|---|")
    for case, measured, target, ok in asyncio.run(measure()):
        print(f"| {case} | {measured} | {target} | {'yes' if ok else '**no**'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
