"""Transformers and channels-last networks through ``onnxcam export --from``, against torch autograd in float64.

Each small model (``onnxcam_export.transformers``: the ops of timm's ViT/DeiT/Swin and torchvision's
ConvNeXt) gets seeded random weights and is exported plainly by torch.onnx, with the TorchScript
exporter and (slow) the dynamo one; the graft picks the layer by itself. The reference is the
same module in float64: the target tensor captured by a hook, its gradient by autograd, both
brought to ``[N, C, h, w]`` with pytorch-grad-cam's documented ``reshape_transform`` formula
(drop the prefix tokens, reshape to the grid, channels first), written here independently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from onnxcam import Explainer, contract
from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file

torch = pytest.importorskip("torch")

from onnxcam_export.transformers import ConvNeXt, SwinTransformer, VisionTransformer  # noqa: E402

Capture = Callable[[torch.nn.Module, list[torch.Tensor]], object]  # registers a hook that appends the layer


def _block_input(model: torch.nn.Module, store: list[torch.Tensor]) -> object:
    return model.blocks[-1].register_forward_pre_hook(lambda _m, args: store.append(args[0]))


def _output_of(path: str) -> Capture:
    def capture(model: torch.nn.Module, store: list[torch.Tensor]) -> object:
        return model.get_submodule(path).register_forward_hook(lambda _m, _i, out: store.append(out))

    return capture


def tokens_to_grid(tensor: torch.Tensor, prefix: int, height: int, width: int) -> torch.Tensor:
    """pytorch-grad-cam's ``reshape_transform`` for ViT (its tutorial), with ``prefix`` tokens instead of 1 (and
    the tokens after the grid dropped too)."""
    result = tensor[:, prefix : prefix + height * width, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


@dataclass(frozen=True)
class Net:
    build: Callable[[], torch.nn.Module]
    size: tuple[int, int]
    capture: Capture  # the layer the graft should pick, as torch sees it
    to_grid: Callable[[torch.Tensor], torch.Tensor]  # that tensor as [N, C, h, w]
    grid: tuple[int, int]


NETS = {
    # non-square input: a 4 x 6 grid of patches, one class token
    "vit": Net(lambda: VisionTransformer((32, 48), 8, 32, 2, 2, 5), (32, 48), _block_input,
               lambda t: tokens_to_grid(t, 1, 4, 6), (4, 6)),
    # DeiT: class and distillation tokens, two heads averaged
    "deit": Net(lambda: VisionTransformer((32, 32), 8, 32, 2, 2, 5, distilled=True), (32, 32), _block_input,
                lambda t: tokens_to_grid(t, 2, 4, 4), (4, 4)),
    # YOLOS: detection tokens after the patches, which the head reads (its automatic layer fell back to the patch
    # embedding); the grid tokens lie between the class token and them
    "suffix": Net(lambda: VisionTransformer((32, 32), 8, 32, 2, 2, 5, pool="suffix", suffix=3), (32, 32),
                  _block_input, lambda t: tokens_to_grid(t, 1, 4, 4), (4, 4)),
    # Swin: channels-last stages, shifted windows, patch merging, mean-pooled head
    "swin": Net(SwinTransformer, (64, 64), _output_of("norm"), lambda t: t.permute(0, 3, 1, 2), (8, 8)),
    # ConvNeXt: the head's channels-last LayerNorm on [N, 1, 1, C] must not be picked
    "convnext": Net(ConvNeXt, (64, 64), _output_of("features.5"), lambda t: t, (4, 4)),
}  # fmt: skip
TARGETS = np.array([[-1, 3]])


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return NETS[name].build().eval()


def export_plain(
    model: torch.nn.Module, size: tuple[int, int], path: Path, dynamo: bool, output: str | tuple[str, ...] = "scores"
) -> None:
    """What a user has: the model exported by torch.onnx, float NCHW input in [0, 1], dynamic batch; ``output``
    names its output (or each of its outputs)."""
    names = {"input_names": ["x"], "output_names": [output] if isinstance(output, str) else list(output)}
    if dynamo:
        names["dynamic_shapes"] = {"x": {0: torch.export.Dim("N")}}
    else:
        names["dynamic_axes"] = {"x": {0: "N"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, *size),), path, dynamo=dynamo, opset_version=18, **names)


UNIT = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the model takes pixel / 255


def grafted(name: str, folder: Path, dynamo: bool = False, **options: object) -> tuple[torch.nn.Module, Path, dict]:
    model = build(name)
    export_plain(model, NETS[name].size, folder / f"{name}.onnx", dynamo)
    card, _ = graft_file(folder / f"{name}.onnx", folder / f"{name}.cam.onnx", prep=UNIT, **options)
    return model, folder / f"{name}.cam.onnx", card


@pytest.fixture(scope="module")
def torchscript(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, dict]]:
    """Each net exported by the TorchScript exporter and grafted with the defaults, once per module:
    (grafted file, card). ``build(name)`` gives its weights again."""
    done: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in done:
            done[name] = grafted(name, tmp_path_factory.mktemp(name))[1:]
        return done[name]

    return get


def reference(name: str, model: torch.nn.Module, images: np.ndarray, classes: np.ndarray, score: str = "logit"):
    """(A [N, C, h, w], dy_c/dA [N, T, C, h, w]) by torch autograd in float64 on the same weights;
    y is the logit, or with ``score="probability"`` its softmax."""
    model = model.double()
    store: list[torch.Tensor] = []
    hook = NETS[name].capture(model, store)
    x = torch.from_numpy(images.astype(np.float64) / 255).permute(0, 3, 1, 2)
    logits = model(x)
    logits = logits if score == "logit" else torch.softmax(logits, dim=1)
    hook.remove()
    layer = store[0]
    grads = [
        torch.autograd.grad(logits.gather(1, torch.from_numpy(classes[:, [t]])).sum(), layer, retain_graph=True)[0]
        for t in range(classes.shape[1])
    ]
    to_grid = NETS[name].to_grid
    return to_grid(layer).detach().numpy(), np.stack([to_grid(g).numpy() for g in grads], axis=1)


def check_against_autograd(name: str, model: torch.nn.Module, path: Path) -> None:
    engine = Engine(path)
    images = np.random.default_rng(1).integers(0, 256, (2, *NETS[name].size, 3), dtype=np.uint8)
    out = engine.run(images, np.repeat(TARGETS, 2, axis=0), full_gradients=True)
    activations, gradients = reference(name, model, images, out.target_classes, engine.card.score)
    assert out.activations.shape[2:] == NETS[name].grid
    np.testing.assert_allclose(out.activations, activations, rtol=1e-4, atol=1e-4 * np.abs(activations).max())
    np.testing.assert_allclose(out.gradients, gradients, rtol=1e-4, atol=1e-4 * np.abs(gradients).max())
    np.testing.assert_allclose(out.weights, gradients.mean(axis=(3, 4)), rtol=1e-4, atol=1e-4 * np.abs(gradients).max())


@pytest.mark.parametrize("name", list(NETS))
def test_torchscript_export_grafts_and_matches_autograd(name: str, torchscript: Callable) -> None:
    check_against_autograd(name, build(name), torchscript(name)[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "deit", "swin"])
def test_dynamo_export_grafts_and_matches_autograd(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
    model, path, _ = grafted(name, tmp_path, dynamo=True)
    check_against_autograd(name, model, path)


def test_attention_outputs_match_autograd(torchscript: Callable) -> None:
    """Each block's attention probabilities and d logit / d probabilities (all blocks, not only after the layer)."""
    model, engine = build("deit"), Engine(torchscript("deit")[0])
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = engine.run(
        images, np.repeat(TARGETS, 2, axis=0), attention=(contract.ATTENTIONS, contract.ATTENTION_GRADIENTS)
    )
    model = model.double()
    store: list[torch.Tensor] = []
    for block in model.blocks:
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: store.append(out))
    logits = model(torch.from_numpy(images.astype(np.float64) / 255).permute(0, 3, 1, 2))
    grads = [
        torch.stack(torch.autograd.grad(logits.gather(1, torch.from_numpy(out.target_classes[:, [t]])).sum(), store,
                                        retain_graph=True), 1).numpy()
        for t in range(TARGETS.shape[1])
    ]  # fmt: skip
    attentions, gradients = torch.stack(store, 1).detach().numpy(), np.stack(grads, 1)
    assert out.attentions.shape == (2, 2, 2, 18, 18)  # N, blocks, heads, 2 prefix + 16 grid tokens
    np.testing.assert_allclose(out.attentions, attentions, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.attention_gradients, gradients, rtol=1e-4, atol=1e-4 * np.abs(gradients).max())


