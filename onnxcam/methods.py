"""The CAM family on one ORT call's activations ``A [C, h, w]`` and gradients ``G [T, C, h, w]``.

Each method only says how it weights the channels: it returns the per-channel
contributions ``W [T, C, h, w]`` whose channel sum, after a ReLU, is the map
(``L = ReLU(sum_k W_k)``), as in pytorch-grad-cam's ``BaseCAM``. With ``eigen_smooth``
the channel sum is replaced by the first principal component of ``W``, and the
Eigen-CAM variants always use it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EPS = 1e-7  # pytorch-grad-cam's guard against division by zero


def gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., ICCV 2017): ``alpha_k = mean_hw(G_k)``, ``W_k = alpha_k A_k``."""
    return g.mean(axis=(2, 3), keepdims=True) * a


def gradcam_plus_plus(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018), second/third-order terms by the exponential trick.

    ``a_ij = G^2 / (2 G^2 + sum_hw(A) G^3)`` (zero where ``G = 0``),
    ``alpha_k = sum_hw(a_ij ReLU(G))``, ``W_k = alpha_k A_k``.
    """
    g2 = g * g
    g3 = g2 * g  # products, not ** (numpy pow is ~10x slower)
    denominator = 2 * g2 + a.sum(axis=(1, 2))[None, :, None, None] * g3 + EPS
    aij = np.where(g != 0, g2 / denominator, 0)
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


Method = Callable[[np.ndarray, np.ndarray], np.ndarray]
METHODS: dict[str, Method] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "gradcam-elementwise": gradcam_elementwise,
    "layercam": layercam,
    "eigencam": eigencam,
    "eigengradcam": eigengradcam,
}
ALWAYS_EIGEN = {"eigencam", "eigengradcam"}
NEEDS_GRADIENTS = set(METHODS) - {"gradcam", "eigencam"}  # gradcam uses the graph's cheap weights


def cam(
    method: str,
    activations: np.ndarray,
    gradients: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    eigen_smooth: bool = False,
) -> np.ndarray:
    """Low-resolution maps ``[T, h, w]`` (>= 0, unnormalised).

    ``activations`` is ``[C, h, w]``; ``gradients`` ``[T, C, h, w]``; ``weights`` ``[T, C]``, the
    graph's Grad-CAM channel weights, are enough for ``gradcam`` and ``eigencam``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    activations = activations.astype(np.float64)  # float64: gradient powers underflow to slow denormals in float32
    if gradients is not None and gradients.size:
        weighted = METHODS[method](activations, gradients.astype(np.float64))
    elif weights is not None and method in ("gradcam", "eigencam"):
        weighted = METHODS[method](activations, weights[:, :, None, None].astype(np.float64))
    else:
        raise ValueError(f"{method} needs the full gradients (run with full_gradients=True)")
    if eigen_smooth or method in ALWAYS_EIGEN:
        maps = np.stack([first_component(w) for w in weighted])
    else:
        maps = weighted.sum(axis=1)
    return np.maximum(maps, 0)
