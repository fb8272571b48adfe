"""PNG decoders side by side: CPU per real-sized image, Pillow's and any other one installed.

    python bench/decoders.py            # 30 decodes of each step, the median
    python bench/decoders.py --quick    # 3 of each

Takes one image of the kind the fake server sends (1664*928, 3.25 MB: a band of colour over
rows of noise) and gives, in CPU ms (`time.process_time`, so the load of the machine moves it
less than wall time), the steps an apply does to a new image with imgbatch's own code (its
decode, its thumbnail) and the same decode by the other decoders when they are importable
(pyspng, imagecodecs, pyvips: none of them is a dependency of imgbatch; install them beside it
to compare). A decoder that gives a numpy array is also timed with the array made a Pillow
image, which is what the thumbnail needs. Measured in one process, one image at a time: in an
apply the other threads' page faults and allocations add to a decoder that allocates its
buffers afresh for every image (bench/README.md, "CPU and memory per image").
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def median_ms(step: Callable[[], object], times: int) -> float:
    step()  # warm: imports, the allocator's first buffers
    spent = []
    for _ in range(times):
        start = time.process_time()
        step()
        spent.append(time.process_time() - start)
    return statistics.median(spent) * 1000


def steps(data: bytes, folder: Path) -> dict[str, Callable[[], object]]:
    """Each step to time, by the name it has in the table (thumbnails written in `folder`)."""
    from PIL import Image

    from imgbatch.png import decode_png
    from imgbatch.review.sheet import write_thumbnail

    size = (1664, 928)
    decoded = decode_png(data, "bench bytes", size=size)
    idat = b"".join(_idat(data))
    found: dict[str, Callable[[], object]] = {
        "imgbatch decode_png (Pillow)": lambda: decode_png(data, "bench bytes", size=size),
        "zlib inflate of the image data alone (Python's zlib)": lambda: zlib.decompress(idat),
        "CRC-32 of every byte (Python's zlib)": lambda: zlib.crc32(data),
        "imgbatch thumbnail (reduce, bilinear, WebP)": lambda: write_thumbnail(
            folder, "bench", decoded.copy()
        ),
    }
    if importlib.util.find_spec("pyspng"):
        import pyspng

        found["pyspng (chunk CRCs not checked)"] = lambda: pyspng.load(data)
        found["pyspng, then a Pillow image"] = lambda: Image.fromarray(pyspng.load(data))
    if importlib.util.find_spec("imagecodecs"):
        import imagecodecs

        found["imagecodecs libspng"] = lambda: imagecodecs.spng_decode(data)
        found["imagecodecs libpng"] = lambda: imagecodecs.png_decode(data)
    if importlib.util.find_spec("pyvips"):
        import pyvips

        found["pyvips (libvips, libspng), to memory"] = lambda: pyvips.Image.pngload_buffer(
            data, access="sequential", fail_on="error"
        ).write_to_memory()
    return found


def _idat(data: bytes) -> list[bytes]:
    from imgbatch.png import chunks

    return [data[start + 8 : end - 4] for kind, start, end in chunks(data) if kind == b"IDAT"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 runs of each step")
    args = parser.parse_args()
    from tests.support.fake_dashscope import _encode_real_png

    data = _encode_real_png(1664, 928, (200, 120, 40))
    print(f"one {len(data) / 1e6:.2f} MB PNG of 1664*928; CPU ms, median\n")
    print("| step | CPU ms |\n|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, step in steps(data, Path(folder)).items():
            print(f"| {name} | {median_ms(step, 3 if args.quick else 30):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
