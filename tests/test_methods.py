"""Each CAM method against its formula computed another way (explicit loops), and facts on real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.errors import OnnxcamError
from onnxcam.methods import METHODS, cam, resolve
from tests.conftest import EXAMPLES

T, C, H, W = 2, 5, 4, 3
RNG = np.random.default_rng(42)
A = np.maximum(RNG.standard_normal((C, H, W)), 0)  # post-ReLU activations, with exact zeros
G = RNG.standard_normal((T, C, H, W))
G[0, 1, 0, 0] = 0.0  # Grad-CAM++ must give zero weight where the gradient is zero


def relu(x: float) -> float:
    return max(x, 0.0)


def loop_weighted(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The per-channel contributions W[t, k, i, j], one scalar at a time."""
    out = np.zeros(g.shape)
    for t in range(g.shape[0]):
        for k in range(a.shape[0]):
            cells = [(i, j) for i in range(a.shape[1]) for j in range(a.shape[2])]
            if method == "gradcam":
                alpha = sum(g[t, k, i, j] for i, j in cells) / len(cells)
            elif method == "gradcam++":
                total_a = sum(a[k, i, j] for i, j in cells)
                alpha = 0.0
                for i, j in cells:
                    gr = g[t, k, i, j]
                    denominator = 2 * gr**2 + total_a * gr**3
                    aij = gr**2 / denominator if denominator != 0 else 0.0
                    alpha += aij * relu(gr)
            elif method == "xgradcam":
                alpha = sum(g[t, k, i, j] * a[k, i, j] for i, j in cells) / (sum(a[k, i, j] for i, j in cells) + 1e-7)
            for i, j in cells:
                gr, ac = g[t, k, i, j], a[k, i, j]
                out[t, k, i, j] = (
                    {
                        "hirescam": gr * ac,
                        "eigengradcam": gr * ac,
                        "gradcam-elementwise": relu(gr * ac),
                        "layercam": relu(gr) * ac,
                        "eigencam": ac,
                    }.get(method, 0.0)
                    if method not in ("gradcam", "gradcam++", "xgradcam")
                    else alpha * ac
                )
    return out


def pca_projection(weighted: np.ndarray) -> np.ndarray:
    """First principal component by eigen-decomposition of the channel covariance (not SVD)."""
    c, h, w = weighted.shape
    x = weighted.reshape(c, h * w).T
    x = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(x.T @ x)
    v = vectors[:, np.argmax(values)]
    return (x @ (v if v.sum() >= 0 else -v)).reshape(h, w)


ONE_CALL = [name for name, m in METHODS.items()
            if m.contributions is not None and m.passes is None and m.pixel is None]  # A and G only
ATTENTION = [name for name, m in METHODS.items() if m.uses == "attentions"]


@pytest.mark.parametrize("method", ONE_CALL)
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_method_equals_its_formula_computed_with_loops(method: str, eigen_smooth: bool) -> None:
    weighted = loop_weighted(method, A, G)
    if eigen_smooth or method in ("eigencam", "eigengradcam"):
        expected = np.maximum(np.stack([pca_projection(w) for w in weighted]), 0)
    else:
        expected = np.maximum(weighted.sum(axis=1), 0)
    np.testing.assert_allclose(cam(method, A, G, eigen_smooth=eigen_smooth), expected, rtol=1e-9, atol=1e-12)


