"""timm's own ViT, DeiT and Swin (random weights) through ``--from``, against torch autograd and pytorch-grad-cam;
torchvision's ConvNeXt through ``--from`` against ``--arch convnext_tiny``.

timm needs torchvision, which imports only beside a matching torch (e.g. torch 2.14.1 with
torchvision 0.29.1): the tests skip with the reason where it does not (CI has a CPU torch alone;
``tests/test_transformers.py`` checks the same layouts on small modules of our own there).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.engine import Engine
from tests.test_transformers import UNIT, export_plain, tokens_to_grid

torch = pytest.importorskip("torch")
try:
    import timm
except Exception as exc:  # ImportError, or torchvision's RuntimeError beside a mismatched torch
    pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc})", allow_module_level=True)

from onnxcam_export.from_onnx import Preprocessing, graft_file  # noqa: E402

pytestmark = pytest.mark.slow

# name -> (module whose input (pre) or output is the layer the graft picks, to [N, C, h, w])
NETS: dict[str, tuple[str, bool, Callable[[torch.Tensor], torch.Tensor]]] = {
    "vit_small_patch16_224": ("blocks.11", True, lambda t: tokens_to_grid(t, 1, 14, 14)),
    "deit_small_distilled_patch16_224": ("blocks.11", True, lambda t: tokens_to_grid(t, 2, 14, 14)),
    "swin_tiny_patch4_window7_224": ("norm", False, lambda t: t.permute(0, 3, 1, 2)),
}


def _export(name: str, folder: Path, **options: object) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    export_plain(model, (224, 224), folder / f"{name}.onnx", dynamo=False)
    graft_file(folder / f"{name}.onnx", folder / f"{name}.cam.onnx", prep=UNIT, **options)
    return model, folder / f"{name}.cam.onnx"


@pytest.mark.parametrize("name", list(NETS))
def test_timm_model_grafts_and_matches_autograd(name: str, tmp_path: Path) -> None:
    model, path = _export(name, tmp_path)
    engine = Engine(path)
    image = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    out = engine.run(image, np.array([[-1, 7]]), full_gradients=True)
    module, pre, to_grid = NETS[name]
    model = model.double()
    store: list[torch.Tensor] = []
    target = model.get_submodule(module)
    if pre:
        target.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
    else:
        target.register_forward_hook(lambda _m, _i, output: store.append(output))
    logits = model(torch.from_numpy(image.astype(np.float64) / 255).permute(0, 3, 1, 2))
    grads = [torch.autograd.grad(logits[0, int(c)], store[0], retain_graph=True)[0] for c in out.target_classes[0]]
    activations = to_grid(store[0]).detach().numpy()
    gradients = np.stack([to_grid(g).numpy() for g in grads], axis=1)
    np.testing.assert_allclose(out.activations, activations, rtol=1e-4, atol=1e-4 * np.abs(activations).max())
    np.testing.assert_allclose(out.gradients, gradients, rtol=1e-4, atol=1e-4 * np.abs(gradients).max())


def test_vit_map_equals_pytorch_grad_cam(tmp_path: Path) -> None:
    """pytorch-grad-cam itself (where installed), its ViT tutorial's layer and ``reshape_transform``."""
    grad_cam = pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    norm1 = "/blocks/blocks.11/norm1/LayerNormalization_output_0"
    model, path = _export("vit_small_patch16_224", tmp_path, layer=norm1)
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    cam = grad_cam.GradCAM(model=model.float(), target_layers=[model.blocks[-1].norm1],
                           reshape_transform=lambda t: tokens_to_grid(t, 1, 14, 14))  # fmt: skip
    x = torch.from_numpy(image[None].astype(np.float32) / 255).permute(0, 3, 1, 2)
    for ours in Explainer(path).explain(image, top_k=5).maps:  # random weights: some classes have empty maps
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(ours.index)])[0]
        assert ours.empty == (theirs.max() == 0), ours.index
        if not ours.empty:
            assert np.corrcoef(ours.cam.ravel(), theirs.ravel())[0, 1] >= 0.999, ours.index


def test_torchvision_convnext_through_from_agrees_with_arch(tmp_path: Path) -> None:
    """The plain export picks the last stage's 7 x 7 grid by itself and gives the native export's maps."""
    from onnxcam_export.torch_export import ARCHS, export_arch
    from tests.conftest import EXAMPLES
    from tests.test_from_onnx import plain_torch_export

    export_arch("convnext_tiny", "none", None, tmp_path / "native.onnx")
    plain_torch_export("convnext_tiny", "none", tmp_path / "plain.onnx", opset=17)
    arch = ARCHS["convnext_tiny"]
    card, _ = graft_file(tmp_path / "plain.onnx", tmp_path / "from.onnx",
                         prep=Preprocessing.create(None, arch.mean, arch.std, False))  # fmt: skip
    assert card["layer"].endswith("(768x7x7)"), card["layer"]
    native = Explainer(tmp_path / "native.onnx").explain(EXAMPLES / "chelsea.png", top_k=3)
    grafted = Explainer(tmp_path / "from.onnx").explain(EXAMPLES / "chelsea.png", top_k=3)
    assert [m.index for m in grafted.maps] == [m.index for m in native.maps]
    for ours, reference in zip(grafted.maps, native.maps, strict=True):
        np.testing.assert_allclose(
            ours.weights, reference.weights, rtol=1e-4, atol=1e-5 * np.abs(reference.weights).max()
        )
        np.testing.assert_allclose(ours.cam, reference.cam, atol=1e-4)


def test_a_timm_pretrained_cfg_gives_timms_own_eval_transform_and_prediction(tmp_path: Path) -> None:
    """``--preprocess`` with the model's ``pretrained_cfg`` (as timm's hub files carry it): on non-square photos,
    the same top-5 as ``create_transform(**resolve_data_config(model=...))`` + the torch model (crop_pct 0.95 and
    bicubic here: the shorter side to floor(224 / 0.95) = 235, the centre 224x224)."""
    import json

    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from onnxcam.image import read_rgb
    from tests.conftest import EXAMPLES

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)  # spread-out probabilities
    cfg = dict(model.pretrained_cfg) | {"crop_pct": 0.95, "interpolation": "bicubic"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    export_plain(model, (224, 224), tmp_path / "resnet18.onnx", dynamo=False)
    card, _ = graft_file(tmp_path / "resnet18.onnx", tmp_path / "r.cam.onnx",
                         prep=Preprocessing.from_json(tmp_path / "cfg.json"))  # fmt: skip
    assert card["resize"]["shorter"] == 235
    transform = create_transform(**resolve_data_config(cfg, model=model))
    explainer = Explainer(tmp_path / "r.cam.onnx")
    photo = read_rgb(EXAMPLES / "chelsea.png")
    for view in (photo, photo.transpose(1, 0, 2).copy(), photo[:, 100:250].copy()):
        with torch.no_grad():
            expected = torch.softmax(model(transform(Image.fromarray(view))[None]).double(), 1)[0].numpy()
        found = explainer.explain(view).predictions
        assert [p.index for p in found] == list(np.argsort(-expected)[:5])
        np.testing.assert_allclose([p.probability for p in found], np.sort(expected)[::-1][:5], atol=1e-3)
