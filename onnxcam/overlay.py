"""Pictures of a map: a colour map (JET by default), the blend over the photo, and side-by-side sheets (all RGB).

Everything is uint8 and as few copies as OpenCV allows: a 9000 x 9000 photo stays within a
few hundred MB per step.
"""

from __future__ import annotations

import cv2
import numpy as np

HEAT_WEIGHT = 0.4  # the classic recipe: 0.4 heat map + 0.6 photo
# OpenCV's colour maps by the name `--colormap` takes: JET, as pytorch-grad-cam and the Grad-CAM paper draw, and the
# perceptually uniform ones (viridis and its family; turbo, JET's smooth successor) that read in greyscale and to
# most colour-blind eyes
COLORMAPS = {
    "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO, "magma": cv2.COLORMAP_MAGMA, "plasma": cv2.COLORMAP_PLASMA,
    "cividis": cv2.COLORMAP_CIVIDIS, "hot": cv2.COLORMAP_HOT, "bone": cv2.COLORMAP_BONE,
}  # fmt: skip


def heatmap_rgb(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """A [0, 1] map in the colours of ``colormap`` (:data:`COLORMAPS`), as uint8 RGB (OpenCV's come out BGR)."""
    if cam.ndim != 2:
        raise ValueError(f"need a 2-D map, got shape {cam.shape}")
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colour map {colormap!r}; one of {', '.join(COLORMAPS)}")
    scaled = cv2.convertScaleAbs(cam, alpha=255)  # round(|255 cam|), saturated to uint8
    heat = cv2.applyColorMap(scaled, COLORMAPS[colormap])
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB, dst=heat)


