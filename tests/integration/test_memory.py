"""Memory per image: an apply's peak does not grow with the images in flight.

Takes the fake service serving real-sized images (3 to 4 MB) over a slow link, so that every
download of a run overlaps the others, and `imgbatch apply` in a process of its own; gives its
peak resident memory. Each image is written to disk as it arrives and decoded one per core, so
forty images in flight at once cost about what four do; an apply that held every body whole
(with its copies) grew by several megabytes an image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import FAKE_KEY, write_many_shots

pytestmark = pytest.mark.slow  # two real processes, 44 images of 3 MB through a slow link

# What forty images in flight may add over four: a few decodes at a time, the sockets' buffers
# and the allocator's fragmentation (measured: 27 to 48 MB). Holding each body whole, as
# imgbatch did before, added 284 MB (36 images x 3.3 MB, in two or three copies each).
GROWTH_BOUND = 80 * 2**20


def peak_rss(directory: Path, server: FakeDashScope, shots: int) -> int:
    """The peak resident memory, in bytes, of `imgbatch apply` making `shots` images at once."""
    manifest = write_many_shots(directory, f"mem{shots}", shots)
    env = {
        **os.environ,
        "DASHSCOPE_API_KEY": FAKE_KEY,
        "DASHSCOPE_HTTP_BASE_URL": server.base_url,
        "HOME": str(directory),
    }
    command = [sys.executable, "-m", "imgbatch", "apply", str(manifest), "--quota", "1000/s"]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stderr is not None
        errors = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, errors
    made = list((directory / "output" / f"mem{shots}").glob("shot-*.png"))
    assert len(made) == shots
    return usage.ru_maxrss * 1024  # kilobytes on Linux


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux")
def test_peak_memory_does_not_grow_with_the_images_in_flight(tmp_path: Path) -> None:
    # 52 chunks of 64 KB, 20 ms apart: each download takes about a second, so all overlap.
    with FakeDashScope(api_key=FAKE_KEY, image_profile="real", chunk_delay=0.02) as server:
        (tmp_path / "few").mkdir()
        (tmp_path / "many").mkdir()
        few = peak_rss(tmp_path / "few", server, 4)
        many = peak_rss(tmp_path / "many", server, 40)
    assert many - few < GROWTH_BOUND, f"4 images: {few / 2**20:.0f} MB, 40: {many / 2**20:.0f} MB"
