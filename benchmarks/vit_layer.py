"""Which token layer explains a ViT best: deletion and insertion AUC of the maps, per candidate layer.

    python benchmarks/vit_layer.py [--seeds 3]

For each seed, ``scripts/vit_demo.py`` trains its small ViT (a class token, 2 blocks) on synthetic
scenes; the file is grafted at each candidate layer and ``onnxcam eval``'s metrics (Petsiuk et
al. 2018: deletion, lower is better; insertion, higher is better; 32 steps) are averaged over its
30 test images, for Grad-CAM:

- ``auto``: what ``onnxcam export --from`` picks, the last layer that every path crosses and the
  class gradient reaches on its grid (the last block's input: after the last attention only the
  class token leads to the logits);
- ``norm1``: the last block's first LayerNorm, pytorch-grad-cam's advice for ViT (a partial
  derivative: the residual path bypasses it);
- ``output``: the last block's output (its grid gradient is exactly zero with a class-token head).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from onnxcam import Explainer
from onnxcam.evaluate import averages, evaluate
from onnxcam_export.from_onnx import Preprocessing, graft_file

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from vit_demo import build

LAYERS = {
    "auto": None,
    "norm1": "/blocks/blocks.1/norm1/LayerNormalization_output_0",
    "output": "/blocks/blocks.1/Add_1_output_0",
}


def measure(folder: Path, seed: int) -> dict[str, dict[str, float]]:
    build(folder, seed=seed)
    images = sorted((folder / "test").glob("*/*.png"))
    prep = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)
    results = {}
    for name, layer in LAYERS.items():
        out = folder / f"vit.{name}.cam.onnx"
        graft_file(folder / "vit.onnx", out, layer, folder / "labels.txt", prep)
        rows = list(evaluate(Explainer(out), images, None, "gradcam", 32, None, False))
        results[name] = averages(rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            runs.append(measure(Path(folder) / str(seed), seed))
            print(f"seed {seed}: " + "; ".join(
                f"{name} deletion {r['deletion_auc']:.3f} insertion {r['insertion_auc']:.3f}"
                for name, r in runs[-1].items()), flush=True)  # fmt: skip
    print("\n| layer | deletion AUC (lower is better) | insertion AUC (higher is better) |\n|---|---|---|")
    for name in LAYERS:
        deletion = statistics.mean(r[name]["deletion_auc"] for r in runs)
        insertion = statistics.mean(r[name]["insertion_auc"] for r in runs)
        print(f"| {name} | {deletion:.3f} | {insertion:.3f} |")


if __name__ == "__main__":
    main()
