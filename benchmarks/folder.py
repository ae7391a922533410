"""Folder throughput and memory: `onnxcam explain FOLDER` as a user runs it.

    python benchmarks/folder.py [--images 200] [--many 2000]

Writes a folder of JPEG photos (crops of the bundled examples, 400-600 px wide), exports
VGG16 (random weights: same cost) and EfficientNet-Lite0, then for each model and batch
size 1, 8, 32 runs the CLI in a fresh process and reports images per second (wall time of
the whole command, model loading included) and the process's peak RSS. Last, Lite0 on
``--many`` images shows whether the peak RSS grows with the number of images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from onnxcam_export.torch_export import export_arch

sys.path.insert(0, str(Path(__file__).parent))
from process import run_cli

ROOT = Path(__file__).resolve().parents[1]


def make_photos(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sources = [cv2.imread(str(ROOT / "examples" / n)) for n in ("chelsea.png", "coffee.png")]
    rng = np.random.default_rng(0)
    for i in range(count):
        image = sources[i % 2]
        y, x = rng.integers(0, 60, 2)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), image[y:, x:], [cv2.IMWRITE_JPEG_QUALITY, 90])


def explain(model: Path, folder: Path, batch: int, out: Path) -> tuple[float, int]:
    return run_cli("explain", str(folder), "--model", str(model), "--batch-size", str(batch), "--out", str(out),
                   "--quiet", "--overwrite")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--many", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "few", args.images)
        print("| model | batch | images | seconds | images/s | peak RSS MB |\n|---|---|---|---|---|---|", flush=True)
        for arch, weights in (("vgg16", "none"), ("efficientnet_lite0", "imagenet")):
            model = work / f"{arch}.onnx"
            export_arch(arch, weights, None, model)
            for batch in (1, 8, 32):
                seconds, rss = explain(model, work / "few", batch, work / f"out-{arch}-{batch}")
                print(f"| {arch} | {batch} | {args.images} | {seconds:.1f} | {args.images / seconds:.1f} | "
                      f"{rss / 2**20:.0f} |", flush=True)  # fmt: skip
        make_photos(work / "many", args.many)
        seconds, rss = explain(work / "efficientnet_lite0.onnx", work / "many", 32, work / "out-many")
        print(f"| efficientnet_lite0 | 32 | {args.many} | {seconds:.1f} | {args.many / seconds:.1f} | "
              f"{rss / 2**20:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
