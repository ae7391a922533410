"""The sanity check of Adebayo et al. ("Sanity Checks for Saliency Maps", NeurIPS 2018) on EfficientNet-Lite0.

    python benchmarks/sanity.py [--photo examples/chelsea.png]

Cascading randomisation: starting from the ImageNet weights, the layers are re-initialised from the top (the
classifier, then the head convolution, then the 16 blocks from the last, then the stem), cumulatively; after each
step the model is exported again with ``--pixels`` and every method explains the same photo for the trained
model's top class. Each map is compared with the trained model's by Spearman's rank correlation over the pixels
(maps at the photo's size, unclipped; a signed method's by its magnitude, as the paper does). A method whose maps
depend on what the model learned falls towards 0 as the layers go; the paper finds Guided Backpropagation and
Guided Grad-CAM barely change (they behave like edge detectors) while gradients and Grad-CAM do. Results go to
benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onnxcam import Explainer
from onnxcam.image import read_rgb
from onnxcam_export.torch_export import export_module

sys.path.insert(0, str(Path(__file__).parent))
from nets import ROOT, torch_model
from process import write_section

METHODS = ("gradcam", "saliency", "gradient-x-input", "integrated-gradients", "smoothgrad", "guided-backprop",
           "guided-gradcam")  # fmt: skip


def stages(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """Lite0's layers from the top, as the cascade re-initialises them: (name, modules)."""
    found = [("fc", [model._fc]), ("head conv", [model._conv_head, model._bn1])]
    found += [(f"block {i}", [blocks]) for i, blocks in reversed(list(enumerate(model._blocks)))]
    return [*found, ("stem", [model._conv_stem, model._bn0])]


def reinitialise(modules: list[torch.nn.Module], seed: int) -> None:
    """Each parameterised module's own default initialisation (batch norms to the identity), seeded."""
    torch.manual_seed(seed)
    for top in modules:
        for module in top.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 0 .. n-1 of ``values`` (ties broken by position: the maps here are continuous)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(rank(a.ravel()), rank(b.ravel()))[0, 1])


def explain(model: torch.nn.Module, folder: Path, name: str, photo: np.ndarray, target: int | None) -> dict:
    """Each method's map (magnitude, at the photo's size, unclipped) for ``target`` (None: the top class)."""
    path = folder / f"{name}.onnx"
    export_module(model, "efficientnet_lite0", name, None, path, pixels=True)
    explainer = Explainer(path)
    found = explainer.explain(photo, targets=[] if target is None else [target], top_k=1 if target is None else None,
                              method=list(METHODS), percentile=100)  # fmt: skip
    maps = {m.method: np.abs(m.signed) if m.signed is not None else m.cam for m in found.maps}
    return {"maps": maps, "class": found.maps[0].index, "label": found.maps[0].label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=ROOT / "examples" / "chelsea.png")
    args = parser.parse_args()
    photo = read_rgb(args.photo)
    model = torch_model("efficientnet_lite0")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trained = explain(model, folder, "trained", photo, None)
        for i, (name, modules) in enumerate(stages(model)):
            reinitialise(modules, seed=i)
            found = explain(model, folder, f"random-{i}", photo, trained["class"])
            rows.append((name, {m: spearman(trained["maps"][m], found["maps"][m]) for m in METHODS}))
            print(name, " ".join(f"{m}={v:.3f}" for m, v in rows[-1][1].items()), flush=True)
    lines = [
        "# The sanity check of Adebayo et al. on EfficientNet-Lite0",
        "",
        f"`python benchmarks/sanity.py`, {time.strftime('%Y-%m-%d')}: {args.photo.name}, class {trained['class']} "
        f"({trained['label']}); Spearman rank correlation of each method's map with the trained model's as the "
        "layers are re-initialised from the top, cumulatively (1: unchanged, 0: unrelated).",
        "",
        "| re-initialised down to | " + " | ".join(METHODS) + " |",
        "|---" * (len(METHODS) + 1) + "|",
    ]
    lines += [f"| {name} | " + " | ".join(f"{values[m]:.2f}" for m in METHODS) + " |" for name, values in rows]
    write_section("sanity", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