def overlay_rgb(photo_rgb: np.ndarray, cam: np.ndarray, alpha: float = HEAT_WEIGHT, colormap: str = "jet"
                ) -> np.ndarray:  # fmt: skip
    """``round(alpha * heat + (1 - alpha) * photo)``, uint8 RGB of the photo's size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if cam.shape != photo_rgb.shape[:2]:
        raise ValueError(f"map {cam.shape} and photo {photo_rgb.shape[:2]} differ in size")
    heat = heatmap_rgb(cam, colormap)
    return cv2.addWeighted(heat, alpha, photo_rgb, 1 - alpha, 0, dst=heat)


# a diverging colour map for signed attributions (blue where the evidence lowers the score, white at zero, red where
# it raises it: matplotlib's "bwr", as Captum's visualize_image_attr draws sign "all"), as a 256-entry RGB table
DIVERGING = np.stack([np.clip(np.interp(np.arange(256), [0, 127.5, 255], ends), 0, 255)
                      for ends in ([0, 255, 255], [0, 255, 0], [255, 255, 0])], axis=1).astype(np.uint8)  # fmt: skip


def signed_overlay_rgb(photo_rgb: np.ndarray, signed: np.ndarray, percentile: float = 99.0,
                       alpha: float = 0.6) -> np.ndarray:  # fmt: skip
    """A signed map ``[H, W]`` (the photo's size) in :data:`DIVERGING` colours over the photo in grey: scaled by the
    ``percentile`` of its magnitudes to [-1, 1] (zero white), blended ``alpha`` heat + ``1 - alpha`` photo."""
    if signed.shape != photo_rgb.shape[:2]:
        raise ValueError(f"map {signed.shape} and photo {photo_rgb.shape[:2]} differ in size")
    top = float(np.percentile(np.abs(signed), percentile)) or float(np.abs(signed).max()) or 1.0
    levels = np.rint(127.5 * (1 + np.clip(signed / top, -1, 1))).astype(np.uint8)
    grey = cv2.cvtColor(cv2.cvtColor(photo_rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(DIVERGING[levels], alpha, grey, 1 - alpha, 0)


BOX_RGB = (255, 255, 255)  # white with a black outline reads on any heat map


def draw_box(image_rgb: np.ndarray, box: tuple[float, float, float, float], label: str) -> np.ndarray:
    """Draw a detection's box (x1, y1, x2, y2 in pixels) and its label on ``image_rgb``, in place; the label lies
    whole inside the picture (:func:`label_place`)."""
    x1, y1, x2, y2 = (round(v) for v in box)
    side = max(image_rgb.shape[:2])
    thick = max(1, round(side / 400))
    text, origin, scale = label_place(label, (x1, y1), image_rgb.shape[:2], thick + 1)
    for colour, width in (((0, 0, 0), thick + 1), (BOX_RGB, thick)):
        cv2.rectangle(image_rgb, (x1, y1), (x2, y2), colour, width, cv2.LINE_AA)
        cv2.putText(image_rgb, text, origin, LABEL_FONT, scale, colour, width, cv2.LINE_AA)
    return image_rgb


def draw_mask(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """Tint an instance's mask (bool ``[H, W]``) in the box colour by ``alpha`` and outline it, on ``image_rgb``, in
    place."""
    tint = image_rgb[mask].astype(np.float32) * (1 - alpha) + np.asarray(BOX_RGB, np.float32) * alpha
    image_rgb[mask] = np.clip(np.rint(tint), 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image_rgb, contours, -1, BOX_RGB, max(1, round(max(image_rgb.shape[:2]) / 600)), cv2.LINE_AA)
    return image_rgb


LABEL_FONT = cv2.FONT_HERSHEY_SIMPLEX


def label_extent(text: str, origin: tuple[int, int], scale: float, width: int) -> tuple[int, int, int, int]:
    """The pixels ``cv2.putText`` covers (x0, y0, x1, y1, exclusive ends) for ``text`` at ``origin`` (its
    baseline's left end) with stroke ``width``."""
    (w, h), baseline = cv2.getTextSize(text, LABEL_FONT, scale, width)
    x, y = origin
    return x - width, y - h - width, x + w + width, y + baseline + width


def label_place(label: str, corner: tuple[int, int], size: tuple[int, int], width: int) -> tuple[str, tuple, float]:
    """``(text, origin, scale)`` for a box's label above its top-left ``corner`` (or just inside the box where the
    top has no room) so that it lies whole in a picture of ``size`` (height, width): smaller type on small
    pictures, then the label cut short with ``..`` where even that is too wide."""
    height, wide = size
    scale = min(1.0, max(0.3, max(size) / 800))
    text = label

    def fits(text: str, scale: float) -> bool:
        x0, _, x1, _ = label_extent(text, (0, 0), scale, width)
        return x1 - x0 <= wide

    while not fits(text, scale) and scale > 0.25:
        scale = round(scale - 0.05, 2)
    while not fits(text, scale) and len(text) > 2:
        text = text[: max(0, len(text) - 3)].rstrip() + ".."
    x0, top, x1, bottom = label_extent(text, (0, 0), scale, width)
    x = min(max(corner[0] + 1, -x0), wide - x1)
    y = corner[1] - 3 if corner[1] - 3 + top >= 0 else corner[1] + 3 - top  # above the box, else inside it
    y = min(max(y, -top), height - bottom)
    return text, (int(x), int(y)), scale


SHEET_HEIGHT = 240


def thumbnail(image: np.ndarray, height: int = SHEET_HEIGHT) -> np.ndarray:
    """``image`` scaled to ``height`` pixels tall (area interpolation), aspect kept."""
    if image.shape[0] == height:
        return image
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def comparison_sheet(tiles: list[tuple[str, np.ndarray]], height: int = SHEET_HEIGHT) -> np.ndarray:
    """A row of equally tall RGB images, each captioned with its name (e.g. one overlay per method)."""
    row = []
    for name, image in tiles:
        tile = thumbnail(image, height)
        width = tile.shape[1]
        tile = np.vstack([np.full((28, width, 3), 255, np.uint8), tile])
        cv2.putText(tile, name, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        row += [tile, np.full((height + 28, 4, 3), 255, np.uint8)]
    return np.hstack(row[:-1])


def panel(photo_rgb: np.ndarray, cam: np.ndarray, blended: np.ndarray, caption: str, method: str,
          colormap: str = "jet") -> np.ndarray:  # fmt: skip
    """Photo | heat map | overlay (``blended``, from :func:`overlay_rgb`) side by side, for slides."""
    height = min(480, photo_rgb.shape[0])
    heat = heatmap_rgb(thumbnail(cam, height), colormap)  # colour the small map: no full-size copy
    tiles = [("photo", photo_rgb), (f"{method} heat map", heat), (caption, blended)]
    return comparison_sheet(tiles, height=height)
