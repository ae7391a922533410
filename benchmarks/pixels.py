"""The cost of pixel attributions (`export --pixels`) against a plain forward and against Captum, same weights.

    pip install captum -e '.[export]'
    python benchmarks/pixels.py [--rounds 3] [--archs vgg16 efficientnet_lite0]

Per network (VGG16 with random weights: the cost does not depend on them; EfficientNet-Lite0 with its ImageNet
weights), one 224x224 photo, its top class, contenders alternated in one process in a shuffled order each round:
a plain ONNX Runtime forward of the same network (the bound), onnxcam's saliency (one call: the forward and the
backward to the input), Integrated Gradients with 32 Gauss-Legendre steps from a black baseline (32 rows in calls
of pixels.CHUNK, plus a forward of its two ends for the completeness error) and SmoothGrad with 16 samples, each
beside Captum's `Saliency`, `IntegratedGradients` (n_steps=32, one batch) and `NoiseTunnel(Saliency)`
(nt_samples=16) on the same weights and threads; a Grad-CAM call on the file and on one exported without --pixels.
Then the peak RSS (VmHWM) of a fresh process running the 32-step Integrated Gradients on VGG16. Prints the medians
and the ratios asked for (saliency / forward <= 2.5, ours / Captum's <= 0.5, RSS <= 3 GB) beside the ratio if our
work cost only its plain forwards (:data:`FORWARDS`), what a Grad-CAM call costs on the file with --pixels against
one without, and Integrated Gradients' completeness error by steps (the trained network's); the CPU's ISA beside
them; results go to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

import onnxcam
from onnxcam import Explainer, pixels
from onnxcam_export.torch_export import export_arch

sys.path.insert(0, str(Path(__file__).parent))
from nets import WEIGHTS, forward_only, normalised, photos, quiet_options, torch_model
from process import alternated, cpu, finished, write_section

RSS_SCRIPT = """import sys
import numpy as np
from onnxcam import pixels
from onnxcam.engine import Engine
engine = Engine(sys.argv[1])
photo = np.load(sys.argv[2])
pixels.integrated_gradients(engine, photo, np.array([int(sys.argv[3])]), steps=32)
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""


def timings(arch_name: str, folder: Path, rounds: int) -> tuple[dict[str, list[float]], Path, np.ndarray, int]:
    model = torch_model(arch_name)
    cam_path, fwd_path = folder / f"{arch_name}.onnx", folder / f"{arch_name}.fwd.onnx"
    export_arch(arch_name, WEIGHTS[arch_name], None, cam_path, pixels=True)
    forward_only(arch_name, fwd_path)
    export_arch(arch_name, WEIGHTS[arch_name], None, folder / f"{arch_name}.camonly.onnx")
    explainer = Explainer(cam_path, session_options=quiet_options())
    cam_only = Explainer(folder / f"{arch_name}.camonly.onnx", session_options=quiet_options())
    engine = explainer.engine
    session = ort.InferenceSession(str(fwd_path), quiet_options(), providers=["CPUExecutionProvider"])
    images = photos(1)
    photo = images[0]
    x = normalised(images, arch_name)
    with torch.no_grad():
        top = int(model(x).argmax(1)[0])
    black = normalised(np.zeros_like(images), arch_name)
    sigma = pixels.NOISE * float(np.ptp(pixels.model_input(engine, photo)))
    classes = np.array([top])

    contenders = {
        "ORT forward": lambda: session.run(["logits"], {"image": images}),
        "onnxcam Grad-CAM, this file": lambda: finished([explainer.explain(photo, targets=[top])]),
        "onnxcam Grad-CAM, a file without --pixels": lambda: finished([cam_only.explain(photo, targets=[top])]),
        "onnxcam saliency": lambda: finished([explainer.explain(photo, targets=[top], method="saliency")]),
        "Captum Saliency": lambda: Saliency(model).attribute(x.clone(), target=top),
        "onnxcam Integrated Gradients, 32 steps": lambda: pixels.integrated_gradients(engine, photo, classes),
        "Captum IntegratedGradients, 32 steps": lambda: IntegratedGradients(model).attribute(
            x, black, target=top, n_steps=32),
        "onnxcam SmoothGrad, 16 samples": lambda: pixels.smoothgrad(engine, photo, classes),
        "Captum NoiseTunnel smoothgrad, 16 samples": lambda: NoiseTunnel(Saliency(model)).attribute(
            x.clone(), nt_type="smoothgrad", nt_samples=16, stdevs=sigma, target=top, abs=False),
    }  # fmt: skip
    times = alternated(contenders, rounds)
    return times, cam_path, photo, top


