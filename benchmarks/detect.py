"""A detector's and a segmenter's explanations vs a plain ONNX Runtime forward of the same file, side by side.

    python benchmarks/detect.py [--rounds 15]      # needs ultralytics and torchvision (a torch 2.14.1 venv)

YOLOv8n (``yolov8n.yaml``, random weights with batch norms calibrated on random images so that
boxes are kept, 640x640, exported by ultralytics with ``nms=False``) and torchvision's DeepLabV3
MobileNetV3-Large (random weights, 21 classes, 512x512, exported by torch.onnx) are grafted with
``export --from`` at their automatic layers (YOLOv8n's: the three inputs of its Detect head; also
at ``model.4``, the last layer all three scales share, with ``--layer``, and at the automatic layers
with the backward over whole feature maps instead of each box's windows). Each round runs every
contender once on the bundled cat photo, in a shuffled order: the plain forward of the original
file, and ``Engine.run`` of the grafted one (1 or 10 detections, or one class; the Grad-CAM
weights alone, or the full gradients that HiResCAM needs).
Ratios are taken within a round; the table gives the median (min-max) over the rounds. The tables
go into ``benchmarks/results.md`` (section ``detect``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from onnxcam.engine import Engine
from onnxcam.image import read_rgb, resize_rgb
from onnxcam_export.from_onnx import Preprocessing, graft_file

sys.path.insert(0, str(Path(__file__).parent))
from process import write_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = "/model.4/cv2/act/Mul_output_0"  # YOLOv8n's last layer that all three scales read


def yolo(folder: Path) -> Path:
    """YOLOv8n with random weights, as ultralytics exports it (input RGB / 255, 640x640)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml")
    for branch in model.model.model[-1].cv3:
        branch[-1].bias.data.zero_()
    for module in model.model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    with torch.no_grad():
        model.model.train()(torch.rand(4, 3, 640, 640))
    with warnings.catch_warnings(), contextlib.chdir(folder):
        warnings.simplefilter("ignore")
        return folder / model.export(format="onnx", imgsz=640, simplify=False, nms=False, opset=17)


def deeplab(folder: Path) -> Path:
    """torchvision's DeepLabV3 MobileNetV3-Large, random weights, its ``out`` mask logits, 512x512."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    class Masks(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)["out"]

    torch.manual_seed(0)
    model = Masks(deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)).eval()
    path = folder / "deeplabv3_mobilenet_v3_large.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 512, 512),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["out"])  # fmt: skip
    return path


def contenders(plain: Path, grafted: dict[str, Path], task: str) -> dict[str, Callable[[], object]]:
    """The plain forward, then each grafted file's explanations (``grafted``: its name in the table -> file)."""
    runs = {}
    for layer, path in grafted.items():
        runs |= {name: run for name, run in _explanations(plain, path, task, layer).items() if name not in runs}
    return runs


def _explanations(plain: Path, grafted: Path, task: str, layer: str) -> dict[str, Callable[[], object]]:
    engine = Engine(grafted)
    image = resize_rgb(read_rgb(ROOT / "examples" / "chelsea.png"), engine.card.input_size)[None]
    session = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = {name: np.ascontiguousarray(image.transpose(0, 3, 1, 2), dtype=np.float32) / 255}
    forward = {"ORT forward (original file)": lambda: session.run(None, x)}
    codes = {1: np.array([[-1]]), 10: -np.arange(1, 11)[None]}
    if task == "detection":
        low = {"conf_threshold": 0.25}
        if not (engine.run(image, codes[10], thresholds=low).box_anchors >= 0).all():
            raise RuntimeError("fewer than 10 kept detections: the 10-detection rows would measure less work")
        anchors = 80**2 + 40**2 + 20**2  # YOLOv8n at 640x640: strides 8, 16, 32
        coarse = (np.arange(10) * anchors + anchors - 20**2 + np.arange(10) * 37)[None]  # class k at a P5 anchor
        return (
            forward
            | {
                f"onnxcam, {layer}, {k} detection{'s' * (k > 1)}, {what}": (
                    lambda k=k, full=full: engine.run(image, codes[k], full_gradients=full, thresholds=low)
                )
                for k in (1, 10)
                for what, full in (("Grad-CAM weights", False), ("full gradients", True))
            }
            | {
                f"onnxcam, {layer}, 10 boxes at P5 anchors (stride 32), {what}": (
                    lambda full=full: engine.run(image, coarse, full_gradients=full)
                )
                for what, full in (("Grad-CAM weights", False), ("full gradients", True))
            }
        )
    return forward | {
        f"onnxcam, {layer}, top class, {what}": lambda full=full: engine.run(image, codes[1], full_gradients=full)
        for what, full in (("Grad-CAM weights", False), ("full gradients", True))
    }


def measure(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, list[float]]]:
    """name -> (median ms, per-round ratio to the first contender)."""
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name in random.sample(list(runs), len(runs)):
            time.sleep(0.05)
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    first = next(iter(runs))
    return {
        name: (1000 * statistics.median(t), [a / b for a, b in zip(t, times[first], strict=True)])
        for name, t in times.items()
    }


def table(title: str, results: dict[str, tuple[float, list[float]]]) -> str:
    rows = [f"## {title}", "", "| contender | median ms | ratio to ORT forward |", "|---|---|---|"]
    for name, (ms, ratios) in results.items():
        rows.append(f"| {name} | {ms:.1f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    random.seed(0)
    versions = f"onnxruntime {ort.__version__}, torch {torch.__version__}"
    parts = ["# Detectors and segmenters: explanation vs forward",
             f"`python benchmarks/detect.py --rounds {args.rounds}`, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
             f"with {os.cpu_count()} cores; {versions}. Batch 1; median ms, ratios per round."]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = [("YOLOv8n (ultralytics), 640x640", yolo, "detection"),
                  ("DeepLabV3 MobileNetV3-Large (torchvision), 512x512", deeplab, "segmentation")]  # fmt: skip
        for title, make, task in models:
            plain = make(folder)
            size = (640, 640) if task == "detection" else (512, 512)
            prep = Preprocessing.create(size, (0, 0, 0), (1, 1, 1), False)
            layers = {"model.4 (shared)": (SHARED, True)} if task == "detection" else {}
            layers |= {"Detect head inputs (auto)" if task == "detection" else "auto layer": (None, True)}
            layers |= {"Detect head inputs, whole maps": (None, False)} if task == "detection" else {}
            grafted = {}
            for name, (layer, windowed) in layers.items():
                grafted[name] = plain.with_name(f"{plain.stem}.{len(grafted)}.cam.onnx")
                notes = graft_file(plain, grafted[name], layer, prep=prep, windowed=windowed)[1]
                print(name, "|", next((n for n in notes if "backward walks" in n), "(no window walk)"))
            parts.append(table(title, measure(contenders(plain, grafted, task), args.rounds)))
    parts.append("YOLOv8n has random weights (batch norms calibrated on random images so that at least ten boxes\n"
                 "are kept at conf 0.25): weights do not change the cost of a walk over whole maps, but where the\n"
                 "kept boxes lie changes that of the window walk: with these weights the cat photo's ten kept\n"
                 "detections all lie on P3 (stride 8), the cheapest scale, so the P5 rows ask for ten boxes at\n"
                 "stride-32 anchors, the dearest. \"whole maps\": the same file grafted with the dense walk."
                 )  # fmt: skip
    write_section("detect", "\n\n".join(parts))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
