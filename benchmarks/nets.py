"""What the benchmarks share: the two networks with their weights, the photos, the plain forward of the same weights
(the bound every contender is measured against) and the ONNX Runtime options of every session."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnxcam_export.torch_export import ARCHS, RANDOM_SEED, Explainable, export_forward, load_weights, resolve_layer

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"vgg16": "none", "efficientnet_lite0": "imagenet"}  # VGG16's random weights cost the same


def quiet_options() -> ort.SessionOptions:
    """Identical options for every session; no spinning, so one session's idle worker threads do not steal the two
    cores from the other's run (which skews whoever runs next)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def torch_model(arch_name: str) -> torch.nn.Module:
    """The network in eval mode with the weights of :data:`WEIGHTS` (ReLUs not in place, for autograd's hooks)."""
    arch = ARCHS[arch_name]
    torch.manual_seed(RANDOM_SEED)
    model = arch.build().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    load_weights(arch, model, WEIGHTS[arch_name])
    return model


def forward_only(arch_name: str, out: Path) -> None:
    """The same network and weights, exported by torch.onnx without onnxcam's graft (its logits only)."""
    arch = ARCHS[arch_name]
    model = torch_model(arch_name)
    _, path = resolve_layer(arch, model, None)
    wrapper = Explainable(model, dict(model.named_modules())[path], arch.mean, arch.std).eval()
    graph, _ = export_forward(wrapper, arch.input_size)
    del graph.graph.output[1:]
    onnx.save(graph, out)


def photos(batch: int) -> np.ndarray:
    """``batch`` 224x224 uint8 RGB photos, the bundled cat and coffee in turn (each a little shifted)."""
    sources = [
        cv2.cvtColor(cv2.imread(str(ROOT / "examples" / n)), cv2.COLOR_BGR2RGB) for n in ("chelsea.png", "coffee.png")
    ]
    return np.stack([cv2.resize(sources[i % 2][i * 4 :, i * 4 :], (224, 224), interpolation=cv2.INTER_AREA)
                     for i in range(batch)])  # fmt: skip


def normalised(images: np.ndarray, arch_name: str) -> torch.Tensor:
    """The torch model's input of uint8 RGB ``[N, H, W, 3]``, as the file's in-graph preprocessing makes it."""
    arch = ARCHS[arch_name]
    x = (images.astype(np.float32) / 255 - np.float32(arch.mean)) / np.float32(arch.std)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
