"""Chaos run: kill `imgbatch apply` at random moments under injected faults; nothing may be lost.

    python bench/chaos.py                      # 50 trials of 8 shots (about 4.5 minutes)
    python bench/chaos.py --quick              # 3 trials of 4 shots (what CI runs)
    python bench/chaos.py --seed 7 --trial 12  # replay one trial's draws (reproduce a failure)

Each trial starts the tests' fake DashScope server (tests/support/fake_dashscope.py, in a thread of
this process, so that its records and this bench share one clock) with faults drawn at random (see
KNOBS): 5xx answers, dropped connections, real-sized images (3 to 4 MB) sent in chunks over a
throttled link, downloads cut short (per image: undeliverable; and per download: flaky), and
redirected image URLs. It runs ``python -m imgbatch apply`` as a real subprocess with the
dashscope provider (key, DASHSCOPE_HTTP_BASE_URL and HOME in its environment, this checkout's
src on PYTHONPATH) and kills it with SIGTERM or SIGKILL, chosen at random, at a random moment:
after a random number k of server events (answered generations plus image downloads, k uniform
below 2 x shots) and a further random delay up to the trial's latency; or, in one trial in ten,
at a random time in the process's first second (start-up, lock, journal). The server then
answers what the dead client left in flight (billing it, as the real service would), its faults
are switched off, and a clean follow-up apply runs on the same folder; it must finish. Two
trials run side by side (--jobs) to use both cores of a small machine.

Definitions, from the fake server's own records snapshotted the instant before the signal (at
the first apply's end when it ended before its kill moment):

* billed: a generation request answered 200. A shot's bills are counted over both applies,
  including 200s that went to a client already dead.
* in flight at the kill, a set of shots: (a) shots with a generation request the server had
  received but not yet answered (or dropped) at the kill; and (b) shots billed before the kill
  none of whose images the image host had served whole (a GET answered 200 and its body sent to
  the end) before the kill: the answer may not have reached the client, its download was still
  running, or every download of it was cut. (b) is generous on purpose: imgbatch journals the
  URL before downloading, so such a shot is normally fetched from its URL, not paid twice.
* paid twice: over all shots, bills beyond a shot's first. Invariant: per trial, paid twice <=
  the number of shots in flight at the kill.
* images lost: shots NOT in flight at the kill that were billed more than once: their image had
  been generated and had left the server whole, and was paid for again. Invariant: 0.
* invalid files: after the follow-up, shots whose ``<id>.png`` is missing, does not decode fully
  with Pillow at the shot's size, or does not match results.json's sha256/bytes, or whose
  results.json entry is missing or not generated/cached. Invariant: 0.
* time to finish: wall time of the follow-up apply, process start to exit (worst over trials);
  it must exit 0 within --finish-timeout.
* crashes (an invariant too): a traceback or "unexpected" on either apply's stderr, an exit code
  that the kill does not explain, or a SIGTERM'd apply still running after --finish-timeout.

Prints one markdown table and exits 1 if an invariant is broken, listing each broken trial with
the command that replays its draws (the draws, not the timing, which the machine decides).
Nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# This checkout's code, for the bench and (through PYTHONPATH) for the applies it runs.
sys.path[:0] = [str(REPO / "src"), str(REPO)]

import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from bench.run import KEY, SIZE, write_manifest  # noqa: E402
from tests.support.fake_dashscope import GENERATION_PATH, FakeDashScope, RecordedRequest  # noqa: E402

WIDTH, HEIGHT = (int(part) for part in SIZE.split("*"))
KILL_SIGNALS = (signal.SIGTERM, signal.SIGKILL)
# Exit codes a killed apply may end with: done (0) or some shots failed under the faults (1),
# both when it ended just as the signal came; after SIGTERM, interrupted (130) or killed by it
# (before its handler is installed); after SIGKILL, killed.
KILLED_EXITS = {
    "none": {0, 1},
    "SIGTERM": {0, 1, 130, -signal.SIGTERM},
    "SIGKILL": {0, 1, -signal.SIGKILL},
}
IMAGE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
POLL_S = 0.005
PNG_CACHE: dict[tuple[int, int, int], bytes] = {}
# A generation received this long after the signal was sent after it, not in flight at it.
AFTER_SIGNAL_S = 0.05


# ----- faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knob:
    """One server option: how a trial draws it, and its value in the clean follow-up."""

    name: str
    draw: Callable[[random.Random], Any]
    clean: Any  # None: leave as drawn (not a fault, e.g. the image profile)


# Adding a fault is one line here: FakeDashScope's options, plus ChaosServer's own below.
KNOBS: tuple[Knob, ...] = (
    Knob("latency", lambda rng: rng.uniform(0.05, 0.3), None),
    Knob("error_rate", lambda rng: rng.uniform(0.0, 0.3), 0.0),
    Knob("disconnect_rate", lambda rng: rng.uniform(0.0, 0.2), 0.0),
    Knob("image_profile", lambda rng: "real", None),
    Knob("chunk_size", lambda rng: rng.choice((16_384, 65_536, 262_144)), None),
    Knob("chunk_delay", lambda rng: rng.choice((0.0, 0.0005, 0.002)), 0.0),
    # Drawn for each download: a flaky link that the download retries and the next apply's
    # fetch from the journaled URL must get through.
    Knob("cut_download_rate", lambda rng: rng.uniform(0.0, 0.2), 0.0),
    Knob("redirect_images", lambda rng: rng.random() < 0.5, None),
)


def draw_faults(rng: random.Random) -> dict[str, Any]:
    return {knob.name: knob.draw(rng) for knob in KNOBS}


def disarm(server: FakeDashScope) -> None:
    """No faults from now on (reset() also drops the records, which the caller has copied)."""
    server.reset()
    for knob in KNOBS:
        if knob.clean is not None:
            setattr(server, knob.name, knob.clean)


def describe(faults: dict[str, Any]) -> str:
    return " ".join(
        f"{name}={f'{value:.3g}' if isinstance(value, float) else value}"
        for name, value in faults.items()
    )


class ChaosServer(FakeDashScope):
    """The fake server, noting which shot (by prompt) each image it hands out belongs to."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # Megabytes of noise take a while to encode: once per run, not once per trial.
        self._png_cache = PNG_CACHE
        self.image_prompts: dict[str, str] = {}

    def _success_body(self, generation: Any, *args: Any) -> dict[str, Any]:
        body: dict[str, Any] = super()._success_body(generation, *args)
        url = body["output"]["choices"][0]["message"]["content"][0]["image"]
        match = IMAGE_ID.search(url)
        if match is not None:
            self.image_prompts[match.group()] = generation.prompt
        return body


