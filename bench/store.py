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
the distinct keys), store requests per image, and the assembling run's time. And what bounds a
row that misses its ideal, measured rather than guessed: the CPU seconds of its `imgbatch`
processes (each one's user + system time from the kernel, `wait4`), of the store server and of
the fake accounts (this process), the CPU floor those make on this machine (their sum over its
cores: no schedule of that work can be faster here), and how busy the whole machine was
meanwhile (`/proc/stat`: other work on it counts too). Prints ONE markdown table. Nothing but
127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
    return Measured(
        [*command, *extra], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(
    processes: Sequence[subprocess.Popen[str]],
) -> tuple[list[dict[str, object]], float, float]:
    """Each apply's --json, the CPU seconds (user + system) all of them used, and the seconds
    each one's event loop spent ready to run with no core free (the kernel's run-queue delay of
    its main thread; the mean over them)."""
    documents, cpu = [], 0.0
    with RunQueueDelay([process.pid for process in processes]) as delay:
        for process in processes:
            out, err = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"apply exited {process.returncode}: {err[-2000:]}")
            documents.append(json.loads(out))
            cpu += getattr(process, "cpu", 0.0)
    return documents, cpu, delay.seconds


class RunQueueDelay:
    """Samples `/proc/PID/schedstat` of running processes (a thread, every 0.2 s): how long each
    one's main thread, its event loop, was ready to run and had no core. `seconds`: the mean over
    the processes (up to 0.2 s of each one's end is missed)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids
        self.waited: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RunQueueDelay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.waited.values()) / max(1, len(self.pids))

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            for pid in self.pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = Path(f"/proc/{pid}/schedstat").read_text().split()
                    self.waited[pid] = int(fields[1]) / 1e9


class Measured(subprocess.Popen[str]):
    """A child whose CPU time is kept when it is reaped (`wait4`, not `waitpid`)."""

    cpu = 0.0

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0
        if pid == self.pid:
            self.cpu = usage.ru_utime + usage.ru_stime
        return pid, status


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, every core (`/proc/stat`)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


def child_cpu(pid: int) -> float:
    """CPU seconds a live process (the store server) used so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summary(document: dict[str, object]) -> dict[str, int]:
    found = document["summary"]
    assert isinstance(found, dict)
    return found


def store_requests(documents: Sequence[dict[str, object]]) -> dict[str, int]:
    """Every process's store requests, by operation (get, put, head, delete, list)."""
    total: dict[str, int] = {}
    for document in documents:
        store = document.get("store")
        if isinstance(store, dict):
            for operation, count in store["requests"].items():
                total[operation] = total.get(operation, 0) + count
    return total


@contextlib.contextmanager
def a_store(kind: str, folder: Path) -> Iterator[dict[str, str]]:
    if kind == "folder":
        yield {"IMGBATCH_STORE": str(folder / "store")}
        return
    with seaweed_server(folder) as endpoint:
        yield {**s3_environ(endpoint), "IMGBATCH_STORE": f"s3://{BUCKET}/bench"}


def store_server_cpu() -> float:
    """CPU seconds the store server (`weed`, a child of this process) used so far."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1]
        if name == "weed" and int(rest.split()[1]) == os.getpid():
            total += child_cpu(int(entry.name))
    return total


@dataclass(frozen=True)
class Row:
    name: str
    wall: float
    ideal: float
    paid: int
    throttled: int  # 429s the accounts answered
    per_image: float
    by_operation: dict[str, float]  # store requests per image, by operation
    applies_cpu: float  # the imgbatch processes' CPU seconds
    waited: float  # the seconds each one's event loop was ready to run and had no core (mean)
    servers_cpu: float  # the store server's and the fake accounts' (this process)
    machine_busy: float  # every process on the machine, ours and others'
    assembling: tuple[float, float] | None  # the assembling run's wall time and CPU seconds

    @property
    def floor(self) -> float:
        """The CPU floor on this machine: the row's CPU over its cores."""
        return (self.applies_cpu + self.servers_cpu) / (os.cpu_count() or 1)


def run_case(
    name: str,
    processes: Callable[[], list[subprocess.Popen[str]]],
    assemble: Callable[[], list[subprocess.Popen[str]]] | None,
    *,
    shots: int,
    accounts: int,
    paid: Callable[[], int],
) -> Row:
    """Run one row: its processes at once, then its assembling run, if any; measured."""
    busy, cpu, store_cpu = machine_busy()[0], own_cpu(), store_server_cpu()
    started = time.monotonic()
    documents, applies_cpu, waited = finish(processes())
    wall = time.monotonic() - started
    servers_cpu = own_cpu() - cpu + store_server_cpu() - store_cpu
    busy = machine_busy()[0] - busy
    assembling = None
    if assemble is not None:
        started = time.monotonic()
        more, assembling_cpu, _ = finish(assemble())
        documents += more
        assembling = (time.monotonic() - started, assembling_cpu)
    ideal = shots / (accounts * QUOTA) + LATENCY
    requests = store_requests(documents)
    per_image = sum(requests.values()) / shots
    by_operation = {operation: count / shots for operation, count in sorted(requests.items())}
    throttled = sum(summary(document)["throttled"] for document in documents)
    return Row(
        name, wall, ideal, paid(), throttled, per_image, by_operation, applies_cpu, waited,
        servers_cpu, busy, assembling,
    )  # fmt: skip


def print_table(rows: Sequence[Row], shots: int, store: str) -> None:
    print(
        f"{shots} shots, quota {QUOTA:g}/s per account, {LATENCY:g} s per generation, "
        f"store: {store}, {os.cpu_count()} cores; load average at the end: "
        f"{' '.join(open('/proc/loadavg').read().split()[:3])}\n"
    )
    print(
        "| run | wall (s) | ideal (s) | ideal/wall | images paid | distinct keys | 429s "
        "| store requests/image | CPU: imgbatch + servers (s) | CPU floor (s) "
        "| machine busy (core-s) | event loop waiting for a core (s, each) | assembling run (s) |"
    )
    print("| --- |" + " ---: |" * 12)
    for row in rows:
        shown = "-" if row.assembling is None else "{:.1f} (CPU {:.1f})".format(*row.assembling)
        print(
            f"| {row.name} | {row.wall:.1f} | {row.ideal:.1f} | {row.ideal / row.wall:.2f} "
            f"| {row.paid} | {shots} | {row.throttled} | {row.per_image:.1f} "
            f"| {row.applies_cpu:.0f} + {row.servers_cpu:.0f} | {row.floor:.0f} "
            f"| {row.machine_busy:.0f} | {row.waited:.0f} | {shown} |"
        )
    print()
    for row in rows:
        shown = ", ".join(f"{op} {count:.2f}" for op, count in row.by_operation.items())
        print(f"- {row.name}: store requests per image by operation: {shown}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, default=1000)
    parser.add_argument("--store", choices=("seaweed", "folder"), default="seaweed")
    parser.add_argument("--quick", action="store_true", help="16 shots (CI runs this)")
    parser.add_argument("--rows", default="1,2,3", help="which rows to run (1,2,3)")
    args = parser.parse_args()
    shots = 16 if args.quick else args.shots
    wanted = {int(number) for number in args.rows.split(",")}
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
        cases = (
            ("1 process, 1 key", 1, False),
            ("4 processes, 4 keys, one store", ACCOUNTS, False),
            ("4 shards, 4 keys, one store", ACCOUNTS, True),
        )
        for number, (name, accounts, sharded) in enumerate(cases, start=1):
            if number not in wanted:
                continue
            folder = root / f"case{number}"
            folder.mkdir()
            store = {**env, **stack.enter_context(a_store(args.store, folder))}
            for server in servers:
                server.reset()

            def processes(
                store: dict[str, str] = store, folder: Path = folder, accounts: int = accounts,
                sharded: bool = sharded,
            ) -> list[subprocess.Popen[str]]:  # fmt: skip
                def shard(index: int) -> tuple[str, ...]:
                    return ("--shard", f"{index + 1}/{accounts}") if sharded else ()

                return [
                    start(path, folder / f"out{index}", store, servers[index], *shard(index))
                    for index in range(accounts)
                ]

            def assemble(
                store: dict[str, str] = store, folder: Path = folder
            ) -> list[subprocess.Popen[str]]:
                return [start(path, folder / "all", store, None, "--frozen")]

            rows.append(
                run_case(
                    name,
                    processes,
                    assemble if sharded else None,
                    shots=shots,
                    accounts=accounts,
                    paid=lambda: sum(server.successes for server in servers),
                )
            )
    print_table(rows, shots, args.store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
