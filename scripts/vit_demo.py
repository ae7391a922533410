"""A small vision transformer trained in seconds on synthetic scenes, exported plainly with torch.onnx.

Each scene is a red, green or blue disc or square on a noisy grey background, 64 x 64 pixels; the
class is the object's colour, so only the object tells it. The ViT (patch 8: an 8 x 8 grid and a
class token, 2 blocks) is trained with torch, then exported by torch.onnx as a user would (float
NCHW input in [0, 1], logits out, nothing of onnxcam), next to its labels, a few test images and
their object boxes.

    python scripts/vit_demo.py OUT_DIR      # writes OUT_DIR/vit.onnx, labels.txt, test/<class>/*.png, boxes.json
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from onnxcam_export.transformers import VisionTransformer

SIZE, PATCH = 64, 8
CLASSES = ["red", "green", "blue"]
COLOURS = [(190, 50, 50), (50, 170, 60), (60, 80, 200)]  # RGB


def scene(label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image and its object mask: a disc or a square of the class's colour on grey noise."""
    image = rng.normal(110, 25, (SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    radius = int(rng.integers(7, 11))
    cx, cy = (int(v) for v in rng.integers(radius + 1, SIZE - radius - 1, 2))
    if rng.random() < 0.5:
        cv2.circle(mask, (cx, cy), radius, 1, -1)
    else:
        cv2.rectangle(mask, (cx - radius, cy - radius), (cx + radius, cy + radius), 1, -1)
    image[mask == 1] = np.asarray(COLOURS[label]) + rng.normal(0, 12, (int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def dataset(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(CLASSES), count)
    images, masks = zip(*(scene(int(label), rng) for label in labels), strict=True)
    return np.stack(images), np.stack(masks), labels


def build_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer((SIZE, SIZE), PATCH, dim=32, depth=2, heads=2, classes=len(CLASSES))


def train(images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 8) -> VisionTransformer:
    model = build_vit(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels).long()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 2e-3, total_steps=epochs * -(-len(x) // 32))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(32):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def export_plain(model: nn.Module, path: Path) -> None:
    """torch.onnx as a user would call it: float NCHW input in [0, 1], dynamic batch."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["scores"], dynamic_axes={"x": {0: "N"}})  # fmt: skip


def build(folder: Path, train_count: int = 400, test_count: int = 30, seed: int = 0) -> dict[str, object]:
    """Train the ViT, export it, write the labels, the test images and their boxes; return the paths
    and the test accuracy in torch."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, _, labels = dataset(train_count, rng)
    model = train(images, labels, seed)
    export_plain(model, folder / "vit.onnx")
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    test_images, masks, test_labels = dataset(test_count, rng)
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    for label in CLASSES:
        (folder / "test" / label).mkdir(parents=True, exist_ok=True)
    boxes = {}
    for i, (image, mask, label) in enumerate(zip(test_images, masks, test_labels, strict=True)):
        path = folder / "test" / CLASSES[label] / f"{i:03d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        ys, xs = np.nonzero(mask)
        boxes[str(path)] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    (folder / "boxes.json").write_text(json.dumps(boxes, indent=1))
    accuracy = float((predicted == test_labels).mean())
    return {"model": str(folder / "vit.onnx"), "test": str(folder / "test"), "test_accuracy": accuracy}


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1])), indent=1))
