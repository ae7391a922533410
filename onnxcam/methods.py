"""The CAM methods: one registry record each, on one ORT call's activations ``A [C, h, w]``
and gradients ``G [T, C, h, w]``.

Each method only says how it weights the channels: it returns the per-channel
contributions ``W [T, C, h, w]`` whose channel sum, after a ReLU, is the map
(``L = ReLU(sum_k W_k)``), as in pytorch-grad-cam's ``BaseCAM``. With ``eigen_smooth``
the channel sum is replaced by the first principal component of ``W``, and the
Eigen-CAM variants always use it. Score-CAM and Ablation-CAM get their channel weights
from extra model passes (:mod:`onnxcam.passes`), and ReciproCAM its whole map, gradient-free.
Attention rollout and attention relevance read a vision transformer's attention probabilities
``A [L, H, T, T]`` (and their gradients ``dA [T', L, H, T, T]``) from the same call instead, and give the
relevance of the grid tokens. The pixel methods read a file with its backward to the input (``export --pixels``):
the model's float input ``x [C, H, W]`` and the scores' gradients there ``dS/dx [T, C, H, W]`` (or Guided
Backpropagation's), from the same call, and give maps at the input's resolution; Integrated Gradients and SmoothGrad
read many inputs' gradients, as rows of extra calls (:mod:`onnxcam.pixels`).

Adding a method: its function here, one :class:`Method` record in :data:`METHODS`, one row
in the tests' formula table (``tests/test_methods.py``) and in the README's methods table.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxcam import contract, passes, pixels
from onnxcam.engine import Engine
from onnxcam.errors import OnnxcamError
from onnxcam.maps import upsample

# the pixel methods' maps are clipped at this percentile before scaling: a few pixels hold most of the mass (the
# usual visualisations do the same: PAIR's saliency library clips at the 99th, Captum's visualize_image_attr at 98th)
PIXEL_PERCENTILE = 99.0
EPS = 1e-7  # XGrad-CAM's guard for a channel whose activations sum to zero (pytorch-grad-cam's value)


def gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., ICCV 2017): ``alpha_k = mean_hw(G_k)``, ``W_k = alpha_k A_k``."""
    return g.mean(axis=(2, 3), keepdims=True) * a


def gradcam_plus_plus(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018), second/third-order terms by the exponential trick.

    ``a_ij = G^2 / (2 G^2 + sum_hw(A) G^3)``, zero where that denominator is zero (which
    includes ``G = 0``); ``alpha_k = sum_hw(a_ij ReLU(G))``, ``W_k = alpha_k A_k``.
    The division is exact: pytorch-grad-cam adds 1e-6 to the denominator, which dominates it
    when gradients are small (below ~1e-3, as in randomly initialised networks) and makes its
    maps depend on the gradients' scale; here scaling ``G`` by ``s`` and ``A`` by ``1/s``
    gives the same map.
    """
    g2 = g * g
    g3 = g2 * g  # products, not ** (numpy pow is ~10x slower)
    denominator = 2 * g2 + a.sum(axis=(1, 2))[None, :, None, None] * g3
    aij = np.divide(g2, denominator, out=np.zeros_like(g2), where=denominator != 0)
    alpha = (aij * np.maximum(g, 0)).sum(axis=(2, 3), keepdims=True)
    return alpha * a


def xgradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """XGrad-CAM (Fu et al., BMVC 2020): ``alpha_k = sum_hw(G_k A_k) / (sum_hw(A_k) + eps)``."""
    alpha = (g * a).sum(axis=(2, 3), keepdims=True) / (a.sum(axis=(1, 2))[None, :, None, None] + EPS)
    return alpha * a


def hirescam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """HiResCAM (Draelos & Carin, 2020): ``W_k = G_k (.) A_k``, so ``L = ReLU(sum_k G_k A_k)``."""
    return g * a


def gradcam_elementwise(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): ``W_k = ReLU(G_k (.) A_k)``."""
    return np.maximum(g * a, 0)


def layercam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """LayerCAM (Jiang et al., IEEE TIP 2021): ``W_k = ReLU(G_k) (.) A_k``."""
    return np.maximum(g, 0) * a