def test_probability_score_differentiates_the_softmax(tmp_path: Path) -> None:
    model, path, card = grafted("vit", tmp_path, score="probability")
    assert card["score"] == "probability"
    check_against_autograd("vit", model, path)


def test_head_only_graph_reads_the_contract_layout(torchscript: Callable) -> None:
    """Swin's head reads channels-last tokens: the head-only copy turns [M, C, h, w] back (Ablation-CAM);
    a class-token head also reads the class token, which the activations lack: no head-only copy."""
    engine = Engine(torchscript("swin")[0])
    images = np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = engine.run(images, np.zeros((2, 1), np.int64))
    with pytest.warns(UserWarning, match="cannot run an empty image batch"):  # Swin's window reshapes: [-1, ...]
        head_logits = engine.run_head(out.activations)
    np.testing.assert_allclose(head_logits, out.logits, rtol=1e-5, atol=1e-5)
    assert contract.HEAD_LOGITS not in Engine(torchscript("vit")[0]).outputs


def test_grafted_transformer_is_default_domain_with_the_optional_outputs(torchscript: Callable) -> None:
    import onnx

    from tests.test_contract import _all_nodes

    model = onnx.load(torchscript("deit")[0])
    assert {n.domain for n in _all_nodes(model.graph)} <= {"", "ai.onnx"}
    names = [o.name for o in model.graph.output]
    assert names == [*contract.OUTPUTS, contract.ATTENTIONS, contract.ATTENTION_GRADIENTS, contract.SALIENCY]


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_the_in_graph_map_of_a_token_or_channels_last_layer_equals_the_python_map(
    name: str, torchscript: Callable
) -> None:
    """The graph finishes the map from the contract's [N, C, h, w] view, whatever the layer's layout."""
    from tests.test_saliency import assert_saliency_matches_python

    assert_saliency_matches_python(torchscript(name)[0])