# ----- one trial ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPlan:
    """When to kill: after `events` server events plus `delay` s, or `delay` s after launch."""

    signal: signal.Signals
    events: int | None
    delay: float

    def describe(self) -> str:
        when = "at start-up" if self.events is None else f"after {self.events} events"
        return f"{self.signal.name} {when} +{self.delay:.2f}s"


@dataclass(frozen=True)
class KillSnapshot:
    at: float  # time.monotonic()
    requests: int  # len(server.requests): API answers recorded before the kill
    downloads: int  # len(server.downloads)


@dataclass
class TrialResult:
    index: int
    faults: str
    plan: str
    killed: str  # signal name, or "none" when the apply ended first
    in_flight: int = 0
    paid_twice: int = 0
    lost: int = 0
    invalid: int = 0
    finish_s: float = 0.0
    stop_s: float = 0.0  # signal to exit of the killed apply
    crashes: int = 0  # applies that crashed, hung or exited with a code nothing explains
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # odd but not an invariant broken
    paid_twice_why: list[str] = field(default_factory=list)
    server_faults: Counter[str] = field(default_factory=Counter)


def draw_plan(rng: random.Random, shots: int, latency: float) -> KillPlan:
    signum = rng.choice(KILL_SIGNALS)
    if rng.random() < 0.1:
        return KillPlan(signum, None, rng.uniform(0.0, 1.0))
    return KillPlan(signum, rng.randrange(2 * shots), rng.uniform(0.0, latency))


