"""Synthetic scenes from the bundled photos: calibration sets for `onnxcam quantize`, test sets for INT8 drift.

    python scripts/scenes.py OUT [--count 50] [--seed 0]

Each scene pastes a random crop of the cat or the coffee photo (scaled 40-100%, maybe
mirrored, brightness and contrast changed) at a random place on a background of smooth
colour gradients and noise, 320x320 PNG. Different seeds give different scenes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("chelsea.png", "coffee.png")
SIDE = 320


def scene(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """One BGR scene."""
    ys, xs = (np.mgrid[0:SIDE, 0:SIDE] / SIDE)[..., None]
    corners = rng.uniform(0, 255, (4, 3))  # a bilinear blend of four corner colours
    background = (corners[0] * (1 - ys) * (1 - xs) + corners[1] * (1 - ys) * xs
                  + corners[2] * ys * (1 - xs) + corners[3] * ys * xs)  # fmt: skip
    background += rng.normal(0, rng.uniform(2, 20), background.shape)
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    scale = rng.uniform(0.4, 1.0) * SIDE / max(ch, cw)
    crop = cv2.resize(crop, (max(1, int(cw * scale)), max(1, int(ch * scale))), interpolation=cv2.INTER_AREA)
    crop = crop.astype(np.float64) * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25)
    top, left = rng.integers(0, SIDE - crop.shape[0] + 1), rng.integers(0, SIDE - crop.shape[1] + 1)
    background[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return np.clip(background, 0, 255).astype(np.uint8)


def write_scenes(out: Path, count: int, seed: int) -> list[Path]:
    """``count`` scenes as ``out/scene_000.png``, ... (reproducible from ``seed``)."""
    rng = np.random.default_rng(seed)
    photos = [cv2.imread(str(ROOT / "examples" / name)) for name in PHOTOS]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(out / f"scene_{i:03d}.png")
        cv2.imwrite(str(paths[-1]), scene(rng, photos))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_scenes(args.out, args.count, args.seed)
    print(f"wrote {len(paths)} scenes to {args.out}/")


if __name__ == "__main__":
    main()
