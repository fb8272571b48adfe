"""SIGTERM to any command, and the lock's refusal, say what happened.

Takes: real `imgbatch gc` and `imgbatch sheet` processes (SIGTERM sent once the command's own
handler is in place, read from /proc), and an output folder locked by another command. Gives:
evidence that SIGTERM ends a command with "interrupted (SIGTERM)" and exit 130 (not a silent
143) leaving no temporary file, and that a refusal names the command holding the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgbatch.cli.main import main
from imgbatch.run.apply import ApplyOptions, apply
from imgbatch.state.folder import OutputFolder
from tests.conftest import write_many_shots

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def handles_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler of its own for SIGTERM (SigCgt in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & SIGTERM_BIT)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("command", [["sheet"], ["gc", "--yes"]], ids=["sheet", "gc"])
def test_sigterm_says_interrupted_and_exits_130_leaving_nothing_half_written(
    command: list[str], tmp_path: Path
) -> None:
    manifest = write_many_shots(tmp_path, "term", 3)
    assert apply(manifest, ApplyOptions(provider="placeholder")).ok  # a folder to work on
    output = tmp_path / "output" / "term"
    before = {p.name for p in output.rglob("*")}
    env = {**os.environ, "HOME": str(tmp_path)}
    for name in ("OUTPUT_DIR", "DASHSCOPE_API_KEY"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", *command, str(manifest)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not handles_sigterm(process.pid):
        # Without a handler of its own, SIGTERM would end it silently with 143.
        assert process.poll() is None, "the command ran to its end without handling SIGTERM"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    if process.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    assert process.returncode == 130, stderr
    assert stderr.strip().endswith("interrupted (SIGTERM)"), stderr
    assert "Traceback" not in stderr
    after = {p.name for p in output.rglob("*")}
    assert not any(name.startswith(".imgbatch-tmp-") for name in after)
    assert after <= before


@pytest.mark.parametrize(
    ("holder", "written", "shown"),
    [
        ("gc", None, "another imgbatch gc is writing to {out} (process {pid}); wait for it"),
        ("generate", None, "another imgbatch generate is writing to {out} (process {pid})"),
        ("apply", None, "another imgbatch apply is writing to {out} (process {pid})"),
        # What the holder file says is shown only when it is a known command and a number.
        ("gc", b"rm -rf /\x1b[2J", "another imgbatch command is writing to {out}; wait"),
        ("gc", b"gc 12; evil", "another imgbatch gc is writing to {out}; wait"),
        ("gc", b"\xff\xfe", "another imgbatch command is writing to {out}; wait"),
    ],
    ids=["gc", "generate", "apply", "junk", "pid not a number", "not text"],
)
def test_the_lock_refusal_names_the_command_that_holds_it(
    holder: str, written: bytes | None, shown: str, tmp_path: Path
) -> None:
    manifest = write_many_shots(tmp_path, "locked", 1)
    out = tmp_path / "output" / "locked"
    with OutputFolder(out).lock(holder):
        if written is not None:
            (out / ".imgbatch" / "lock.holder").write_bytes(written)
        result = CliRunner().invoke(
            main, ["apply", str(manifest), "--provider", "placeholder"], env={"OUTPUT_DIR": None}
        )
    assert result.exit_code == 1, result.output
    assert shown.format(out=out, pid=os.getpid()) in result.stderr
    assert "\x1b" not in result.stderr