def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsampling one sample at a time: each output pixel centre mapped back to the input's coordinates
    ((i + 0.5) * h / height - 0.5), clamped at the border, between its four neighbours."""
    h, w = image.shape
    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            y = min(max((i + 0.5) * h / height - 0.5, 0.0), h - 1.0)
            x = min(max((j + 0.5) * w / width - 0.5, 0.0), w - 1.0)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * ((1 - dx) * image[y0, x0] + dx * image[y0, x1])
                         + dy * ((1 - dx) * image[y1, x0] + dx * image[y1, x1]))  # fmt: skip
    return out


def test_guided_gradcam_is_guided_backprop_times_the_upsampled_gradcam_map() -> None:
    """Selvaraju et al.: the guided gradient at the input (largest |g_c| over channels) times Grad-CAM's map
    ReLU(sum_k alpha_k A_k), upsampled bilinearly to the input, pixel by pixel."""
    x, guided = RNG.standard_normal((3, 12, 9)), RNG.standard_normal((T, 3, 12, 9))
    alphas = G.mean(axis=(2, 3))
    expected = np.zeros((T, 12, 9))
    for t in range(T):
        layer = np.maximum(sum(alphas[t, k] * A[k] for k in range(C)), 0)
        up = bilinear(layer, 12, 9)
        for i in range(12):
            for j in range(9):
                expected[t, i, j] = max(abs(guided[t, c, i, j]) for c in range(3)) * up[i, j]
    found = cam("guided-gradcam", A, None, alphas, pixels=x, guided_gradients=guided)
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6 * expected.max())
    np.testing.assert_allclose(cam("guided-backprop", A, None, alphas, pixels=x, guided_gradients=guided),
                               np.abs(guided).max(axis=1), rtol=1e-12)  # fmt: skip


def test_gradcam_plus_plus_does_not_depend_on_the_gradients_scale() -> None:
    """a_ij = 1 / (2 + sum(A) G) is unchanged when G is scaled by s and A by 1/s, so the map must be too.

    An absolute guard in the denominator (pytorch-grad-cam: + 1e-6) breaks this for small gradients.
    """
    reference = cam("gradcam++", A, G)
    for scale in (1e-6, 1e-3, 1e3):
        np.testing.assert_allclose(cam("gradcam++", A / scale, G * scale), reference, rtol=1e-9)
    g = G.copy()
    g[0, 0, 0, 0] = -2 / A[0].sum()  # 2 G^2 + sum(A) G^3 = 0 with G != 0: zero weight, not inf
    assert np.isfinite(cam("gradcam++", A, g)).all()


L, HEADS, PREFIX, GH, GW = 3, 2, 1, 2, 3
TOKENS = PREFIX + GH * GW
ATT = RNG.dirichlet(np.ones(TOKENS), size=(L, HEADS, TOKENS))  # rows sum to 1, as softmax outputs
DATT = RNG.standard_normal((T, L, HEADS, TOKENS, TOKENS))


def loop_attention(method: str) -> np.ndarray:
    """Rollout and Chefer relevance one scalar at a time: R as nested sums, the class token's row, the grid."""
    maps = np.zeros((T, GH, GW))
    for t in range(T):
        r = [[float(i == j) for j in range(TOKENS)] for i in range(TOKENS)]
        for layer in range(L):
            mixed = [[0.0] * TOKENS for _ in range(TOKENS)]
            for i in range(TOKENS):
                for j in range(TOKENS):
                    if method == "rollout":  # (mean_h A + I) / 2
                        mixed[i][j] = 0.5 * sum(ATT[layer, h, i, j] for h in range(HEADS)) / HEADS + 0.5 * (i == j)
                    else:  # mean_h ReLU(dA * A)
                        mixed[i][j] = sum(relu(DATT[t, layer, h, i, j] * ATT[layer, h, i, j]) for h in range(HEADS))
                        mixed[i][j] /= HEADS
            product = [
                [sum(mixed[i][k] * r[k][j] for k in range(TOKENS)) for j in range(TOKENS)] for i in range(TOKENS)
            ]
            r = (
                product
                if method == "rollout"
                else [[r[i][j] + product[i][j] for j in range(TOKENS)] for i in range(TOKENS)]
            )
        for k in range(GH * GW):
            maps[t, k // GW, k % GW] = r[0][PREFIX + k]
    return maps


@pytest.mark.parametrize("method", ATTENTION)
def test_attention_method_equals_its_formula_computed_with_loops(method: str) -> None:
    activations = np.zeros((C, GH, GW))
    maps = cam(method, activations, weights=np.zeros((T, C)), attentions=ATT, attention_gradients=DATT)
    np.testing.assert_allclose(maps, np.maximum(loop_attention(method), 0), rtol=1e-12, atol=1e-15)


def test_method_names_are_resolved_in_any_case() -> None:
    assert resolve("GradCAM") == ["gradcam"]
    names = ["Grad-CAM++", "layerCAM", "gradcam_elementwise"]
    assert resolve(names) == ["gradcam++", "layercam", "gradcam-elementwise"]
    assert resolve("ALL") == list(METHODS)
    with pytest.raises(OnnxcamError, match=r"unknown method 'gradcam\+'; did you mean gradcam\+\+"):
        resolve("gradcam+")


def test_gradcam_from_the_graph_weights_equals_gradcam_from_gradients() -> None:
    weights = G.mean(axis=(2, 3))
    np.testing.assert_allclose(cam("gradcam", A, weights=weights), cam("gradcam", A, G), rtol=1e-12)
    with pytest.raises(ValueError, match="needs the full gradients"):
        cam("layercam", A, weights=weights)


def test_an_all_negative_map_stays_zero() -> None:
    assert (cam("gradcam", np.ones((2, 3, 3)), weights=np.array([[-1.0, -2.0]])) == 0).all()


def _lowres(model: Path, **kwargs: object) -> dict[str, np.ndarray]:
    result = Explainer(model).explain(EXAMPLES / "chelsea.png", **kwargs)
    return {m.method: m.cam_lowres.ravel() for m in result.maps}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_gap_head_makes_gradcam_xgradcam_hirescam_agree(lite0_model: Path) -> None:
    """With GAP + FC after A, dy/dA_k is constant over positions: the three maps are proportional."""
    maps = _lowres(lite0_model, top_k=1, method=["gradcam", "xgradcam", "hirescam"])
    assert _corr(maps["gradcam"], maps["xgradcam"]) > 0.999999
    assert _corr(maps["gradcam"], maps["hirescam"]) > 0.999999


def test_fc_head_makes_them_differ(vgg16_model: Path) -> None:
    """VGG16's max pool + FC head gives position-dependent gradients: the maps differ."""
    maps = _lowres(vgg16_model, top_k=1, method=["gradcam", "xgradcam", "hirescam"])
    assert _corr(maps["gradcam"], maps["hirescam"]) < 0.99
    assert _corr(maps["gradcam"], maps["xgradcam"]) < 0.99


def test_two_classes_give_different_maps_on_the_cat(lite0_model: Path) -> None:
    """A map that ignored the class would correlate 1 across classes; measured here: 0.90."""
    maps = Explainer(lite0_model).explain(EXAMPLES / "chelsea.png", targets=["Egyptian cat", "plastic bag"]).maps
    assert _corr(maps[0].cam_lowres.ravel(), maps[1].cam_lowres.ravel()) < 0.95


def test_all_methods_come_from_one_call(lite0_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explainer = Explainer(lite0_model)
    calls = []
    run = explainer.engine.run
    monkeypatch.setattr(explainer.engine, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    result = explainer.explain(EXAMPLES / "chelsea.png", top_k=5, method=ONE_CALL)
    assert len(calls) == 1 and len(result.maps) == 5 * len(ONE_CALL)
    assert [m.method for m in result.maps[::5]] == ONE_CALL
