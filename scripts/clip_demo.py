"""The image-text demonstration: a small CLIP-style model trained here, explained by the words of a prompt.

Scenes of 64x64 hold one or two of four objects (a red circle, a blue square, a green triangle, a yellow cross) on
a noisy background. Two towers, a CNN for the image and a bag of words for the caption, learn in about a minute
on two cores that ``logit_scale * cos(image, text)`` is high for a caption naming an object in the scene (the
softmax over the four objects' captions, each in a random template, against the scene's objects). The model is
exported as optimum exports a CLIP model (one ONNX file taking ``input_ids`` and ``pixel_values``, with
``logits_per_image``, ``text_embeds`` and ``image_embeds`` out; ``tokenizer.json`` and ``preprocessor_config.json``
beside it), ready for ``onnxcam export --from``. ``--measure`` then explains held-out scenes of two objects with
the grafted file: whether each present object's prompt has its map's peak inside that object's box (the pointing
game), whether a prompt for an absent object scores below the present ones, and, for pairs of scenes that share one
object, how much of the ``--like`` map lies on the shared object against its share of the area.

    python scripts/clip_demo.py OUT_DIR              # trains, exports clip.onnx and the test scenes
    python scripts/clip_demo.py --measure OUT_DIR    # after onnxcam export --from OUT_DIR/clip.onnx
    python scripts/clip_demo.py --figure OUT_DIR docs/clip.png   # the README's picture
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np

SIZE = 64
OBJECTS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "cross")]
RGB = {"red": (220, 40, 40), "blue": (40, 70, 230), "green": (40, 190, 60), "yellow": (230, 210, 40)}
TEMPLATES = ["a {}", "a photo of a {}", "{}", "there is a {}", "a picture with a {}"]
WORDS = ["[PAD]", "[UNK]", "a", "photo", "of", "there", "is", "picture", "with", *RGB, *(s for _, s in OBJECTS)]
LENGTH = 8  # the text tower's context (CLIP's is 77), padded with [PAD] = 0
MEAN = STD = 0.5  # the image tower's normalisation, as preprocessor_config.json says
MODEL = "clip.cam.onnx"  # what the README's export writes in OUT_DIR


def prompt(k: int, template: str = "a {}") -> str:
    colour, shape = OBJECTS[k]
    return template.format(f"{colour} {shape}")


def draw_object(image: np.ndarray, k: int, cx: int, cy: int, r: int, rng: np.random.Generator) -> None:
    colour = tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in RGB[OBJECTS[k][0]])
    shape = OBJECTS[k][1]
    if shape == "circle":
        cv2.circle(image, (cx, cy), r, colour, -1)
    elif shape == "square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    elif shape == "triangle":
        cv2.fillPoly(image, [np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)], colour)
    else:
        t = max(2, r // 3)
        cv2.rectangle(image, (cx - r, cy - t), (cx + r, cy + t), colour, -1)
        cv2.rectangle(image, (cx - t, cy - r), (cx + t, cy + r), colour, -1)


def scene(objects: list[int], rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
    """A uint8 RGB scene of ``objects`` (indices of OBJECTS), apart from each other, and their boxes (x0, y0, x1,
    y1 inclusive)."""
    image = np.empty((SIZE, SIZE, 3), np.float32)
    image[:] = rng.uniform(60, 160, 3)
    image += rng.normal(0, 14, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    boxes: list[list[int]] = []
    for k in objects:
        for _ in range(100):
            r = int(rng.integers(7, 11))
            cx, cy = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, 2))
            if all(cx + r + 3 < x0 or cx - r - 3 > x1 or cy + r + 3 < y0 or cy - r - 3 > y1
                   for x0, y0, x1, y1 in boxes):  # fmt: skip
                break
        draw_object(image, k, cx, cy, r, rng)
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    return image, boxes


def random_scene(rng: np.random.Generator, count: int | None = None) -> tuple[np.ndarray, list[int], list]:
    objects = [int(k) for k in rng.permutation(len(OBJECTS))[: count or int(rng.integers(1, 3))]]
    image, boxes = scene(objects, rng)
    return image, objects, boxes


def write_tokenizer(path: Path) -> None:
    """The towers' Hugging Face tokenizer.json: lower case, words, padded to LENGTH with [PAD] (id 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=LENGTH)
    tokenizer.save(str(path))


