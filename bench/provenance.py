"""What stamping provenance into a real-sized PNG costs: splicing chunks vs re-encoding.

    python bench/provenance.py
    python bench/provenance.py --quick    # one run a row (what CI runs)

Prints ONE markdown table. The image is the tests' fake server's real-sized PNG (1664*928, about
3.5 MB, mostly noise, as the service's are). Each row is the median of several runs: imgbatch's
`provenance.embed` (iTXt chunks spliced in after IHDR, the image data untouched), and the issue's
first idea, Pillow re-saving the image with a `PngInfo` (at Pillow's default level 6 and at level
1). Every variant is checked to decode to the same pixels and to carry the prompt.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from bench.run import Row  # noqa: E402
from imgbatch.review.provenance import Provenance, embed  # noqa: E402
from imgbatch.shots.request import ImageRequest  # noqa: E402
from tests.support.fake_dashscope import _encode_real_png  # noqa: E402

RUNS = 7
REQUEST = ImageRequest(prompt="一只在黄昏骑行的自行车手, soft rim light", seed=1234)
PROVENANCE = Provenance("s01-dusk", REQUEST, REQUEST.text, "7d2c0000-0000-0000-0000-000000000000")


def reencode(data: bytes, level: int) -> bytes:
    info = PngInfo()
    for name, text in PROVENANCE.fields().items():
        info.add_itxt(f"imgbatch:{name}", text)
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info, compress_level=level)
    return buffer.getvalue()


def measure(label: str, original: bytes, stamp: Callable[[bytes], bytes], runs: int = RUNS) -> Row:
    timings, out = [], b""
    for _ in range(runs):
        started = time.perf_counter()
        out = stamp(original)
        timings.append(time.perf_counter() - started)
    with Image.open(io.BytesIO(out)) as image, Image.open(io.BytesIO(original)) as before:
        same = image.tobytes() == before.tobytes()
        carried = image.text.get("imgbatch:prompt") == REQUEST.prompt
    kept = out.endswith(original[33:])
    measure_text = (
        f"{statistics.median(timings) * 1000:.1f} ms; {len(out) / 1e6:.2f} MB "
        f"(was {len(original) / 1e6:.2f}); provider's bytes kept: {'yes' if kept else 'no'}"
    )
    return Row(label, measure_text, "same pixels, fields readable", same and carried)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run a row (CI)")
    runs = 1 if parser.parse_args().quick else RUNS
    original = _encode_real_png(1664, 928, (200, 40, 90))
    rows = [
        measure("splice iTXt chunks (imgbatch)", original, lambda d: embed(d, PROVENANCE), runs),
        measure("Pillow re-save + PngInfo, level 6", original, lambda d: reencode(d, 6), runs),
        measure("Pillow re-save + PngInfo, level 1", original, lambda d: reencode(d, 1), runs),
    ]
    print("| case | measure | target | met |")
    print("|---|---|---|---|")
    for row in rows:
        met = "-" if row.ok is None else ("yes" if row.ok else "**no**")
        print(f"| {row.case} | {row.measure} | {row.target} | {met} |")


if __name__ == "__main__":
    main()