def eigencam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): first principal component of ``A`` (class-agnostic)."""
    return np.broadcast_to(a, g.shape[:1] + a.shape)


def eigengradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Eigen-Grad-CAM (pytorch-grad-cam): first principal component of ``G (.) A``."""
    return g * a


def first_component(weighted: np.ndarray) -> np.ndarray:
    """Project ``[C, h, w]`` on its first principal component over positions -> ``[h, w]``.

    Positions are samples and channels features, centred per channel (pytorch-grad-cam's
    ``get_2d_projection``). The sign of a principal component is arbitrary, and after the
    centring the projection sums to zero, so its mass cannot pick the sign. It is fixed so
    that the component's channel loadings sum to a positive number: positions where the
    channels are above their means come out positive, and the ReLU keeps them.
    """
    c, h, w = weighted.shape
    samples = weighted.reshape(c, h * w).T.astype(np.float64)
    samples = samples - samples.mean(axis=0)
    # X v1 = s1 u1: the top eigenvector of the small [hw, hw] Gram matrix gives the projection
    values, vectors = np.linalg.eigh(samples @ samples.T)
    projection = vectors[:, -1] * np.sqrt(max(values[-1], 0.0))
    loadings = samples.T @ vectors[:, -1]  # proportional to v1
    return (projection if loadings.sum() >= 0 else -projection).reshape(h, w)