def apply_environment(base_url: str, home: Path) -> dict[str, str]:
    """The environment a user sets for the real provider, pointed at the fake server."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "DASHSCOPE_API_KEY": KEY}
    env["DASHSCOPE_HTTP_BASE_URL"] = base_url
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if part
    )
    env.pop("OUTPUT_DIR", None)
    return env


def start_apply(
    manifest: Path, env: dict[str, str], log: Path, concurrency: int
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "imgbatch", "apply", str(manifest)]
    with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
        return subprocess.Popen(
            [*command, "--concurrency", str(concurrency)], env=env, stdout=out, stderr=err
        )


def wait_for_kill_moment(
    process: subprocess.Popen[bytes], server: FakeDashScope, plan: KillPlan, started: float
) -> KillSnapshot | None:
    """Sleep until the plan's moment; None if the apply exits first."""
    if plan.events is None:
        deadline = started + plan.delay
    else:
        while len(server.requests) + len(server.downloads) < plan.events:
            if process.poll() is not None:
                return None
            time.sleep(POLL_S)
        deadline = time.monotonic() + plan.delay
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    if process.poll() is not None:
        return None
    return KillSnapshot(time.monotonic(), len(server.requests), len(server.downloads))


def wait_idle(server: FakeDashScope, timeout: float) -> None:
    """Let the server answer what the dead client left in flight (it bills those too)."""
    deadline = time.monotonic() + timeout
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # a download handler that was mid-body records itself


def run_trial(index: int, args: argparse.Namespace, work: Path) -> TrialResult:
    rng = random.Random(f"chaos:{args.seed}:{index}")
    faults = draw_faults(rng)
    latency = float(faults["latency"])
    plan = draw_plan(rng, args.shots, latency)
    directory = work / f"trial-{index:03d}"
    manifest = write_manifest(directory / "project", args.shots, name="chaos")
    prompts = shot_prompts(manifest)
    result = TrialResult(index, describe(faults), plan.describe(), "none")
    options: dict[str, Any] = {"api_key": KEY, "seed": rng.randrange(2**31), **faults}
    server = ChaosServer(**options)
    with server:
        env = apply_environment(server.base_url, directory / "home")
        started = time.monotonic()
        process = start_apply(manifest, env, directory / "killed", args.concurrency)
        snapshot = wait_for_kill_moment(process, server, plan, started)
        if snapshot is not None:
            process.send_signal(plan.signal)
            result.killed = plan.signal.name
        killed_exit = wait_exit(process, args.finish_timeout)
        if snapshot is not None:
            result.stop_s = time.monotonic() - snapshot.at
        wait_idle(server, timeout=10.0)
        if snapshot is None:
            # The apply ended first: account as if killed at its end.
            snapshot = KillSnapshot(time.monotonic(), len(server.requests), len(server.downloads))
        first = (list(server.requests), list(server.downloads))
        disarm(server)

        started = time.monotonic()
        follow = start_apply(manifest, env, directory / "follow", args.concurrency)
        follow_exit = wait_exit(follow, args.finish_timeout)
        result.finish_s = time.monotonic() - started
        wait_idle(server, timeout=10.0)
        second = (list(server.requests), list(server.downloads))
        image_prompts = dict(server.image_prompts)

    check_exits(result, directory, killed_exit, follow_exit)
    account(result, prompts, image_prompts, first, second, snapshot)
    output = manifest.parent / "out"
    problems = check_output(output, list(prompts.values()))
    result.invalid = len(problems)
    result.problems += problems
    return result


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code, or None if it had to be SIGKILLed after `timeout` seconds."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def check_exits(
    result: TrialResult, directory: Path, killed: int | None, follow: int | None
) -> None:
    problems = []
    if killed is None:
        problems.append(f"the apply signalled {result.killed} was still running after the timeout")
    elif killed not in KILLED_EXITS[result.killed]:
        problems.append(f"the killed apply exited {killed}")
    if follow is None:
        problems.append("the follow-up apply did not finish in time")
    elif follow != 0:
        problems.append(f"the follow-up apply exited {follow}")
    for name in ("killed", "follow"):
        stderr = (directory / f"{name}.err").read_text(encoding="utf-8", errors="replace")
        if "Traceback" in stderr or "unexpected" in stderr:
            line = next(
                (ln for ln in stderr.splitlines() if "unexpected" in ln or "Error" in ln), ""
            )
            problems.append(f"the {name} apply crashed: {line.strip()[:200]}")
    result.crashes = len(problems)
    result.problems += problems


# ----- measures ----------------------------------------------------------------------------------


def shot_prompts(manifest: Path) -> dict[str, str]:
    """prompt -> shot id, as the manifest gives them (no style, so the prompt is the text sent)."""
    data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    return {shot["prompt"]: shot["id"] for shot in data["shots"]}


