"""Folder throughput and memory: `onnxcam explain FOLDER` as a user runs it.

    python benchmarks/folder.py [--images 200] [--many 2000] [--rounds 3] [--arch ARCH...] [--ratio-only]

Writes a folder of 500x375 JPEG photos (crops of the bundled examples) and exports VGG16
(random weights: same cost) and EfficientNet-Lite0. First, side by side at batch 8, the
folder path against the explainer graph alone (ONNX Runtime on the already decoded and
resized batches, nothing written), in rounds of shuffled order: the median ratio of the
folder's throughput (its loop, start-up excluded) to the graph's, with PNG and with JPEG
overlays. Then for each model and batch size 1, 8, 32 the whole command in a fresh process
(images per second with model loading, and the peak RSS), and Lite0 on ``--many`` images to
show that the peak RSS does not grow with the number of images (``--ratio-only``: the first table alone).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from onnxcam.engine import Engine
from onnxcam.image import read_rgb, resize_rgb
from onnxcam_export.torch_export import export_arch

sys.path.insert(0, str(Path(__file__).parent))
from nets import WEIGHTS
from process import Run, run_cli

ROOT = Path(__file__).resolve().parents[1]


def make_photos(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sources = [cv2.imread(str(ROOT / "examples" / n)) for n in ("chelsea.png", "coffee.png")]
    rng = np.random.default_rng(0)
    for i in range(count):
        image = sources[i % 2]
        y, x = rng.integers(0, 25, 2)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), cv2.resize(image[y:, x:], (500, 375)), [cv2.IMWRITE_JPEG_QUALITY, 90])


def explain(model: Path, folder: Path, batch: int, out: Path, *extra: str) -> Run:
    return run_cli("explain", str(folder), "--model", str(model), "--batch-size", str(batch), "--out", str(out),
                   "--quiet", "--overwrite", *extra)  # fmt: skip


def graph_seconds(model: Path, folder: Path, batch: int) -> float:
    """ONNX Runtime alone on the folder's images, decoded and resized beforehand: Grad-CAM, top-1."""
    engine = Engine(model)
    images = np.stack([resize_rgb(read_rgb(p), engine.card.input_size) for p in sorted(folder.glob("*.jpg"))])
    engine.run(images[:batch], np.full((batch, 1), -1))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        engine.run(images[i : i + batch], np.full((len(images[i : i + batch]), 1), -1))
    return time.perf_counter() - start


def against_graph(models: dict[str, Path], folder: Path, count: int, rounds: int, work: Path) -> None:
    print("| model (batch 8) | graph alone img/s | folder, PNG img/s | ratio | folder, JPEG img/s | ratio |")
    print("|---|---|---|---|---|---|", flush=True)
    for arch, model in models.items():
        runs: dict[str, list[float]] = {"graph": [], "png": [], "jpg": []}
        for _ in range(rounds):
            for kind in random.sample(list(runs), len(runs)):
                if kind == "graph":
                    runs[kind].append(graph_seconds(model, folder, 8))
                else:
                    out = work / f"out-{arch}-{kind}"
                    runs[kind].append(explain(model, folder, 8, out, "--overlay-format", kind).loop_seconds)
        rate = {k: count / statistics.median(v) for k, v in runs.items()}
        ratio = {
            k: statistics.median(g / f for g, f in zip(runs["graph"], runs[k], strict=True)) for k in ("png", "jpg")
        }
        print(f"| {arch} | {rate['graph']:.1f} | {rate['png']:.1f} | {ratio['png']:.2f} | {rate['jpg']:.1f} | "
              f"{ratio['jpg']:.2f} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--many", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    parser.add_argument("--ratio-only", action="store_true", help="only the folder-vs-graph table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "few", args.images)
        models = {}
        for arch in args.arch:
            models[arch] = work / f"{arch}.onnx"
            export_arch(arch, WEIGHTS[arch], None, models[arch])
        against_graph(models, work / "few", args.images, args.rounds, work)
        if args.ratio_only:
            return
        print("\n| model | batch | images | seconds | images/s | peak RSS MB |\n|---|---|---|---|---|---|", flush=True)
        for arch, model in models.items():
            for batch in (1, 8, 32):
                run = explain(model, work / "few", batch, work / f"out-{arch}-{batch}")
                print(f"| {arch} | {batch} | {args.images} | {run.seconds:.1f} | {args.images / run.seconds:.1f} | "
                      f"{run.peak_rss / 2**20:.0f} |", flush=True)  # fmt: skip
        if "efficientnet_lite0" not in models:
            return
        make_photos(work / "many", args.many)
        run = explain(models["efficientnet_lite0"], work / "many", 32, work / "out-many")
        print(f"| efficientnet_lite0 | 32 | {args.many} | {run.seconds:.1f} | {args.many / run.seconds:.1f} | "
              f"{run.peak_rss / 2**20:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