def peak_rss(path: Path, photo: np.ndarray, top: int, folder: Path) -> float:
    """Bytes at the high-water mark of a fresh process running a 32-step Integrated Gradients."""
    np.save(folder / "photo.npy", photo)
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(folder / "photo.npy"), str(top)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    return int(result.stdout.split()[-1]) * 1024


def ratio(times: dict[str, list[float]], ours: str, theirs: str) -> str:
    """The per-round ratio, as median (min-max)."""
    values = [a / b for a, b in zip(times[ours], times[theirs], strict=True)]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


# plain forwards a contender's work is worth: a row is a forward and a backward (as many multiply-adds); IG's
# ends are a forward of two rows, SmoothGrad's noise scale reads the input's range from one
FORWARDS = {"onnxcam saliency": 2, "onnxcam Integrated Gradients, 32 steps": 2 * pixels.STEPS + 2,
            "onnxcam SmoothGrad, 16 samples": 2 * pixels.SAMPLES + 1}  # fmt: skip


def bound(times: dict[str, list[float]], ours: str, theirs: str) -> str:
    """The ratio if our work cost only its :data:`FORWARDS` (a floor for ONNX Runtime, whose backward is made of
    forward ops: no fused ReLU masks, no kernel that reads the forward's own layout)."""
    floor = FORWARDS[ours] * statistics.median(times["ORT forward"])
    return f"{floor / statistics.median(times[theirs]):.2f}"


def completeness(path: Path, photo: np.ndarray, top: int) -> str:
    """Integrated Gradients' completeness error on the photo's top class, black baseline, by steps."""
    engine = Explainer(path, session_options=quiet_options()).engine
    errors = {n: pixels.integrated_gradients(engine, photo, np.array([top]), steps=n).completeness[0]
              for n in (32, 64, 128, 256)}  # fmt: skip
    shown = ", ".join(f"{100 * e:.2f}% at {n}" for n, e in errors.items())
    return (f"Integrated Gradients' completeness error on the photo's top class ({top}), black baseline, "
            f"Gauss-Legendre: {shown} steps (target <= 1% at 64).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=["vgg16", "efficientnet_lite0"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    assert pixels.STEPS == 32 and pixels.SAMPLES == 16, "the contenders' names give the steps and samples"
    lines = [
        "# Pixel attributions: their cost against a forward and against Captum",
        "",
        f"`python benchmarks/pixels.py --rounds {args.rounds}`, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
        f"({cpu()}) with {torch.get_num_threads()} threads; onnxruntime {ort.__version__}, torch {torch.__version__}, "
        f"onnxcam {onnxcam.__version__}. Batch 1, 224x224; medians of the rounds, ratios per round as median "
        "(min-max).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch_name in args.archs:
            times, path, photo, top = timings(arch_name, folder, args.rounds)
            lines += [f"## {arch_name}", "", "| contender | median ms |", "|---|---|"]
            lines += [f"| {name} | {statistics.median(v) * 1e3:.1f} |" for name, v in times.items()]
            pairs = [("saliency / ORT forward", "onnxcam saliency", "ORT forward", "<= 2.5"),
                     ("Integrated Gradients / Captum's", "onnxcam Integrated Gradients, 32 steps",
                      "Captum IntegratedGradients, 32 steps", "<= 0.5"),
                     ("SmoothGrad / Captum's", "onnxcam SmoothGrad, 16 samples",
                      "Captum NoiseTunnel smoothgrad, 16 samples", "<= 0.5")]  # fmt: skip
            lines += ["", "| ratio | measured | target | two forwards a row |", "|---|---|---|---|"]
            lines += [f"| {what} | {ratio(times, ours, theirs)} | {target} | {bound(times, ours, theirs)} |"
                      for what, ours, theirs, target in pairs]  # fmt: skip
            lines += [f"| Grad-CAM call, a file with --pixels / without | "
                      f"{ratio(times, 'onnxcam Grad-CAM, this file', 'onnxcam Grad-CAM, a file without --pixels')} "
                      "| | |", ""]  # fmt: skip
            if WEIGHTS[arch_name] != "none":
                lines += [completeness(path, photo, top), ""]
            print("\n".join(lines), flush=True)
            if arch_name == "vgg16":
                rss = peak_rss(path, photo, top, folder)
                lines += [f"Peak RSS of a fresh process running the 32-step Integrated Gradients on VGG16 "
                          f"({pixels.CHUNK} rows a call): {rss / 1e9:.2f} GB (target <= 3 GB).", ""]  # fmt: skip
            print("\n".join(lines), flush=True)
    write_section("pixels", "\n".join(lines))


if __name__ == "__main__":
    main()