def test_token_layer_is_described_and_the_class_token_dropped(torchscript: Callable) -> None:
    card = torchscript("deit")[1]
    expected = "(32x4x4) [token layer: 2 + 16 tokens of 32, 4x4 grid, 2 prefix tokens dropped]"
    assert card["layer"].endswith(expected), card["layer"]
    card = torchscript("convnext")[1]
    assert card["layer"].endswith("(64x4x4)"), "the last stage, not the head's [N, 1, 1, C] LayerNorm"


def pytorch_grad_cam(model: torch.nn.Module, image: np.ndarray, module: str, cls: int, prefix: int, grid: tuple):
    """pytorch-grad-cam's GradCAM as its code does it, written out: hooks on ``module``'s output,
    ``reshape_transform`` on activations and gradients, alpha = mean over the grid, ReLU of the
    weighted sum, min-max scaled, resized to the input with cv2 (bilinear)."""
    model = model.float()
    store: list[torch.Tensor] = []
    hook = model.get_submodule(module).register_forward_hook(lambda _m, _i, out: store.append(out))
    x = torch.from_numpy(image[None].astype(np.float32) / 255).permute(0, 3, 1, 2)
    score = model(x)[0, cls]
    hook.remove()
    grad = torch.autograd.grad(score, store[0])[0]
    a, g = (tokens_to_grid(t, prefix, *grid).detach().numpy()[0] for t in (store[0], grad))
    cam = np.maximum((g.mean(axis=(1, 2))[:, None, None] * a).sum(axis=0), 0)
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
    return cv2.resize(cam.astype(np.float32), (image.shape[1], image.shape[0]))


def test_map_equals_pytorch_grad_cam_with_its_reshape_transform(tmp_path: Path) -> None:
    """Their ViT tutorial's layer, the last block's norm1 (not crossed by the residual path: a partial derivative)."""
    model, path, _ = grafted("vit", tmp_path, layer="/blocks/blocks.1/norm1/LayerNormalization_output_0")
    image = np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    ours = Explainer(path).explain(image, top_k=1).maps[0]
    theirs = pytorch_grad_cam(model, image, "blocks.1.norm1", ours.index, 1, (4, 6))
    assert np.corrcoef(ours.cam.ravel(), theirs.ravel())[0, 1] >= 0.999


class PooledFlat(torch.nn.Module):
    """A CNN whose head pools ``features.flatten(2)`` in 1-D: ``[N, 16, 16]`` and ``[N, 16, 1]``, with 16 the
    4x4 grid's cell count, look like tokens but are channels first (Swinv2's pooled ``[N, 256, 1]`` was read as
    256 tokens of width 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 8, 8)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x))
        return self.head(torch.nn.functional.adaptive_avg_pool1d(features.flatten(2), 1).flatten(1))


def test_a_flattened_or_pooled_grid_is_not_taken_for_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PooledFlat().eval()
    export_plain(model, (32, 32), tmp_path / "pooled.onnx", dynamo=False)
    card, _ = graft_file(tmp_path / "pooled.onnx", tmp_path / "pooled.cam.onnx", prep=UNIT)
    assert card["layer"].endswith("(16x4x4)") and "Relu" in card["layer"], card["layer"]
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = Engine(tmp_path / "pooled.cam.onnx").run(images, np.array([[1], [3]]), full_gradients=True)
    model = model.double()
    features = torch.relu(model.conv(torch.from_numpy(images / 255).permute(0, 3, 1, 2)))
    logits = model.head(torch.nn.functional.adaptive_avg_pool1d(features.flatten(2), 1).flatten(1))
    (grads,) = torch.autograd.grad(logits[[0, 1], [1, 3]].sum(), features)
    np.testing.assert_allclose(out.gradients[:, 0], grads.numpy(), rtol=1e-4, atol=1e-4 * np.abs(grads).max())
