"""What a detector and a segmenter see: small models trained in seconds, explained box by box and class by class.

Scenes of 64x64 pixels hold two grey shapes of distinct classes (circle, square, triangle) at
random places on a noisy background of random colour. The detector (stride-4 features, a class
and a box head, raw output ``[N, 4 + K, A]`` as ultralytics exports) and the segmenter (the same
features, per-pixel logits ``[N, 1 + K, H, W]`` upsampled as DeepLab does, class 0 the
background) are trained with torch for seconds and exported plainly with torch.onnx, as a user
has them; ``onnxcam export --from`` grafts them, and ``onnxcam explain`` gives one map per kept
detection, or per class, all from one ORT call per batch.

    python scripts/detect_demo.py OUT_DIR   # OUT_DIR: shapes_{detector,segmenter}.{plain.onnx,labels.txt}, scenes/
    python scripts/detect_demo.py --figure EXPLAIN_OUT docs/detect.png   # the README's picture, from explain's output
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from bias_demo import draw_shape  # the same shapes as the bias demo (scripts/ is on a script's path)
from torch import nn

SIZE, STRIDE = 64, 4
CLASSES = ["circle", "square", "triangle"]
GRID = SIZE // STRIDE
BOX_SIDE = 16.0  # the box head's unit: w, h = BOX_SIDE * exp(output)


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One RGB scene, its objects' boxes [2, 4] (x1, y1, x2, y2, inclusive pixels), classes [2] and the
    segmentation [64, 64] (0 the background, 1 + class on each object)."""
    segmentation = np.zeros((SIZE, SIZE), np.int64)
    image = np.empty((SIZE, SIZE, 3), np.float32)
    image[:] = rng.uniform(20, 180, 3)
    image += rng.normal(0, 18, image.shape)
    classes = rng.choice(len(CLASSES), 2, replace=False)
    boxes = []
    while len(boxes) < 2:
        radius = int(rng.integers(6, 10))
        cx, cy = (int(v) for v in rng.integers(radius + 1, SIZE - radius - 1, 2))
        box = np.array([cx - radius, cy - radius, cx + radius, cy + radius])
        if boxes and (np.minimum(box[2:], boxes[0][2:]) >= np.maximum(box[:2], boxes[0][:2]) - 2).all():
            continue  # the two objects must not touch
        mask = np.zeros((SIZE, SIZE), np.uint8)
        draw_shape(mask, int(classes[len(boxes)]), cx, cy, radius)
        image[mask == 1] = 200 + rng.normal(0, 10, (int(mask.sum()), 3))
        segmentation[mask == 1] = 1 + classes[len(boxes)]
        ys, xs = np.nonzero(mask)
        boxes.append(np.array([xs.min(), ys.min(), xs.max(), ys.max()]))
    return np.clip(image, 0, 255).astype(np.uint8), np.stack(boxes), classes, segmentation


class SmallDetector(nn.Module):
    """Features at stride 4 (the target layer after its ReLU, 16x16), then a class and a box head per cell:
    ``[N, 4 + K, A]`` with cx, cy, w, h in input pixels and sigmoid class scores (ultralytics' raw layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.cls = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, len(CLASSES), 1))
        self.box = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 4, 1))
        cells = (torch.arange(GRID, dtype=torch.float32) + 0.5) * STRIDE
        self.register_buffer("grid", torch.stack(torch.meshgrid(cells, cells, indexing="xy")).reshape(1, 2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.decode(x)[:2], 1)

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(boxes cx, cy, w, h [N, 4, A], class scores [N, K, A], class logits [N, K, A])."""
        features = self.features(x)
        box, logits = self.box(features).flatten(2), self.cls(features).flatten(2)
        xy = self.grid + torch.tanh(box[:, :2]) * 2 * STRIDE
        return torch.cat([xy, torch.exp(box[:, 2:]) * BOX_SIDE], 1), torch.sigmoid(logits), logits