def build(out: Path, steps: int = 350, seed: int = 0) -> None:
    """Train the two towers, export them as one file beside its tokenizer and preprocessing, write test scenes."""
    import torch
    from tokenizers import Tokenizer
    from torch import nn

    class Clip(nn.Module):
        """Image: conv-BN-ReLU-pool x2, conv-BN-ReLU (the 16x16 target layer), mean, projection to 32. Text: word
        embeddings averaged over the non-padding tokens, a projection to 32. As CLIP: both normalised, the
        logits ``exp(t) * cos``."""

        def __init__(self) -> None:
            super().__init__()
            block = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                     nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                     nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]  # fmt: skip
            self.features, self.visual = nn.Sequential(*block), nn.Linear(64, 32)
            self.words, self.textual = nn.Embedding(len(WORDS), 32), nn.Linear(32, 32)
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10))))

        def image(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.visual(self.features(pixels).mean((2, 3)))

        def text(self, ids: torch.Tensor) -> torch.Tensor:
            mask = (ids != 0).unsqueeze(2).float()
            return self.textual((self.words(ids) * mask).sum(1) / mask.sum(1).clamp(min=1))

        def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            image = nn.functional.normalize(self.image(pixel_values), dim=-1)
            text = nn.functional.normalize(self.text(input_ids), dim=-1)
            per_image = self.logit_scale.exp() * image @ text.T
            return per_image, per_image.T, text, image

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Clip()
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(steps):
        drawn = [random_scene(rng) for _ in range(48)]
        pixels = pixel_values(np.stack([d[0] for d in drawn]))
        captions = [prompt(k, TEMPLATES[int(rng.integers(len(TEMPLATES)))]) for k in range(len(OBJECTS))]
        ids = torch.tensor([e.ids for e in tokenizer.encode_batch(captions)])
        present = torch.zeros(len(drawn), len(OBJECTS))
        for n, (_, objects, _) in enumerate(drawn):
            present[n, objects] = 1 / len(objects)
        logits = model(ids, pixels)[0]  # [48, 4]: each scene against the four captions
        loss = -(present * torch.log_softmax(logits, 1)).sum(1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, LENGTH, dtype=torch.long), torch.zeros(1, 3, SIZE, SIZE)),
                          out / "clip.onnx", input_names=["input_ids", "pixel_values"],
                          output_names=["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"],
                          dynamic_axes={"input_ids": {0: "T"}, "pixel_values": {0: "N"}}, opset_version=17,
                          dynamo=False)  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
        "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [MEAN] * 3, "image_std": [STD] * 3,
        "resample": 3}, indent=1))  # fmt: skip
    write_scenes(out)


def pixel_values(images: np.ndarray) -> object:
    import torch

    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def write_scenes(out: Path, count: int = 50, seed: int = 1000) -> None:
    """Held-out scenes of two objects (the first: a red circle and a blue square, the README's), their objects
    and boxes in ``truth.json``."""
    folder = out / "scenes"
    folder.mkdir(exist_ok=True)
    truth = {}
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        objects = [0, 1] if i == 0 else [int(k) for k in rng.permutation(len(OBJECTS))[:2]]
        image, boxes = scene(objects, rng)
        path = folder / f"scene{i:02d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        truth[path.name] = {"objects": objects, "boxes": boxes}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))


def inside(peak: tuple[int, int], box: list[int], slack: int = 1) -> bool:
    x, y = peak
    return box[0] - slack <= x <= box[2] + slack and box[1] - slack <= y <= box[3] + slack