def saliency(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Saliency (Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks", ICLR workshop 2014): the
    largest ``|dS/dx_c|`` over the channels at each pixel, ``[T, H, W]``."""
    return np.abs(g).max(axis=1)


def guided_backprop(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Guided Backpropagation (Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR
    workshop 2015; Captum's GuidedBackprop): ``g`` is the gradient at the input through a backward whose ReLUs (and
    ReLU6s) pass only positive gradients where their input was positive; the map is its largest ``|g_c|`` over the
    channels, ``[T, H, W]``. It is close to an edge detector: Adebayo et al. ("Sanity Checks for Saliency Maps",
    NeurIPS 2018) find it barely changes when the model's weights are re-initialised, and it is hardly
    class-sensitive; Guided Grad-CAM multiplies in the class map for that."""
    return np.abs(g).max(axis=1)


def gradient_x_input(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Gradient x input (Shrikumar et al., "Not Just a Black Box", 2016; Captum's InputXGradient):
    ``sum_c x_c dS/dx_c`` at each pixel, ``[T, H, W]``, signed; the map shows its positive part (where the input
    raises the score)."""
    return (g * x[None]).sum(axis=1)


def channel_sum(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """An attribution's sum over the channels at each pixel, ``[T, H, W]``, signed."""
    return a.sum(axis=1)


def channel_max(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """An attribution's largest value over the channels at each pixel, ``[T, H, W]``."""
    return a.max(axis=1)


def integrated_gradients(engine: Engine, image: np.ndarray, classes: np.ndarray, settings: pixels.Settings,
                         references: np.ndarray | None = None) -> pixels.Attribution:  # fmt: skip
    """Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017; :func:`onnxcam.pixels.integrated_gradients`):
    the settings' baseline (black, blurred or an image), steps (32) and rule (Gauss-Legendre); the map is the
    channel sum, signed (its positive part where the evidence raises the score), with the completeness error."""
    return pixels.integrated_gradients(engine, image, classes, settings.baseline_of(image), settings.steps,
                                       settings.rule, settings.chunk, references)  # fmt: skip


def smoothgrad(engine: Engine, image: np.ndarray, classes: np.ndarray, settings: pixels.Settings,
               references: np.ndarray | None = None) -> pixels.Attribution:  # fmt: skip
    """SmoothGrad (Smilkov et al. 2017; :func:`onnxcam.pixels.smoothgrad`): the settings' samples (16), noise (15%
    of the input range) and seed; the map is the largest ``|mean gradient|`` over the channels."""
    return pixels.smoothgrad(engine, image, classes, settings.samples, settings.noise, settings.seed,
                             chunk=settings.chunk, references=references)  # fmt: skip


def smoothgrad_squared(engine: Engine, image: np.ndarray, classes: np.ndarray, settings: pixels.Settings,
                       references: np.ndarray | None = None) -> pixels.Attribution:  # fmt: skip
    """SmoothGrad-Squared (Hooker et al., NeurIPS 2019): the mean squared gradient over SmoothGrad's noisy inputs;
    the map is its largest value over the channels."""
    return pixels.smoothgrad(engine, image, classes, settings.samples, settings.noise, settings.seed, squared=True,
                             chunk=settings.chunk, references=references)  # fmt: skip


def _query(tokens: int, prefix: int) -> np.ndarray:
    """The row that reads a relevance matrix: the class token's (one-hot), or the mean row without one."""
    return np.eye(tokens)[0] if prefix else np.full(tokens, 1 / tokens)


def attention_rollout(attentions: np.ndarray, gradients: np.ndarray | None, prefix: int) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, ACL 2020): ``R = Â_L ... Â_1`` with ``Â_l = (mean_h A_l + I) / 2``;
    the relevance of each token is the class token's row of R, ``[1, T]`` (class-agnostic).

    Only that row is needed: ``e_0 Â_L ... Â_1``, vector times matrix from the last block down.
    """
    row = _query(attentions.shape[-1], prefix)
    for layer in attentions[::-1]:
        row = 0.5 * (row @ layer.mean(axis=0, dtype=np.float64)) + 0.5 * row
    return row[None]


def attention_relevance(attentions: np.ndarray, gradients: np.ndarray | None, prefix: int) -> np.ndarray:
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, "Generic Attention-model Explainability
    for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021), for self-attention:
    ``R = I``, then block by block ``R = R + mean_h(ReLU(dA_l (.) A_l)) @ R``; per target, the
    class token's row of R ``[T', T]``.

    That row is ``e_0 (I + Ā_L) ... (I + Ā_1)``, vector times matrix from the last block down.
    """
    rows = []
    for target in gradients:
        row = _query(attentions.shape[-1], prefix)
        for layer, grad in zip(attentions[::-1], target[::-1], strict=True):
            row = row + row @ np.maximum(grad * layer, 0).mean(axis=0, dtype=np.float64)
        rows.append(row)
    return np.stack(rows)


Contributions = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (A [C, h, w], G [T, C, h, w]) -> W
AttentionMap = Callable[[np.ndarray, np.ndarray | None, int], np.ndarray]  # (A, dA, prefix) -> [T' or 1, T]
PassWeights = Callable[[Engine, np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # -> [T, C]
SpatialMap = Callable[[Engine, np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # -> [T, h, w]
PixelMap = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x [C, H, W], dS/dx [T, C, H, W]) -> [T, H, W]
# (engine, image, targets, settings, a similarity model's references) -> the attribution [T, C, H, W]
Attribute = Callable[[Engine, np.ndarray, np.ndarray, pixels.Settings, np.ndarray | None], pixels.Attribution]


@dataclass(frozen=True)
class Method:
    """One CAM method: how it weighs the channels and what it needs from the model.

    ``uses`` is ``"weights"`` when the graph's cheap Grad-CAM channel weights are enough,
    ``"gradients"`` when it needs the full gradient tensor (one flag on the same ORT call),
    ``"passes"`` when ``passes`` computes its channel weights with extra batched model passes,
    ``"attentions"`` when ``attention`` makes the map from the graph's optional attention outputs
    (``requires``: the graph output the method cannot do without; a model lacking it cannot run it).
    ``"passes"`` when ``passes`` computes its channel weights with extra batched model passes.
    ``in_graph``: the exporter also builds the finished map into the graph (the ``saliency``
    output; its ONNX form is in ``onnxcam_export.saliency``), for hosts without Python.
    ``spatial``: the map itself from extra passes, no channel weighting (ReciproCAM).
    ``gradient_free``: it reads no gradient, so a file without a backward (an op without a rule) runs it.
    ``pixel``: the map at the input's resolution from the model's float input and the gradients there (``uses``
    ``"pixels"``), or the guided ones (``"guided"``), of a file exported with ``--pixels``; with ``contributions``
    too, that map times the CAM map of those at the target layer, upsampled bilinearly to the input (Guided
    Grad-CAM, Selvaraju et al.: guided backprop (.) Grad-CAM). ``attribute``: the attribution at the input
    ``[T, C, H, W]`` from many inputs' gradients (batched rows of one call each: Integrated Gradients, SmoothGrad),
    its map ``pixel`` of it.
    """

    name: str
    contributions: Contributions | None = None
    uses: str = "gradients"
    eigen: bool = False  # the map is the first principal component of the contributions
    passes: PassWeights | None = None
    attention: AttentionMap | None = None
    requires: str | None = None
    in_graph: bool = False
    spatial: SpatialMap | None = None
    gradient_free: bool = False
    pixel: PixelMap | None = None
    attribute: Attribute | None = None
    signed: bool = False  # its map before the ReLU has both signs (drawn in a diverging colour map too)
    settings: tuple[str, ...] = ()  # the fields of onnxcam.pixels.Settings it reads (flags of the same names)

    @property
    def extra_passes(self) -> bool:
        """Whether the method runs the model (or its head) again: a classifier's, of one target layer."""
        return self.passes is not None or self.spatial is not None or self.attribute is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gradcam", gradcam, uses="weights", in_graph=True),
        Method("gradcam++", gradcam_plus_plus, in_graph=True),
        Method("xgradcam", xgradcam, in_graph=True),
        Method("hirescam", hirescam, in_graph=True),
        Method("gradcam-elementwise", gradcam_elementwise, in_graph=True),
        Method("layercam", layercam, in_graph=True),
        Method("eigencam", eigencam, uses="weights", eigen=True, gradient_free=True),
        Method("eigengradcam", eigengradcam, eigen=True),
        Method("scorecam", gradcam, uses="passes", passes=passes.score_weights, gradient_free=True),
        Method("ablationcam", gradcam, uses="passes", passes=passes.ablation_weights, requires=contract.HEAD_LOGITS,
               gradient_free=True),
        Method("reciprocam", uses="passes", spatial=passes.reciprocam_maps, requires=contract.HEAD_LOGITS,
               gradient_free=True),
        Method("rollout", uses="attentions", attention=attention_rollout, requires=contract.ATTENTIONS),
        Method("attention-relevance", uses="attentions", attention=attention_relevance,
               requires=contract.ATTENTION_GRADIENTS),
        Method("saliency", uses="pixels", pixel=saliency, requires=contract.PIXEL_GRADIENTS),
        Method("gradient-x-input", uses="pixels", pixel=gradient_x_input, requires=contract.PIXEL_GRADIENTS,
               signed=True),
        Method("integrated-gradients", uses="passes", attribute=integrated_gradients, pixel=channel_sum,
               requires=contract.PIXEL_GRADIENTS, signed=True, settings=("steps", "rule", "baseline", "chunk")),
        Method("smoothgrad", uses="passes", attribute=smoothgrad, pixel=saliency, requires=contract.PIXEL_GRADIENTS,
               settings=("samples", "noise", "seed", "chunk")),
        Method("smoothgrad-squared", uses="passes", attribute=smoothgrad_squared, pixel=channel_max,
               requires=contract.PIXEL_GRADIENTS, settings=("samples", "noise", "seed", "chunk")),
        Method("guided-backprop", uses="guided", pixel=guided_backprop, requires=contract.GUIDED_GRADIENTS),
        Method("guided-gradcam", gradcam, uses="guided", pixel=guided_backprop, requires=contract.GUIDED_GRADIENTS),
    )
}  # fmt: skip


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9+]", "", name.lower())


# each task's method where none is asked for, where it is not gradcam: a recogniser's characters share the
# channels that draw text, so Grad-CAM's weights (the gradient averaged over the whole line) light every
# character for each; HiResCAM keeps where the gradient is (tests/test_recognition.py measures both)
DEFAULT_METHODS = {"recognition": "hirescam"}
# what a file without a backward (an op with no rule) computes in its graph, and explains with by default
GRADIENT_FREE_IN_GRAPH = ("reciprocam",)


def resolve(
    names: str | list[str] | tuple[str, ...] | None, outputs: frozenset[str] | None = None,
    task: str = "classification", gradients: bool = True,
) -> list[str]:  # fmt: skip
    """Canonical method names from user text: any case, with or without dashes; ``all`` is every method; none
    (None, or an empty list) is the task's default (:data:`DEFAULT_METHODS`, else gradcam; without
    ``gradients``, a file whose backward could not be built: :data:`GRADIENT_FREE_IN_GRAPH`'s).

    ``outputs``: the model's graph outputs, where known, and its card's ``task``: ``all`` is then every
    method the model can run, and a method it cannot run is an OnnxcamError (the methods with extra
    passes need a classifier's logits).
    """
    given = [names] if isinstance(names, str) else list(names or [])
    if not given:
        return [DEFAULT_METHODS.get(task, "gradcam") if gradients else GRADIENT_FREE_IN_GRAPH[0]]
    if [_key(n) for n in given] == ["all"]:
        return [n for n, m in METHODS.items() if (outputs is None or m.requires in {None, *outputs})
                and _runs_on(m, task) and (gradients or m.gradient_free)]  # fmt: skip
    by_key = {_key(n): n for n in METHODS}
    unknown = [n for n in given if _key(n) not in by_key]
    if unknown:
        close = difflib.get_close_matches(_key(unknown[0]), by_key, n=2) if unknown else []
        hint = f"; did you mean {' or '.join(by_key[c] for c in close)}?" if close else ""
        raise OnnxcamError(f"unknown method {unknown[0]!r}{hint} "
                           f"(choose from: {', '.join(METHODS)}, or all)")  # fmt: skip
    chosen = [by_key[_key(n)] for n in given]
    for name in chosen:
        if not gradients and not METHODS[name].gradient_free:
            free = ", ".join(n for n, m in METHODS.items() if m.gradient_free)
            raise OnnxcamError(f"{name} reads gradients, which this file does not carry (its backward could not be "
                               f"built at export: `onnxcam info` says why); choose a gradient-free method: {free}")
        if not _runs_on(METHODS[name], task):
            what = ("targets that stay the same score along its path (a class, a box, an output, a reference)"
                    if METHODS[name].attribute else "extra passes through a classifier's head")
            raise OnnxcamError(f"{name} needs {what}; this is a {task} model: choose a gradient method (gradcam, "
                               "hirescam, ...) or eigencam")  # fmt: skip
        if outputs is not None and METHODS[name].requires not in {None, *outputs}:
            raise OnnxcamError(f"{name} needs the model output {METHODS[name].requires!r}, which this model lacks "
                               f"({REQUIREMENTS[METHODS[name].requires]}); choose another --method")  # fmt: skip
    return chosen


def _runs_on(m: Method, task: str) -> bool:
    """Whether method ``m`` runs on a model of ``task``: the head passes on classifiers; the many-input pixel
    methods where each target stays the same score along the path (a class, a box, an output, a reference), not
    a segmenter's (its predicted pixels move) or a recogniser's (its characters do)."""
    if m.attribute is not None:
        return task in ("classification", "detection", "regression", "similarity")
    return task == "classification" or not m.extra_passes


REQUIREMENTS = {  # why a model lacks an optional output
    contract.HEAD_LOGITS: "its head is not a cut of the graph, or needs tokens the activations lack",
    contract.ATTENTIONS: "only vision transformers grafted at a token layer have attention maps",
    contract.ATTENTION_GRADIENTS: "only vision transformers grafted at a token layer have attention maps",
    contract.PIXEL_GRADIENTS: "it was exported without its backward to the input: export it again with --pixels",
    contract.GUIDED_GRADIENTS: "it was exported without its guided backward to the input: export it again with "
                               "--pixels",
}


def attention_outputs(names: list[str]) -> tuple[str, ...]:
    """The optional attention outputs these methods read from the graph."""
    needed = {METHODS[n].requires for n in names if METHODS[n].uses == "attentions"}
    if contract.ATTENTION_GRADIENTS in needed:
        return contract.ATTENTIONS, contract.ATTENTION_GRADIENTS
    return (contract.ATTENTIONS,) if needed else ()


def in_graph(gradients: bool = True) -> list[str]:
    """The methods whose finished map the exporter builds into the graph, in ``saliency_method`` order (without
    ``gradients``: a file whose backward could not be built)."""
    return [name for name, m in METHODS.items() if m.in_graph] if gradients else list(GRADIENT_FREE_IN_GRAPH)


def needs_gradients(names: list[str]) -> bool:
    """Whether any of these methods needs the full gradient tensor from the graph."""
    return any(METHODS[n].uses == "gradients" for n in names)


def pixel_flags(names: list[str]) -> dict[str, bool]:
    """Whether these methods need the gradients at the model's input (``pixels``) and the guided ones there
    (``guided``): :meth:`onnxcam.engine.Engine.run`'s arguments."""
    return {flag: any(METHODS[n].uses == flag for n in names) for flag in ("pixels", "guided")}


def cam(
    method: str,
    activations: np.ndarray,
    gradients: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    eigen_smooth: bool = False,
    attentions: np.ndarray | None = None,
    attention_gradients: np.ndarray | None = None,
    pixels: np.ndarray | None = None,
    pixel_gradients: np.ndarray | None = None,
    guided_gradients: np.ndarray | None = None,
) -> np.ndarray:
    """Low-resolution maps ``[T, h, w]`` (>= 0, unnormalised) from the graph's outputs for one image.

    ``activations`` is ``[C, h, w]``; ``gradients`` ``[T, C, h, w]``; ``weights`` ``[T, C]``: the
    graph's Grad-CAM channel weights, or the channel weights of a method's extra passes;
    ``attentions`` ``[L, H, P + h*w, P + h*w]`` and ``attention_gradients`` ``[T, L, H, ...]``; ``pixels``
    ``[C, H, W]``, ``pixel_gradients`` and ``guided_gradients`` ``[T, C, H, W]`` (a pixel method's maps are
    ``[T, H, W]``).
    """
    m = METHODS[method]
    if m.pixel is not None:
        return np.maximum(at_input(method, activations, weights, pixels, pixel_gradients, guided_gradients), 0)
    if m.attention is not None:
        return _attention_maps(m, activations.shape[1:], len(weights), attentions, attention_gradients)
    activations = activations.astype(np.float64)  # float64: gradient powers underflow to slow denormals in float32
    if m.contributions is gradcam and weights is not None and not (eigen_smooth or m.eigen):
        # sum_k alpha_k A_k as one matrix product: gradcam's sum without its [T, C, h, w] intermediate
        flat = weights.astype(np.float64) @ activations.reshape(len(activations), -1)
        return np.maximum(flat.reshape(len(weights), *activations.shape[1:]), 0)
    if m.uses != "gradients" and weights is not None:
        weighted = m.contributions(activations, weights[:, :, None, None].astype(np.float64))
    elif gradients is not None and gradients.size:
        weighted = m.contributions(activations, gradients.astype(np.float64))
    else:
        raise ValueError(f"{method} needs the full gradients (run with full_gradients=True)")
    maps = np.stack([first_component(w) for w in weighted]) if eigen_smooth or m.eigen else weighted.sum(axis=1)
    return np.maximum(maps, 0)


def at_input(
    method: str, activations: np.ndarray, weights: np.ndarray | None, pixels: np.ndarray | None,
    pixel_gradients: np.ndarray | None = None, guided_gradients: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """A one-call pixel method's map ``[T, H, W]`` at the model's input, before the ReLU (signed for gradient x
    input), from the call's ``pixels`` ``[C, H, W]`` and its gradients there ``[T, C, H, W]`` (plain or guided, as
    the method reads them). A method with an ``attribute`` maps its attribution with ``pixel`` itself."""
    m = METHODS[method]
    found = guided_gradients if m.uses == "guided" else pixel_gradients
    if found is None or not found.size:
        raise ValueError(f"{method} needs the gradients at the input (run with {m.uses}=True)")
    signed = m.pixel(pixels.astype(np.float64), found.astype(np.float64))
    if m.contributions is None:
        return signed
    channels = m.contributions(activations.astype(np.float64), weights[:, :, None, None].astype(np.float64))
    layer = np.maximum(channels.sum(axis=1), 0)  # [T, h, w]
    return signed * np.stack([upsample(c, signed.shape[1:]) for c in layer]).astype(np.float64)


def _attention_maps(
    m: Method, grid: tuple[int, ...], targets: int, attentions: np.ndarray | None, gradients: np.ndarray | None
) -> np.ndarray:
    """The grid tokens' relevance ``[T, h, w]``, the P prefix tokens dropped (P = tokens - h*w)."""
    if attentions is None or (m.requires == contract.ATTENTION_GRADIENTS and gradients is None):
        raise ValueError(f"{m.name} needs the attention outputs (run with attention={attention_outputs([m.name])})")
    prefix = attentions.shape[-1] - int(np.prod(grid))
    rows = m.attention(attentions, gradients, prefix)[:, prefix:]  # float64 sums, layer by layer
    return np.maximum(np.broadcast_to(rows.reshape(-1, *grid), (targets, *grid)), 0)
