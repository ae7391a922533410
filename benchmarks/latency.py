"""Grad-CAM latency vs a plain ONNX Runtime forward of the same weights, side by side.

    python benchmarks/latency.py [--pairs 15] [--batch 1] [--arch vgg16 --arch efficientnet_lite0]

For each architecture it exports (random weights for VGG16, which do not change the
cost; real ones for Lite0) the onnxcam model and the plain forward graph, then alternates
in the same process: forward, Grad-CAM with 1 target, Grad-CAM with the top-5 targets,
Grad-CAM with 1 target and the full gradient tensor, all eight CAM methods that need
only activations and gradients for the top-5 classes (one call plus numpy), and the graph's
own finished Grad-CAM maps (its ``saliency`` output, what a host without Python reads) for 1
and 5 targets. The API's maps are read (:func:`process.finished`). Each round runs every
contender once in a shuffled order, with a short pause before each (so that one
contender's idle worker threads do not slow the next); each ratio is taken within its
round, and the median of the per-round ratios is reported. Each contender also gets a CPU-time
row (the process's, all threads: ORT's threads do not spin here), which neighbours on a shared
machine disturb far less than the wall time.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcam import Explainer
from onnxcam.methods import METHODS
from onnxcam_export.torch_export import export_arch

sys.path.insert(0, str(Path(__file__).parent))
from nets import WEIGHTS, forward_only, quiet_options
from process import finished

ONE_CALL = [name for name, m in METHODS.items() if m.passes is None and m.requires is None]  # one ORT call, any CNN


def measure(arch_name: str, pairs: int, folder: Path, batch: int = 1) -> dict[str, list[float]]:
    cam_path, fwd_path = folder / f"{arch_name}.onnx", folder / f"{arch_name}.forward.onnx"
    export_arch(arch_name, WEIGHTS[arch_name], None, cam_path)
    forward_only(arch_name, fwd_path)
    explainer = Explainer(cam_path, session_options=quiet_options())
    session = ort.InferenceSession(str(fwd_path), quiet_options(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    photos, top5 = list(images), -np.tile(np.arange(1, 6), (batch, 1))
    contenders = {
        "forward": lambda: session.run(["logits"], {"image": images}),
        "gradcam_1": lambda: finished(explainer.explain_batch(photos, top_k=1)),
        "gradcam_top5": lambda: finished(explainer.explain_batch(photos, top_k=5)),
        "full_gradient_1": lambda: explainer.engine.run(images, np.full((batch, 1), -1), full_gradients=True),
        "all_AG_methods_top5": lambda: finished(explainer.explain_batch(photos, top_k=5, method=ONE_CALL)),
        # the file alone: its finished maps at the input size from the saliency output, no Python per map
        "in_graph_map_1": lambda: explainer.engine.run(images, np.full((batch, 1), -1), saliency="gradcam"),
        "in_graph_map_top5": lambda: explainer.engine.run(images, top5, saliency="gradcam"),
    }
    return time_rounds(contenders, pairs)


def time_rounds(contenders: dict[str, Callable[[], object]], pairs: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``pairs`` rounds, each running every contender once in a shuffled order."""
    for run in contenders.values():  # warm-up: allocations, thread pools
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {f"{name} (CPU)": [] for name in contenders}
    order = random.Random(0)
    for _ in range(pairs):
        names = list(contenders)
        order.shuffle(names)  # no contender always runs right after another one
        for name in names:
            time.sleep(0.05)  # let the previous contender's idle worker threads (ORT, BLAS) go to sleep
            start, start_cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
            cpu[f"{name} (CPU)"].append(time.process_time() - start_cpu)  # all threads; ORT's do not spin
    return times | cpu


def report(arch_name: str, times: dict[str, list[float]], batch: int = 1) -> str:
    header = "| contender | median ms | ratio to forward (median of rounds) | min-max ratio |"
    lines = [f"### {arch_name}, batch {batch}, 224x224", "", header, "|---|---|---|---|"]
    for name, values in times.items():
        base = times["forward (CPU)" if name.endswith("(CPU)") else "forward"]
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(values) * 1e3:.1f} | {statistics.median(ratios):.3f} | "
            f"{min(ratios):.3f}-{max(ratios):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15, help="rounds (each runs every contender once)")
    parser.add_argument("--arch", action="append", choices=sorted(WEIGHTS))
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {ort.get_device()}, onnxruntime {ort.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {args.pairs} rounds")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for arch_name in args.arch or ["vgg16", "efficientnet_lite0"]:
            times = measure(arch_name, args.pairs, Path(folder), args.batch)
            print(report(arch_name, times, args.batch), "\n", flush=True)


if __name__ == "__main__":
    main()
