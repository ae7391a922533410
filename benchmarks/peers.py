"""onnxcam against the tools users would otherwise pick, on the same weights and inputs.

    pip install torch==2.14.1 torchvision==0.29.1 -e '.[export,bench]'   # peers need torchvision
    python benchmarks/peers.py [--rounds 7] [--install-size]

Contenders, alternated in one process in a shuffled order each round (with a pause before
each, so that idle worker threads of one do not slow the next): a plain ONNX Runtime forward
of the same network (the lower bound), onnxcam's Python API (Grad-CAM for the top-1 and the
top-5 classes), pytorch-grad-cam's GradCAM (autograd through the whole network), Captum's
LayerGradCam (autograd from the target layer), and a plain PyTorch forward without
gradients. VGG16 (random weights: the cost does not depend on them) and EfficientNet-Lite0
(ImageNet), batch 1 and 8, 224x224. It also checks that the maps agree (Pearson correlation
with pytorch-grad-cam's 224x224 maps and with Captum's layer-resolution maps), times a whole
process explaining one image (`onnxcam explain` vs the equivalent pytorch-grad-cam script)
with its peak RSS, and with --install-size the size of a fresh venv with `pip install onnxcam`
against one with torch, torchvision and grad-cam. Results go to benchmarks/results.md.
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
import onnx
import onnxruntime as ort
import torch
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM

import onnxcam
from onnxcam import Explainer
from onnxcam_export.torch_export import ARCHS, Explainable, export_arch, export_forward

sys.path.insert(0, str(Path(__file__).parent))
from nets import WEIGHTS, normalised, photos, quiet_options, torch_model
from process import alternated, finished, write_section

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"vgg16": "features.29", "efficientnet_lite0": "_relu1"}
RUN_CLI = """import runpy, sys
sys.argv = ["onnxcam"] + sys.argv[1:]
try:
    runpy.run_module("onnxcam", run_name="__main__")
except SystemExit:
    pass
"""
VMHWM = 'print("peak_rss_kb", next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])'


def timings(arch_name: str, folder: Path, batch: int, rounds: int) -> dict[str, list[float]]:
    model = torch_model(arch_name)
    layer = dict(model.named_modules())[LAYERS[arch_name]]
    cam_path, fwd_path = folder / f"{arch_name}.onnx", folder / f"{arch_name}.fwd.onnx"
    if not cam_path.exists():
        export_arch(arch_name, WEIGHTS[arch_name], None, cam_path)
        forward, _ = export_forward(
            Explainable(model, layer, ARCHS[arch_name].mean, ARCHS[arch_name].std).eval(), (224, 224)
        )
        del forward.graph.output[1:]
        onnx.save(forward, fwd_path)
    explainer = Explainer(cam_path, session_options=quiet_options())
    session = ort.InferenceSession(str(fwd_path), quiet_options(), providers=["CPUExecutionProvider"])
    images = photos(batch)
    x = normalised(images, arch_name)
    grad_cam, captum = GradCAM(model=model, target_layers=[layer]), LayerGradCam(model, layer)

    def captum_run() -> None:
        with torch.no_grad():
            top = model(x).argmax(1)
        captum.attribute(x, target=top, relu_attributions=True)

    def torch_forward() -> None:
        with torch.no_grad():
            model(x)

    contenders = {
        "ORT forward": lambda: session.run(["logits"], {"image": images}),
        "onnxcam Grad-CAM, top-1": lambda: finished(explainer.explain_batch(list(images), top_k=1)),
        "onnxcam Grad-CAM, top-5": lambda: finished(explainer.explain_batch(list(images), top_k=5)),
        "pytorch-grad-cam GradCAM": lambda: grad_cam(input_tensor=x, targets=None),
        "Captum LayerGradCam": captum_run,
        "PyTorch forward (no grad)": torch_forward,
    }
    times = alternated(contenders, rounds)
    return times


def agreement(arch_name: str, folder: Path) -> dict[str, float]:
    """Pearson r of onnxcam's maps with pytorch-grad-cam's (224x224) and Captum's (layer grid)."""
    model = torch_model(arch_name)
    layer = dict(model.named_modules())[LAYERS[arch_name]]
    images = photos(2)
    x = normalised(images, arch_name)
    ours = Explainer(folder / f"{arch_name}.onnx").explain_batch(list(images), top_k=1)
    classes = [r.maps[0].index for r in ours]
    peer = GradCAM(model=model, target_layers=[layer])(input_tensor=x, targets=None)
    layer_maps = LayerGradCam(model, layer).attribute(x, target=torch.tensor(classes), relu_attributions=True)
    with torch.no_grad():
        assert model(x).argmax(1).tolist() == classes, "both explain the same top-1 class"
    r = lambda a, b: float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])  # noqa: E731
    return {
        "pytorch-grad-cam, 224x224": min(r(o.maps[0].cam, p) for o, p in zip(ours, peer, strict=True)),
        "Captum, layer grid": min(
            r(o.maps[0].cam_lowres, c[0].detach().numpy()) for o, c in zip(ours, layer_maps, strict=True)
        ),
    }