def request_prompt(record: RecordedRequest) -> str | None:
    try:
        content = record.body["input"]["messages"][0]["content"]
        text = next(item["text"] for item in content if "text" in item)
    except (KeyError, IndexError, TypeError, StopIteration):
        return None
    return text if isinstance(text, str) else None


Records = tuple[list[RecordedRequest], list[RecordedRequest]]


def account(
    result: TrialResult,
    prompts: dict[str, str],
    image_prompts: dict[str, str],
    first: Records,
    second: Records,
    snapshot: KillSnapshot,
) -> None:
    """Fill in_flight, paid_twice and lost (see the module docstring) and count the faults."""
    (requests1, downloads1), (requests2, downloads2) = first, second

    def shot_of(record: RecordedRequest) -> str | None:
        prompt = request_prompt(record) if record.path == GENERATION_PATH else None
        return None if prompt is None else prompts.get(prompt, prompt)

    bills = Counter(
        shot
        for record in (*requests1, *requests2)
        if record.status == 200 and (shot := shot_of(record)) is not None
    )
    unanswered: set[str] = set()
    billed_before: set[str] = set()
    for position, record in enumerate(requests1):
        shot = shot_of(record)
        if shot is None:
            continue
        if position >= snapshot.requests:
            unanswered.add(shot)  # (a) received, not yet answered at the kill
            if record.received_at > snapshot.at + AFTER_SIGNAL_S:
                result.server_faults["sent after the signal"] += 1
                delay = record.received_at - snapshot.at
                result.notes.append(f"{shot} sent {delay:.2f} s after the signal ({record.status})")
        elif record.status == 200:
            billed_before.add(shot)
    served: set[str] = set()
    for record in downloads1[: snapshot.downloads]:
        match = IMAGE_ID.search(record.path)
        if record.status == 200 and match and match.group() in image_prompts:
            served.add(prompts.get(image_prompts[match.group()], "?"))
    undelivered = billed_before - served - unanswered  # (b) no image of it served whole
    in_flight = unanswered | undelivered
    result.in_flight = len(in_flight)
    result.paid_twice = sum(count - 1 for count in bills.values() if count > 1)
    lost = sorted(shot for shot, count in bills.items() if count > 1 and shot not in in_flight)
    result.lost = len(lost)
    tried: dict[str, bool] = {}  # image id -> served whole at least once, over both applies
    for record in (*downloads1, *downloads2):
        if (match := IMAGE_ID.search(record.path)) and record.path.startswith("/results/"):
            tried[match.group()] = tried.get(match.group(), False) or record.status == 200
    never_whole = Counter(
        prompts.get(image_prompts[image], "?")
        for image, whole in tried.items()
        if not whole and image in image_prompts
    )
    for shot, count in sorted(bills.items()):
        if count > 1 and shot in in_flight:
            why = "unanswered at the kill" if shot in unanswered else "not yet served whole"
            if never_whole[shot]:
                why += f"; every download of {never_whole[shot]} of its images was cut"
            result.paid_twice_why.append(f"{shot} ({why})")
    if lost:
        result.problems.append(f"images lost (paid again, not in flight): {', '.join(lost)}")
    if result.paid_twice > result.in_flight:
        result.problems.append(
            f"paid twice {result.paid_twice} > in flight at the kill {result.in_flight}"
        )
    for record in (*requests1, *requests2):
        if record.status is None:
            result.server_faults["dropped connections"] += 1
        elif record.status >= 500:
            result.server_faults["5xx"] += 1
    for record in (*downloads1, *downloads2):
        if record.path.startswith("/r/"):
            result.server_faults["redirects"] += 1
        elif record.status is None:
            result.server_faults["cut downloads"] += 1
        elif record.status == 200:
            result.server_faults["whole downloads"] += 1