def measure(out: Path) -> None:
    """Pointing for each present object's prompt, absent prompts against present ones, --like on shared objects."""
    from onnxcam.api import Explainer

    explainer = Explainer(out / MODEL)
    truth = json.loads((out / "truth.json").read_text())
    prompts = [prompt(k) for k in range(len(OBJECTS))]
    hits = total = apart = below = 0
    for name, fact in truth.items():
        result = explainer.explain(out / "scenes" / name, prompts=prompts)
        maps = {m.index: m for m in result.maps}
        for k, box in zip(fact["objects"], fact["boxes"], strict=True):
            total += 1
            hits += inside(maps[k].peak, box)
        first, second = (maps[k].cam.ravel() for k in fact["objects"])
        apart += float(np.corrcoef(first, second)[0, 1]) < 0.5
        absent = [k for k in range(len(OBJECTS)) if k not in fact["objects"]]
        below += max(maps[k].logit for k in absent) < min(maps[k].logit for k in fact["objects"])
    print(f"pointing: {hits} of {total} present objects' prompt maps peak inside the object ({hits / total:.0%})")
    print(f"apart: {apart} of {len(truth)} scenes' two prompt maps differ (Pearson r below 0.5)")
    print(f"absent: {below} of {len(truth)} scenes score every absent object's prompt below the present ones")
    ratios = likeness(explainer, out, truth)
    good = sum(r >= 2 for r in ratios)
    print(f"like: {good} of {len(ratios)} pairs put at least twice the shared object's area share of the map on it "
          f"(median {np.median(ratios):.1f}x)")  # fmt: skip


def likeness(explainer: object, out: Path, truth: dict) -> list[float]:
    """For pairs of scenes that share one object: the share of scene a's ``--like b`` map inside the shared object's
    box, over the box's share of the scene."""
    names = list(truth)
    ratios = []
    for i, a in enumerate(names):
        shared = [(b, k) for b in names[i + 1 :] for k in truth[a]["objects"] if k in truth[b]["objects"]
                  and len(set(truth[a]["objects"]) & set(truth[b]["objects"])) == 1]  # fmt: skip
        if not shared:
            continue
        b, k = shared[0]
        result = explainer.explain(out / "scenes" / a, like=[out / "scenes" / b])
        x0, y0, x1, y1 = truth[a]["boxes"][truth[a]["objects"].index(k)]
        cam = result.maps[0].cam
        mass = cam[y0 : y1 + 1, x0 : x1 + 1].sum() / max(cam.sum(), 1e-12)
        ratios.append(float(mass / ((y1 - y0 + 1) * (x1 - x0 + 1) / cam.size)))
        if len(ratios) == 25:
            break
    return ratios


def figure(out: Path, picture: Path, zoom: int = 3) -> None:
    """The README's scene, then its maps for three prompts (two present objects, one absent), each captioned with
    its probability."""
    from onnxcam import overlay
    from onnxcam.api import Explainer

    prompts = [prompt(0), prompt(1), prompt(2)]
    result = Explainer(out / MODEL).explain(out / "scenes" / "scene00.png", prompts=prompts)
    tiles = [result.image_rgb] + [overlay.overlay_rgb(result.image_rgb, m.cam, 0.5) for m in result.maps]
    big = [cv2.resize(t, (SIZE * zoom, SIZE * zoom), interpolation=cv2.INTER_NEAREST) for t in tiles]
    captions = ["the scene"] + [f"{m.label}: {m.probability:.0%}" for m in result.maps]
    framed = []
    for tile, caption in zip(big, captions, strict=True):
        band = np.full((22, tile.shape[1], 3), 255, np.uint8)
        cv2.putText(band, caption, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        framed.append(np.pad(np.vstack([tile, band]), ((2, 2), (2, 2), (0, 0)), constant_values=255))
    cv2.imwrite(str(picture), cv2.cvtColor(np.hstack(framed), cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--figure"]:
        figure(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["--measure"]:
        measure(Path(sys.argv[2]))
    else:
        build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("clip-demo"))
