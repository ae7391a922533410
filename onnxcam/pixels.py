"""Pixel attributions from a file with its backward to the input (``export --pixels``), several inputs per call.

The file runs each batch row on ``baseline + alpha * (x - baseline) + noise`` (its ``pixel_alphas``,
``pixel_baselines`` and ``pixel_noise`` inputs, in the model's normalised input space ``x``) and returns the scores'
gradients there, so Integrated Gradients' interpolation steps and SmoothGrad's noisy copies of one photo are rows
of one batch: ``chunk`` rows per ONNX Runtime call bound the memory (each row holds one forward's activations and
one backward per target).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from onnxcam.engine import Engine

RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")  # Captum's
STEPS = 32  # Integrated Gradients' default steps (Captum's is 50); see COMPLETE
# Sundararajan et al.: "between 20 and 300 steps are enough to approximate the integral (within 5%)". Lite0 on the
# bundled cat from black is at the steep end: 42% at 32 steps, 4.3% at 64, 1.8% at 128, 0.83% at 256
COMPLETE = 0.05
SAMPLES, NOISE = 16, 0.15  # SmoothGrad's samples and noise level (Smilkov et al.: 10% to 20% of the input range)
CHUNK = 4  # rows per call: a VGG16 row at 224 x 224 holds about 330 MB (its forward and backward; 4: 2.0 GB peak)
BASELINES = ("black", "blur")  # Integrated Gradients' named baselines (else an image file)
BLUR = 20  # the blurred baseline's Gaussian: sigma = the input's shorter side / BLUR (Sturmfels et al. 2020)


def quadrature(steps: int, rule: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, step sizes) of an integral over [0, 1], as Captum's ``approximation_methods`` gives them."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    if rule not in RULES or steps < 2:
        raise ValueError(f"rule must be one of {RULES} with 2 or more steps, got {rule!r}, {steps}")
    sizes = np.full(steps, 1 / steps)
    kind = rule.removeprefix("riemann_")
    if kind == "trapezoid":
        sizes[[0, -1]] /= 2
        return np.linspace(0, 1, steps), sizes
    start = {"left": 0.0, "middle": 1 / (2 * steps), "right": 1 / steps}[kind]
    return np.linspace(start, start + 1 - 1 / steps, steps), sizes


@dataclass(frozen=True)
class Settings:
    """How the many-input methods run: Integrated Gradients' ``steps``, ``rule`` (one of :data:`RULES`) and
    ``baseline`` (``"black"``, ``"blur"``: the photo blurred, or an image: a file or uint8 RGB, which
    :meth:`onnxcam.api.Explainer.request` makes the model's input as a photo), SmoothGrad's
    ``samples``, ``noise`` (the standard deviation as a fraction of the input's range) and ``seed``, and the rows per
    call (``chunk``)."""

    steps: int = STEPS
    rule: str = "gausslegendre"
    baseline: str | Path | np.ndarray = "black"
    samples: int = SAMPLES
    noise: float = NOISE
    seed: int = 0
    chunk: int = CHUNK

    def problem(self) -> str | None:
        """What is wrong with these settings, in words, or None."""
        if self.rule not in RULES:
            return f"the Integrated Gradients rule must be one of {', '.join(RULES)}, got {self.rule!r}"
        least = 1 if self.rule == "gausslegendre" else 2
        if self.steps < least:
            return f"--steps must be at least {least} for {self.rule}, got {self.steps}"
        if isinstance(self.baseline, str | Path) and str(self.baseline) not in BASELINES:
            return f"--baseline must be black, blur or an image file, got {self.baseline!r}"
        if self.samples < 1 or not 0 <= self.noise < 10:
            return f"--samples must be >= 1 and --noise in [0, 10), got {self.samples} and {self.noise}"
        if self.chunk < 1:
            return f"--chunk must be at least 1 row per call, got {self.chunk}"
        return None

    def baseline_of(self, image: np.ndarray) -> np.ndarray:
        """The baseline image (uint8 RGB at the model's size) for ``image``."""
        if not isinstance(self.baseline, str | Path):
            return self.baseline
        if self.baseline == "blur":
            return cv2.GaussianBlur(image, (0, 0), min(image.shape[:2]) / BLUR)
        return np.zeros_like(image)


@dataclass(frozen=True)
class Attribution:
    """One photo's attribution per target ``[T, C, H, W]`` (the model's input space, channels as it takes them),
    and for Integrated Gradients its completeness error per target,
    ``|sum(attribution) - (f(x) - f(baseline))| / |f(x) - f(baseline)|``."""

    values: np.ndarray
    completeness: np.ndarray | None = None


def completeness_text(error: float) -> str:
    """How a completeness error is shown: ``"2.31%"``, or with the advice to raise ``--steps`` above
    :data:`COMPLETE`."""
    return f"{error:.2%}" + (f", above {COMPLETE:.0%}: raise --steps" if error > COMPLETE else "")


def _rows(
    engine: Engine, image: np.ndarray, classes: np.ndarray, alphas: np.ndarray, baselines: np.ndarray,
    noise: np.ndarray, chunk: int, references: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """The gradients ``[S, T, C, H, W]`` of ``len(alphas)`` rows of one image, ``chunk`` rows a call
    (``references``: a similarity model's, which its targets compare with)."""
    gradients = []
    for start in range(0, len(alphas), chunk):
        part = slice(start, start + chunk)
        count = len(alphas[part])
        noisy = noise[part] if len(noise) > 1 else noise
        out = engine.run(np.repeat(image[None], count, 0), np.tile(classes, (count, 1)), pixels=True,
                         steering=(alphas[part], baselines, noisy), references=references)  # fmt: skip
        gradients.append(out.pixel_gradients.astype(np.float64))
    return np.concatenate(gradients)


def model_input(engine: Engine, image: np.ndarray) -> np.ndarray:
    """The model's normalised input ``[C, H, W]`` of a uint8 RGB image at its size (the file's own preprocessing)."""
    engine.require_pixels()
    return engine.run(image[None], np.zeros((1, 1), np.int64)).pixels[0].astype(np.float64)


def integrated_gradients(
    engine: Engine, image: np.ndarray, classes: np.ndarray, baseline: np.ndarray | None = None, steps: int = STEPS,
    rule: str = "gausslegendre", chunk: int = CHUNK, references: np.ndarray | None = None,
) -> Attribution:  # fmt: skip
    """Integrated Gradients (Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017):
    ``(x - x') * sum_s w_s dS/dx (x' + a_s (x - x'))`` over ``steps`` points of ``rule`` (Captum's, the same
    alphas and weights), ``x'`` the baseline image's input (uint8 RGB; default black) for targets ``classes`` (a
    classifier's classes; a detector's boxes as flat indices class * A + anchor, fixed along the path; a similarity
    model's references, given as ``references``)."""
    baseline = np.zeros_like(image) if baseline is None else baseline
    engine.require_pixels()  # (the path's two ends in one forward call: their inputs x, x' and scores f(x), f(x'))
    out = engine.run(np.stack([image, baseline]), np.tile(classes, (2, 1)), references=references)
    (x, reference), ends = out.pixels.astype(np.float64), out.logits.astype(np.float64)
    alphas, sizes = quadrature(steps, rule)
    none = np.zeros((1, *x.shape), np.float32)
    gradients = _rows(engine, image, classes, alphas, reference[None], none, chunk, references)
    values = np.tensordot(sizes, gradients, axes=1) * (x - reference)[None]  # [T, C, H, W]
    if engine.card.score == "probability":  # (the explained score: the softmax of the logits)
        ends = np.exp(ends - ends.max(axis=1, keepdims=True))
        ends /= ends.sum(axis=1, keepdims=True)
    ends = ends.reshape(2, -1)  # (a detector's [K, A] scores flat: its targets are class * A + anchor)
    change = ends[0, classes] - ends[1, classes]
    error = np.abs(values.reshape(len(classes), -1).sum(1) - change) / np.maximum(np.abs(change), 1e-12)
    return Attribution(values, error)


def smoothgrad(engine: Engine, image: np.ndarray, classes: np.ndarray, samples: int = SAMPLES, noise: float = NOISE,
               seed: int = 0, squared: bool = False, chunk: int = CHUNK,
               references: np.ndarray | None = None) -> Attribution:  # fmt: skip
    """SmoothGrad (Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017): the mean gradient (with
    ``squared``, the mean squared gradient: SmoothGrad-Squared, Hooker et al. 2019) over ``samples`` copies of the
    input with Gaussian noise of standard deviation ``noise`` times the input's range (max - min), seeded."""
    x = model_input(engine, image)
    draws = _noise(x, samples, noise, seed)
    gradients = _rows(engine, image, classes, np.ones(samples), np.zeros((1, *x.shape)), draws, chunk, references)
    return Attribution((gradients**2 if squared else gradients).mean(axis=0))


def noise_samples(engine: Engine, image: np.ndarray, samples: int = SAMPLES, noise: float = NOISE,
                  seed: int = 0) -> np.ndarray:  # fmt: skip
    """The noisy inputs ``[S, C, H, W]`` that :func:`smoothgrad` evaluates (to give another tool the same ones)."""
    x = model_input(engine, image)
    return x[None] + _noise(x, samples, noise, seed)


def _noise(x: np.ndarray, samples: int, noise: float, seed: int) -> np.ndarray:
    """``samples`` draws of Gaussian noise of standard deviation ``noise`` times the range of ``x``, seeded."""
    sigma = noise * float(x.max() - x.min())
    return np.random.default_rng(seed).normal(0.0, sigma, (samples, *x.shape)).astype(np.float32)
