"""Four processes, one shot list, one store on a real race-tested server (SeaweedFS), one of them
killed with SIGKILL at a random moment: each key is paid once, and every process ends complete.

The one exception is the law of the service, not of the store: a request the service was
answering when its process died is billed and its answer lost, as it would be without a store.
So a key may be paid twice only if one of its payments was in flight at the moment of the kill.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import FAKE_KEY, write_many_shots
from tests.support.fake_dashscope import FakeDashScope
from tests.support.object_servers import BUCKET, s3_environ

SHOTS = 16
PROCESSES = 4
LATENCY = 0.5


def _start(manifest: Path, folder: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--concurrency", "2"],
        env={**env, "OUTPUT_DIR": str(folder)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _complete(folder: Path) -> bool:
    path = folder / "race" / "results.json"
    if not path.exists():
        return False
    shots = json.loads(path.read_text())["shots"]
    # `cached`: a killed process run again restores what it had received before the kill from
    # its own cache. Either way the shot has its image, checked on disk.
    return len(shots) == SHOTS and all(
        entry["status"] in ("generated", "cached") and (folder / "race" / entry["file"]).is_file()
        for entry in shots
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_four_processes_with_one_killed_pay_once_per_key(
    tmp_path: Path, seaweed_endpoint: str, seed: int
) -> None:
    manifest = write_many_shots(tmp_path, "race", SHOTS)
    with FakeDashScope(api_key=FAKE_KEY, latency=LATENCY, image_profile="tiny") as server:
        env = {
            **os.environ,
            **s3_environ(seaweed_endpoint),
            "DASHSCOPE_API_KEY": FAKE_KEY,
            "DASHSCOPE_HTTP_BASE_URL": server.base_url,
            "HOME": str(tmp_path),
            "IMGBATCH_STORE": f"s3://{BUCKET}/race-{seed}",
            "IMGBATCH_CLAIM_LEASE": "2",
        }
        env.pop("OUTPUT_DIR", None)
        folders = [tmp_path / f"m{index}" for index in range(PROCESSES)]
        processes = [_start(manifest, folder, env) for folder in folders]
        time.sleep(random.Random(seed).uniform(1.0, 3.0))
        killed_at = time.monotonic()
        processes[0].send_signal(signal.SIGKILL)
        processes[0].communicate()
        for process in processes[1:]:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, err
        assert all(_complete(folder) for folder in folders[1:])
        # The killed one, run again, completes too, paying nothing more.
        paid_before = server.successes
        again = _start(manifest, folders[0], env)
        _, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        assert _complete(folders[0]) and server.successes == paid_before

        payments: dict[str, list[float]] = defaultdict(list)
        for record in server.requests:
            if record.status == 200 and record.method == "POST":
                text = record.body["input"]["messages"][0]["content"][0]["text"]
                payments[text].append(record.received_at)
    assert len(payments) == SHOTS
    for text, received in payments.items():
        if len(received) > 1:
            # Paid again only because the first answer went to the process killed meanwhile.
            assert len(received) == 2, text
            assert any(at <= killed_at <= at + LATENCY + 1.0 for at in received), text
    # Every process has the same images, byte for byte.
    for index in range(SHOTS):
        name = f"race/shot-{index:03d}.png"
        assert len({(folder / name).read_bytes() for folder in folders}) == 1


MOVES = 8  # images an apply moves into the store only, each round
ROUNDS = 10


def _cli(env: dict[str, str], *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imgbatch", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finished(process: subprocess.Popen[str], *, busy_ok: bool = False) -> None:
    """`process` ended well; with `busy_ok`, or refused the output folder another holds (gc
    collects the store before it takes the folder's lock; an apply refused did nothing)."""
    out, err = process.communicate(timeout=120)
    busy = busy_ok and re.search(r"another imgbatch \w+ is writing", err) is not None
    assert process.returncode == 0 or busy, out + err


@pytest.mark.slow
def test_gc_racing_an_apply_that_moves_images_into_the_store_loses_none(
    tmp_path: Path, seaweed_endpoint: str
) -> None:
    """`gc --store --older-than 0s --grace 0s --yes` and `apply --no-local-copy` on one folder,
    started together with a random skew, round after round: gc could read the folder before
    the apply marked its images as kept in the store only, and delete their records and blobs
    after the apply had dropped its copies. After each round a plain apply pays for nothing:
    every image is in the folder, or in the store."""
    chance = random.Random(11)
    with FakeDashScope(api_key=FAKE_KEY, image_profile="tiny") as server:
        for round_ in range(ROUNDS):
            lines = ["version: 1", "name: move", "defaults:", '  size: "1328*1328"', "shots:"]
            for index in range(MOVES):
                lines += [f"  - id: move-{index}", f'    prompt: "round {round_}, take {index}"']
            (tmp_path / f"r{round_}").mkdir()
            manifest = tmp_path / f"r{round_}" / "move.yaml"
            manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
            env = {
                **os.environ,
                **s3_environ(seaweed_endpoint),
                "DASHSCOPE_API_KEY": FAKE_KEY,
                "DASHSCOPE_HTTP_BASE_URL": server.base_url,
                "HOME": str(tmp_path),
                "IMGBATCH_STORE": f"s3://{BUCKET}/gc-move-{round_}",
                "OUTPUT_DIR": str(tmp_path / f"out{round_}"),
            }
            _finished(_cli(env, "apply", manifest, "--rps", "1000"))
            paid = server.generation_count
            time.sleep(1.1)  # the store's clock counts whole seconds: past --older-than 0s
            # gc starts 0.3 to 1.6 s after the apply: it reads the folder within a second of its
            # start, and an apply looks its images up a second or two after its own.
            applying = _cli(env, "apply", manifest, "--no-local-copy", "--rps", "1000")
            time.sleep(chance.uniform(0.3, 1.6))
            gc_args = ("gc", manifest, "--older-than", "0s", "--grace", "0s", "--yes")
            _finished(_cli(env, *gc_args), busy_ok=True)
            _finished(applying, busy_ok=True)
            _finished(_cli(env, "apply", manifest, "--rps", "1000"))
            assert server.generation_count == paid, f"round {round_}: an image was lost"
