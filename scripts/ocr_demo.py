"""The text-recognition demonstration: a CTC recogniser trained here, explained one character at a time.

Lines of 3 to 5 digits are drawn with OpenCV (random font scale, spacing, ink and paper, noise); a small
CRNN-style network (convolutions, a 1-D mix along the line, one softmax over the blank and the ten digits per
step, as PaddleOCR's CTC heads) learns them with torch's CTC loss in about 15 seconds on two cores. It is
exported plainly with torch.onnx, grafted with ``onnxcam export --from`` (the task told from its per-step
softmax) and explained on fresh lines: the graph decodes the text, and each character's map is measured by
whether its peak lies on that character's columns (the pointing game, per character).

    python scripts/ocr_demo.py OUT_DIR      # writes the models, test lines and their character boxes
    python scripts/ocr_demo.py --figure OUT_DIR docs/ocr.png   # the README's picture: each character's map
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

from onnxcam_export.from_onnx import Preprocessing, graft_file

SIZE = (32, 128)  # a text line: 32 rows, 128 columns; 32 steps of 4 columns
DIGITS = "0123456789"  # symbols 1..10; symbol 0 is the blank
FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_line(rng: np.random.Generator) -> tuple[np.ndarray, str, list[tuple[int, int]]]:
    """A uint8 RGB line of 3 to 5 digits, its text and each digit's columns (x0, x1), inclusive."""
    height, width = SIZE
    image = np.full((height, width, 3), int(rng.integers(150, 256)), np.uint8)
    scale, ink, x = float(rng.uniform(0.7, 0.9)), int(rng.integers(0, 80)), int(rng.integers(2, 20))
    text, columns = "", []
    for char in rng.choice(list(DIGITS), int(rng.integers(3, 6))):
        (w, _), _ = cv2.getTextSize(char, FONT, scale, 2)
        if x + w > width - 2:
            break
        cv2.putText(image, char, (x, 24), FONT, scale, (ink, ink, ink), 2, cv2.LINE_AA)
        text, columns = text + char, [*columns, (x, x + w)]
        x += w + int(rng.integers(1, 8))
    noisy = image.astype(np.int64) + rng.integers(-20, 21, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), text, columns


class Recogniser(nn.Module):
    """Features at stride 4 x 8 kept 4 rows high, averaged over the rows, mixed along the line and normalised
    (as SVTR's neck), one score per symbol and step; the export adds the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, (2, 1), 1), nn.ReLU())  # fmt: skip
        self.mix = nn.Conv1d(32, 32, 3, 1, 1)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, len(DIGITS) + 1)
        self.softmax = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.norm(torch.relu(self.mix(self.features(x).mean(2))).transpose(1, 2))  # [N, 32, 32]
        scores = self.fc(steps)
        return torch.softmax(scores, -1) if self.softmax else scores


def batch(lines: list[tuple[np.ndarray, str, list]]) -> torch.Tensor:
    return torch.from_numpy(np.stack([line[0] for line in lines]) / 255.0).float().permute(0, 3, 1, 2)


def train(steps: int = 800, seed: int = 0) -> Recogniser:
    """Adam on batches of 32 fresh lines, CTC loss (blank 0)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, ctc = Recogniser(), nn.CTCLoss(blank=0, zero_infinity=True)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        lines = [draw_line(rng) for _ in range(32)]
        log_probs = torch.log_softmax(model(batch(lines)), -1).transpose(0, 1)  # [T, N, K]
        targets = torch.tensor([DIGITS.index(c) + 1 for line in lines for c in line[1]])
        lengths = torch.tensor([len(line[1]) for line in lines])
        loss = ctc(log_probs, targets, torch.full((len(lines),), log_probs.shape[0], dtype=torch.long), lengths)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def test_lines(count: int = 50, seed: int = 1000) -> list[tuple[np.ndarray, str, list[tuple[int, int]]]]:
    """Lines the training never drew (their own seeds)."""
    return [draw_line(np.random.default_rng(seed + i)) for i in range(count)]


def build(out: Path) -> Path:
    """Train, export with its softmax and graft; write test lines and their character columns. Returns the
    grafted model's path."""
    out.mkdir(parents=True, exist_ok=True)
    model = train()
    model.softmax = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, *SIZE),), out / "digits.onnx", input_names=["x"],
                          output_names=["probs"], dynamic_axes={"x": {0: "N"}}, opset_version=17,
                          dynamo=False)  # fmt: skip
    (out / "digits.txt").write_text("".join(f"{d}\n" for d in DIGITS))  # PaddleOCR's way: the blank left out
    graft_file(out / "digits.onnx", out / "digits.cam.onnx", labels=out / "digits.txt",
               prep=Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False))  # fmt: skip
    lines = out / "lines"
    lines.mkdir(exist_ok=True)
    truth = {}
    for i, (image, text, columns) in enumerate(test_lines()):
        path = lines / f"line{i:02d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        truth[str(path)] = {"text": text, "columns": columns}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return out / "digits.cam.onnx"


def pointing(model: Path, truth: dict, method: str | None = None) -> tuple[int, int, int]:
    """(lines read right, their characters, characters whose map peaks on their own columns, 2 pixels of
    slack) for ``method`` (None: the recogniser's default)."""
    from onnxcam.api import Explainer

    explainer = Explainer(model)
    right = characters = hits = 0
    for path, fact in truth.items():
        result = explainer.explain(path, method=method)
        if result.text != fact["text"]:
            continue
        right += 1
        for m, (x0, x1) in zip(result.maps, fact["columns"], strict=True):
            characters += 1
            hits += x0 - 2 <= m.peak[0] <= x1 + 2
    return right, characters, hits


def figure(out: Path, picture: Path, lines: int = 3, zoom: int = 2) -> None:
    """Each of the first ``lines`` test lines beside its characters' maps (the recogniser's default method), one
    row per line: the photo, then one overlay per character."""
    from onnxcam import overlay
    from onnxcam.api import Explainer

    explainer, rows = Explainer(out / "digits.cam.onnx"), []
    for path in list(json.loads((out / "truth.json").read_text()))[:lines]:
        result = explainer.explain(path)
        tiles = [result.image_rgb] + [overlay.overlay_rgb(result.image_rgb, m.cam, 0.5) for m in result.maps]
        tiles += [np.full_like(result.image_rgb, 255)] * (6 - len(tiles))  # (lines of 3 to 5 characters)
        rows.append(np.hstack([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles]))
    sheet = np.vstack(rows)
    sheet = cv2.resize(sheet, (sheet.shape[1] * zoom, sheet.shape[0] * zoom), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(picture), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def main(out: Path) -> None:
    model = build(out)
    truth = json.loads((out / "truth.json").read_text())
    for method in ("hirescam", "gradcam"):
        right, characters, hits = pointing(model, truth, method)
        print(f"{method}: {right} of {len(truth)} lines read right; {hits} of {characters} characters' maps peak "
              f"on the character ({hits / max(characters, 1):.0%})")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--figure"]:
        figure(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("ocr-demo"))
