"""Peak memory of one large photo: `onnxcam explain` on a 9000 x 9000 JPEG, in a fresh process.

    python benchmarks/memory.py [--side 9000] [--model models/efficientnet_lite0.onnx]

Prints the peak RSS (VmHWM) of the whole command, the photo's decoded size (side^2 x 3 bytes),
the float32 map's size (side^2 x 4 bytes), and the ratio of the peak to the 1.5 GB target.
The raw map is written at the photo's resolution, as users asked, so the floor is about
photo + map + one overlay; the work is float32/uint8 and in place to stay near that floor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from process import run_cli

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.5e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=9000)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet_lite0.onnx")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "large.jpg"
        cat = cv2.imread(str(ROOT / "examples" / "chelsea.png"))
        large = cv2.resize(cat, (args.side, args.side), interpolation=cv2.INTER_LINEAR)
        large = cv2.add(large, np.random.default_rng(0).integers(0, 12, large.shape, dtype=np.uint8))
        cv2.imwrite(str(photo), large, [cv2.IMWRITE_JPEG_QUALITY, 90])
        del cat, large
        run = run_cli("explain", str(photo), "--model", str(args.model), "--out", str(Path(tmp) / "out"), "--quiet")
        seconds, peak = run.seconds, run.peak_rss
        pixels = args.side**2
        print("| photo | file MB | decoded RGB MB | float32 map MB | peak RSS MB | seconds | peak / 1.5 GB |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {args.side}x{args.side} | {photo.stat().st_size / 1e6:.0f} | {pixels * 3 / 1e6:.0f} | "
              f"{pixels * 4 / 1e6:.0f} | {peak / 1e6:.0f} | {seconds:.1f} | {peak / TARGET:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