def check_output(output: Path, shot_ids: list[str]) -> list[str]:
    """One problem per shot whose file or results entry is not a whole, matching image."""
    try:
        results = json.loads((output / "results.json").read_text(encoding="utf-8"))
        entries = {entry["id"]: entry for entry in results["shots"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{shot}: results.json unreadable ({exc})" for shot in shot_ids]
    problems = []
    for shot in shot_ids:
        problem = check_shot(output, shot, entries.get(shot))
        if problem is not None:
            problems.append(f"{shot}: {problem}")
    return problems


def check_shot(output: Path, shot: str, entry: dict[str, Any] | None) -> str | None:
    if entry is None:
        return "not in results.json"
    if entry.get("status") not in ("generated", "cached"):
        return f"status {entry.get('status')!r}: {entry.get('error')}"
    path = output / f"{shot}.png"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{path.name} unreadable ({exc.strerror})"
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return f"{path.name} does not match results.json's sha256/bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
    except Exception as exc:  # Pillow raises many types for a bad file; each is the finding
        return f"{path.name} does not decode ({exc})"
    if size != (WIDTH, HEIGHT):
        return f"{path.name} is {size[0]}x{size[1]}, not {WIDTH}x{HEIGHT}"
    return None


# ----- main --------------------------------------------------------------------------------------


def table(results: list[TrialResult], shots: int) -> str:
    kills = Counter(result.killed for result in results)
    broken_budget = sum(1 for r in results if r.paid_twice > r.in_flight)
    crashes = sum(r.crashes for r in results)
    faults: Counter[str] = sum((r.server_faults for r in results), Counter())
    worst = max(results, key=lambda r: r.finish_s)
    worst_stop = max((r.stop_s for r in results if r.killed == "SIGTERM"), default=0.0)
    rows = [
        "| trials | shots | kills | images lost | paid twice / in flight at kill "
        "| invalid files | crashes | worst time to finish |",
        "|---|---|---|---|---|---|---|---|",
        f"| {len(results)} | {shots} x {len(results)} "
        f"| {kills['SIGTERM']} SIGTERM, {kills['SIGKILL']} SIGKILL, {kills['none']} ended first "
        f"| **{sum(r.lost for r in results)}** "
        f"| {sum(r.paid_twice for r in results)} / {sum(r.in_flight for r in results)} "
        f"(over budget in {broken_budget} trials) "
        f"| **{sum(r.invalid for r in results)}** | {crashes} "
        f"| {worst.finish_s:.2f} s (trial {worst.index}) |",
        "",
        "Faults the server dealt: "
        + ", ".join(f"{count} {name}" for name, count in sorted(faults.items()))
        + f"; slowest SIGTERM stop {worst_stop:.2f} s.",
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description="kill imgbatch apply under faults, check nothing")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--shots", type=int, default=8, help="shots per trial")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 trials of 4 shots (CI)")
    parser.add_argument("--trial", type=int, default=None, help="run only this trial's draws")
    parser.add_argument("--concurrency", type=int, default=4, help="passed to apply")
    parser.add_argument("--finish-timeout", type=float, default=120.0, help="seconds per apply")
    parser.add_argument("--jobs", type=int, default=2, help="trials run side by side")
    parser.add_argument(
        "--keep", action="store_true", help="keep every trial's folder (default: broken ones)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.shots = 3, 4
    indices = [args.trial] if args.trial is not None else list(range(args.trials))

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    # A client killed mid-download makes the fake server log a traceback; the records say it.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    temp = tempfile.mkdtemp(prefix="imgbatch-chaos-")

    def trial(index: int) -> TrialResult:
        result = run_trial(index, args, Path(temp))
        log(
            f"trial {index}: {result.plan}: killed {result.killed}; in flight "
            f"{result.in_flight}, paid twice {result.paid_twice}, lost {result.lost}, "
            f"invalid {result.invalid}, finish {result.finish_s:.2f} s"
            + (f" [{', '.join(result.paid_twice_why)}]" if result.paid_twice_why else "")
            + ("" if not result.notes else f"; {'; '.join(result.notes)}")
            + ("" if not result.problems else f"  BROKEN: {'; '.join(result.problems)}")
        )
        folder = Path(temp) / f"trial-{index:03d}"
        if result.problems or result.notes or args.keep:
            log(f"trial {index}: its folder is kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)  # megabytes of images a trial
        return result

    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(trial, indices))
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(temp)  # unless a trial's folder is kept
    print(table(results, args.shots))
    print(
        f"\nseed {args.seed}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; "
        f"{args.jobs} trials side by side; whole run {time.monotonic() - started:.0f} s"
    )
    broken = [result for result in results if result.problems]
    for result in broken:
        print(
            f"\nBROKEN trial {result.index} ({result.plan}; {result.faults}):\n  "
            + "\n  ".join(result.problems)
            + f"\n  replay: python bench/chaos.py --seed {args.seed} --shots {args.shots} "
            f"--concurrency {args.concurrency} --trial {result.index} --keep"
        )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