def _targets(boxes: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor: its class target [K, A] (1 for the class of an object whose centre region holds the
    cell centre) and its box target [4, A] cx, cy, w, h (NaN where no object)."""
    cells = (np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="xy")).reshape(2, -1) + 0.5) * STRIDE
    cls, box = np.zeros((len(CLASSES), GRID * GRID), np.float32), np.full((4, GRID * GRID), np.nan, np.float32)
    for (x1, y1, x2, y2), c in zip(boxes, classes, strict=True):
        centre, half = np.array([x1 + x2 + 1, y1 + y2 + 1]) / 2, np.array([x2 - x1 + 1, y2 - y1 + 1]) / 2
        inside = (np.abs(cells - centre[:, None]) <= half[:, None] * 0.5).all(0)
        cls[c, inside] = 1
        box[:, inside] = np.concatenate([centre, 2 * half])[:, None]
    return cls, box


class SmallSegmenter(nn.Module):
    """The detector's features, a 3x3 and a 1x1 convolution to 1 + K logits per cell, upsampled bilinearly to
    the input (as DeepLab's head): ``[N, 1 + K, H, W]``, class 0 the background."""

    def __init__(self) -> None:
        super().__init__()
        self.features = SmallDetector().features
        self.classifier = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 1 + len(CLASSES), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.classifier(self.features(x)), size=(SIZE, SIZE), mode="bilinear")


def dataset(count: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Scenes [count, 64, 64, 3] RGB, boxes [count, 2, 4], classes [count, 2], segmentations [count, 64, 64]."""
    scenes = [scene(rng) for _ in range(count)]
    return tuple(np.stack(parts) for parts in zip(*scenes, strict=True))


def _fit(model: nn.Module, x: torch.Tensor, loss: Callable, epochs: int, seed: int) -> nn.Module:
    """Adam over shuffled batches of 32 scenes; ``loss(model, batch indices)``."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            optimiser.zero_grad()
            loss(model, batch).backward()
            optimiser.step()
    return model.eval()


def train(count: int = 900, epochs: int = 10, seed: int = 0) -> tuple[SmallDetector, SmallSegmenter]:
    """Both models trained on the same ``count`` scenes: the detector with BCE on the class scores and L1 on
    the boxes of the object cells, the segmenter with cross-entropy per pixel."""
    images, boxes, classes, segmentations = dataset(count, np.random.default_rng(seed))
    cls, box = (torch.from_numpy(np.stack(t)) for t in zip(*map(_targets, boxes, classes), strict=True))
    x, pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(segmentations)

    def detection_loss(model: SmallDetector, batch: torch.Tensor) -> torch.Tensor:
        xywh, _, logits = model.decode(x[batch])
        target, found = box[batch], ~torch.isnan(box[batch])
        bce = nn.functional.binary_cross_entropy_with_logits(logits, cls[batch])
        return bce + 0.05 * (xywh[found] - target[found]).abs().mean()

    def segmentation_loss(model: SmallSegmenter, batch: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x[batch]), pixels[batch])

    torch.set_num_threads(1)  # these small convolutions: 6x faster than 2 threads when another process shares the CPU
    torch.manual_seed(seed)
    detector, segmenter = SmallDetector(), SmallSegmenter()
    return _fit(detector, x, detection_loss, epochs, seed), _fit(segmenter, x, segmentation_loss, epochs, seed)


def export(model: nn.Module, folder: Path, name: str, labels: list[str]) -> Path:
    """Plain torch.onnx export (input: float RGB / 255, dynamic batch) and its class names, one per line."""
    plain = folder / f"{name}.plain.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), plain, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["out"], dynamic_axes={"x": {0: "N"}})  # fmt: skip
    (folder / f"{name}.labels.txt").write_text("\n".join(labels) + "\n")
    return plain


def build(folder: Path, test_count: int = 50, seed: int = 0) -> dict[str, object]:
    """Train and export both models, write ``test_count`` test scenes (RGB PNGs) and their true boxes."""
    (folder / "scenes").mkdir(parents=True, exist_ok=True)
    detector, segmenter = train(seed=seed)
    models = [export(detector, folder, "shapes_detector", CLASSES),
              export(segmenter, folder, "shapes_segmenter", ["background", *CLASSES])]  # fmt: skip
    images, boxes, classes, _ = dataset(test_count, np.random.default_rng(seed + 1))
    truth = {}
    for i, image in enumerate(images):
        path = folder / "scenes" / f"scene_{i:03d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        truth[path.name] = {"boxes": boxes[i].tolist(), "classes": [CLASSES[c] for c in classes[i]]}
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    return {"models": [str(m) for m in models], "scenes": str(folder / "scenes"), "truth": str(folder / "truth.json")}


def figure(explained: Path, out: Path, scenes: int = 3, method: str = "hirescam", zoom: int = 4) -> None:
    """Rows of (all boxes, the map of box 1, the map of box 2) for the first ``scenes`` scenes of an explain
    run, redrawn ``zoom`` times larger from its records and maps."""
    from onnxcam.overlay import comparison_sheet, draw_box, overlay_rgb

    by_stem: dict[str, list[dict]] = {}
    for line in (explained / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["target"]["method"] == method:
            by_stem.setdefault(record["stem"], []).append(record)
    side, rows = SIZE * zoom, []
    for records in list(by_stem.values())[:scenes]:
        records.sort(key=lambda r: r["target"]["rank"])
        photo = cv2.resize(cv2.imread(records[0]["path"])[:, :, ::-1], (side, side), interpolation=cv2.INTER_NEAREST)
        labelled = [(r, f"{r['target']['label']} {r['target']['probability']:.2f}") for r in records]
        boxes = photo.copy()
        for r, label in labelled:
            draw_box(boxes, [v * zoom for v in r["target"]["box"]], label)
        tiles = [("all boxes", boxes)]
        for r, label in labelled[:2]:
            cam = cv2.resize(np.load(explained.parent / r["map"]), (side, side), interpolation=cv2.INTER_LINEAR)
            box = [v * zoom for v in r["target"]["box"]]
            tiles.append((f"{method}: {label}", draw_box(overlay_rgb(photo, cam), box, label)))
        rows.append(comparison_sheet(tiles, height=side))
    width = max(r.shape[1] for r in rows)
    sheet = np.vstack([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    if sys.argv[1] == "--figure":
        figure(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        print(json.dumps(build(Path(sys.argv[1])), indent=1))