PEER_SCRIPT = """
import sys, cv2, numpy as np, torch, torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
model = torchvision.models.vgg16()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.eval()
rgb = cv2.cvtColor(cv2.imread(sys.argv[2]), cv2.COLOR_BGR2RGB)
small = cv2.resize(rgb, (224, 224)).astype(np.float32) / 255
x = torch.from_numpy(((small - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)).float()[None]
cam = GradCAM(model=model, target_layers=[model.features[29]])(input_tensor=x, targets=None)[0]
cam = cv2.resize(cam, (rgb.shape[1], rgb.shape[0]))
cv2.imwrite(sys.argv[3], cv2.cvtColor(show_cam_on_image(rgb.astype(np.float32) / 255, cam), cv2.COLOR_RGB2BGR))
"""


def cold_start(folder: Path, runs: int = 3) -> dict[str, tuple[float, float]]:
    """Median seconds and peak RSS (MB) of a whole process explaining one photo with VGG16."""
    checkpoint = folder / "vgg16.pth"
    torch.save(torch_model("vgg16").state_dict(), checkpoint)
    photo = str(ROOT / "examples" / "chelsea.png")
    commands = {
        "onnxcam explain": ["-c", RUN_CLI + VMHWM, "explain", photo, "--model", str(folder / "vgg16.onnx"),
                            "--out", str(folder / "cold"), "--quiet"],
        "pytorch-grad-cam script": ["-c", PEER_SCRIPT + VMHWM, str(checkpoint), photo, str(folder / "peer.png")],
    }  # fmt: skip
    results = {}
    for name, args in commands.items():
        seconds, rss = [], []
        for _ in range(runs):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
            seconds.append(time.perf_counter() - start)
            rss.append(int(next(x.split()[1] for x in done.stdout.splitlines() if x.startswith("peak_rss_kb"))) / 1024)
        results[name] = (statistics.median(seconds), max(rss))
    return results


def cold_start_section(runs: int) -> None:
    """The whole-process comparison alone, as its own section of results.md ("cold")."""
    with tempfile.TemporaryDirectory() as tmp:
        export_arch("vgg16", "none", None, Path(tmp) / "vgg16.onnx")
        cold = cold_start(Path(tmp), runs)
    base = cold["pytorch-grad-cam script"][0]
    lines = ["## One image, whole process (VGG16)", "",
             f"`python benchmarks/peers.py --cold-start-only --runs {runs}`, {time.strftime('%Y-%m-%d')}, "
             f"onnxruntime {ort.__version__}, torch {torch.__version__}; median of {runs} fresh processes.", "",
             "| command | median s | ratio to pytorch-grad-cam | peak RSS MB |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {s:.2f} | {s / base:.2f} | {rss:.0f} |" for name, (s, rss) in cold.items()]
    write_section("cold", "\n".join(lines))
    print("\n".join(lines))


def install_sizes(folder: Path) -> dict[str, float]:
    """MB of site-packages in a fresh venv for each stack."""
    stacks = {
        "pip install onnxcam": [str(ROOT)],
        "torch + torchvision + grad-cam": ["torch==2.14.1", "torchvision==0.29.1", "grad-cam"],
    }
    sizes = {}
    for name, packages in stacks.items():
        venv = folder / f"venv-{len(sizes)}"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *packages], check=True)
        site = next(venv.glob("lib/python*/site-packages"))
        sizes[name] = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per command for --cold-start-only")
    parser.add_argument("--install-size", action="store_true")
    parser.add_argument("--cold-start-only", action="store_true", help="only the whole-process table (VGG16)")
    args = parser.parse_args()
    if args.cold_start_only:
        cold_start_section(args.runs)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = [
        "# onnxcam against pytorch-grad-cam and Captum",
        "",
        f"`python benchmarks/peers.py --rounds {args.rounds}{' --install-size' if args.install_size else ''}`, "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {torch.get_num_threads()} threads; "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, onnxcam {onnxcam.__version__}. "
        "Median of the rounds; ratios to the ORT forward are per round, as median (min-max).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch_name in ("vgg16", "efficientnet_lite0"):
            for batch in (1, 8):
                times = timings(arch_name, folder, batch, args.rounds)
                base = times["ORT forward"]
                lines += [f"## {arch_name}, batch {batch}, 224x224", "",
                          "| contender | median ms | ratio to ORT forward |", "|---|---|---|"]  # fmt: skip
                for name, values in times.items():
                    ratios = [v / b for v, b in zip(values, base, strict=True)]
                    spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                    lines.append(f"| {name} | {statistics.median(values) * 1e3:.1f} | {spread} |")
                lines.append("")
                print("\n".join(lines[-len(times) - 4 :]), flush=True)
            lines += [f"Map agreement ({arch_name}, two photos, lowest Pearson r): "
                      + ", ".join(f"{k}: {v:.5f}" for k, v in agreement(arch_name, folder).items()), ""]  # fmt: skip
            print(lines[-2], flush=True)
        cold = cold_start(folder)
        lines += ["## One image, whole process (VGG16)", "", "| command | median s | peak RSS MB |", "|---|---|---|"]
        lines += [f"| {name} | {s:.2f} | {rss:.0f} |" for name, (s, rss) in cold.items()] + [""]
        if args.install_size:
            sizes = install_sizes(folder)
            lines += ["## Installed size (fresh venv, site-packages)", "", "| stack | MB |", "|---|---|"]
            lines += [f"| {name} | {mb:.0f} |" for name, mb in sizes.items()] + [""]
    write_section("peers", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
