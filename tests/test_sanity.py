"""Model-parameter randomisation test (Adebayo et al., NeurIPS 2018) on the pretrained Lite0.

A faithful explanation depends on the weights: as the layers from the classifier down are
re-initialised one after another (cascading randomisation), the maps must stop resembling
the trained model's. Spearman rank correlation of the layer-resolution (7x7) maps, Egyptian
cat on the cat photo. Measured here: 0.51 after the classifier, 0.63 after conv_head + BN,
-0.16 once block 15 is random too; the trained weights exported again give 1.0. The
thresholds leave room for the seed while still demanding a clear loss of similarity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from tests.conftest import EXAMPLES

torch = pytest.importorskip("torch")

CASCADE = [(["_fc"], 0.75), (["_conv_head", "_bn1"], 0.75), (["_blocks.15"], 0.3), (["_blocks.14"], 0.3)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x.ravel())).astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


@pytest.mark.slow  # re-initialises and re-exports Lite0 layer by layer
def test_maps_lose_their_shape_as_the_weights_are_randomised(lite0_model: Path, tmp_path: Path) -> None:
    from onnxcam_export.torch_export import ARCHS, export_module, load_weights

    trained = Explainer(lite0_model).explain(EXAMPLES / "chelsea.png", targets=[285]).maps[0].cam_lowres
    arch = ARCHS["efficientnet_lite0"]
    model = arch.build().eval()
    load_weights(arch, model, "imagenet")
    control = tmp_path / "trained.onnx"  # the same weights exported again: the comparison itself is sound
    export_module(model, "efficientnet_lite0", "imagenet", None, control)
    again = Explainer(control).explain(EXAMPLES / "chelsea.png", targets=[285]).maps[0].cam_lowres
    assert spearman(trained, again) > 0.999
    generator = torch.Generator().manual_seed(1)
    modules = dict(model.named_modules())
    for step, (names, threshold) in enumerate(CASCADE):
        for name in names:
            for p in modules[name].parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * (p.std() if p.numel() > 1 else 1))
        out = tmp_path / f"random{step}.onnx"
        export_module(model, "efficientnet_lite0", f"cascade to {names[-1]}", None, out)
        randomised = Explainer(out).explain(EXAMPLES / "chelsea.png", targets=[285]).maps[0].cam_lowres
        assert spearman(trained, randomised) < threshold, (names, spearman(trained, randomised))


def test_maps_for_two_classes_differ(lite0_model: Path) -> None:
    """Cat vs plastic bag on the cat photo (both maps sit on the only object): measured 0.90."""
    maps = Explainer(lite0_model).explain(EXAMPLES / "chelsea.png", targets=[285, "plastic bag"]).maps
    assert spearman(maps[0].cam_lowres, maps[1].cam_lowres) < 0.95
