"""INT8 explainers (`onnxcam quantize`) against the float ones: time side by side, map and class drift, faithfulness.

    python benchmarks/int8.py [--rounds 15] [--scenes 50] [--arch efficientnet_lite0 --arch vgg16]

For each architecture: export the float explainer (Lite0 with its ImageNet weights; VGG16 with
random weights, which do not change its cost: its drift is not measured), write 16
calibration scenes (scripts/scenes.py, seed 1) and `onnxcam quantize` with them, then

- time `Explainer.explain_batch` (Grad-CAM, top-1) of both at batch 1 and 8, each round both
  in a shuffled order with a pause before each, and report the median of the per-round ratios;
- over the bundled photos and ``--scenes`` other scenes (seed 0): the Pearson correlation of the
  INT8 map with the float map (same class: the float model's top-1) and the top-1 agreement;
- `onnxcam eval` (deletion and insertion AUC, 32 steps) of both over the same images.

Prints markdown and stores it in benchmarks/results.md (section "int8").
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcam import Explainer, evaluate
from onnxcam_export.quantize import quantize_file
from onnxcam_export.torch_export import export_arch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from nets import WEIGHTS, quiet_options
from process import finished, write_section
from scenes import write_scenes

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"vgg16": 0.45, "efficientnet_lite0": 0.75}


def timing(models: dict[str, Path], batch: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds (all threads; ORT's do not spin) per call, for each model, over ``rounds``."""
    explainers = {name: Explainer(path, session_options=quiet_options()) for name, path in models.items()}
    images = list(np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8))
    for explainer in explainers.values():
        explainer.explain_batch(images)
        explainer.explain_batch(images)
    times: dict[str, list[float]] = {name: [] for name in explainers}
    cpu: dict[str, list[float]] = {name: [] for name in explainers}
    order = random.Random(0)
    for _ in range(rounds):
        names = list(explainers)
        order.shuffle(names)
        for name in names:
            time.sleep(0.05)
            start, start_cpu = time.perf_counter(), time.process_time()
            finished(explainers[name].explain_batch(images))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return times, cpu


def drift(models: dict[str, Path], photos: list[Path]) -> dict[str, float]:
    floats, int8 = Explainer(models["float"]), Explainer(models["INT8"])
    correlations, same = [], 0
    for photo in photos:
        reference = floats.explain(photo).maps[0]
        ours = int8.explain(photo, targets=[reference.index], top_k=1).maps
        same += ours[1].index == reference.index
        correlations.append(float(np.corrcoef(reference.cam.ravel(), ours[0].cam.ravel())[0, 1]))
    return {"images": len(photos), "median r": statistics.median(correlations), "worst r": min(correlations),
            "top-1 agreement": same / len(photos)}  # fmt: skip


def faithfulness(model: Path, photos: list[Path]) -> dict[str, float]:
    rows = list(evaluate.evaluate(Explainer(model), photos, None, "gradcam", 32, None, False))
    means = evaluate.averages(rows)
    return {key: means[key] for key in ("deletion_auc", "insertion_auc")}


def report(arch: str, folder: Path, rounds: int, scenes: int) -> list[str]:
    models = {"float": folder / f"{arch}.onnx", "INT8": folder / f"{arch}.int8.onnx"}
    export_arch(arch, WEIGHTS[arch], None, models["float"])
    write_scenes(folder / "calibration", 16, seed=1)
    quantize_file(models["float"], folder / "calibration", models["INT8"])
    header = "| batch | float ms | INT8 ms | INT8 / float, wall (median of rounds) | INT8 / float, CPU | target |"
    lines = [f"### {arch} ({WEIGHTS[arch]} weights)", "", header, "|---|---|---|---|---|---|"]
    for batch in (1, 8):
        times, cpu = timing(models, batch, rounds if batch == 1 else max(3, rounds // 3))
        ratios = [q / f for q, f in zip(times["INT8"], times["float"], strict=True)]
        cpu_ratios = [q / f for q, f in zip(cpu["INT8"], cpu["float"], strict=True)]
        lines.append(f"| {batch} | {statistics.median(times['float']) * 1e3:.1f} | "
                     f"{statistics.median(times['INT8']) * 1e3:.1f} | {statistics.median(ratios):.2f} "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | {statistics.median(cpu_ratios):.2f} | "
                     f"<= {TARGETS[arch]} |")  # fmt: skip
        print(lines[-1], flush=True)
    if WEIGHTS[arch] == "none":
        return [*lines, "", "(random weights: the maps and classes mean nothing, so their drift is not measured)", ""]
    photos = [ROOT / "examples" / "chelsea.png", ROOT / "examples" / "coffee.png"]
    photos += write_scenes(folder / "scenes", scenes, seed=0)
    agreement = drift(models, photos)
    lines += ["", "| images | median map r | worst map r | top-1 agreement |", "|---|---|---|---|",
              f"| {agreement['images']} | {agreement['median r']:.4f} | {agreement['worst r']:.4f} | "
              f"{agreement['top-1 agreement']:.1%} |"]  # fmt: skip
    lines += ["", "| model | deletion AUC (lower is better) | insertion AUC (higher is better) |", "|---|---|---|"]
    for name, path in models.items():
        scores = faithfulness(path, photos)
        lines.append(f"| {name} | {scores['deletion_auc']:.4f} | {scores['insertion_auc']:.4f} |")
    print("\n".join(lines[-9:]), flush=True)
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--arch", action="append", choices=sorted(WEIGHTS))
    args = parser.parse_args()
    archs = args.arch or ["efficientnet_lite0", "vgg16"]
    command = "python benchmarks/int8.py" + "".join(f" --arch {a}" for a in args.arch or [])
    lines = ["## INT8 explainers (`onnxcam quantize`)", "",
             f"`{command} --rounds {args.rounds} --scenes {args.scenes}`, {time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()}, onnxruntime {ort.__version__}; QDQ, per-channel, 16 calibration scenes.",
             ""]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            (Path(tmp) / arch).mkdir()
            lines += report(arch, Path(tmp) / arch, args.rounds, args.scenes)
    write_section("int8", "\n".join(lines))


if __name__ == "__main__":
    main()
