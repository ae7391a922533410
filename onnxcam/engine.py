"""One ONNX Runtime session over an onnxcam model, and the model card it carries."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcam import contract
from onnxcam.errors import OnnxcamError


@dataclass(frozen=True)
class ModelCard:
    """What the ``.onnx`` file says about itself (``onnxcam info`` prints this)."""

    contract: str
    arch: str
    weights: str
    layer: str
    input_size: tuple[int, int]
    channel_order: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    weights_path: str
    notes: str = ""

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: Path) -> ModelCard:
        values = {k[len(contract.META_PREFIX) :]: v for k, v in meta.items() if k.startswith(contract.META_PREFIX)}
        if values.get("contract") != contract.CONTRACT_VERSION:
            found = values.get("contract", "none")
            raise OnnxcamError(
                f"{source} is not an onnxcam model (contract version {found}, expected {contract.CONTRACT_VERSION}); "
                "create one with: onnxcam export"
            )
        missing = [k for k in contract.META_KEYS if k not in values]
        if missing:
            raise OnnxcamError(f"{source} lacks onnxcam metadata {missing}; re-create it with onnxcam export")
        return cls(
            contract=values["contract"],
            arch=values["arch"],
            weights=values["weights"],
            layer=values["layer"],
            input_size=tuple(json.loads(values["input_size"])),
            channel_order=values["channel_order"],
            mean=tuple(json.loads(values["mean"])),
            std=tuple(json.loads(values["std"])),
            labels=tuple(json.loads(values["labels"])),
            weights_path=values["weights_path"],
            notes=values.get("notes", ""),
        )

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs for display."""
        height, width = self.input_size
        fmt = ", ".join
        return [
            ("contract", self.contract),
            ("arch", self.arch),
            ("weights", self.weights),
            ("target layer", self.layer),
            ("input", f"uint8 [N, {height}, {width}, 3] {self.channel_order}; resize only, normalised in the graph"),
            ("mean (0..1)", fmt(f"{v:.4f}" for v in self.mean)),
            ("std (0..1)", fmt(f"{v:.4f}" for v in self.std)),
            ("classes", f"{len(self.labels)} ({fmt(self.labels[:3])}, ...)"),
            ("channel weights", self.weights_path),
        ] + ([("notes", self.notes)] if self.notes else [])


@dataclass(frozen=True)
class Outputs:
    """One run's outputs; shapes as in :mod:`onnxcam.contract`."""

    logits: np.ndarray
    activations: np.ndarray
    weights: np.ndarray
    gradients: np.ndarray
    target_classes: np.ndarray


def _providers(provider: str | None) -> list[str]:
    available = ort.get_available_providers()
    if provider is None:
        return ["CPUExecutionProvider"]
    by_short = {p.removesuffix("ExecutionProvider").lower(): p for p in available}
    chosen = by_short.get(provider.lower().removesuffix("executionprovider"), provider)
    if chosen not in available:
        raise OnnxcamError(f"provider {provider!r} is not available here; available: {', '.join(available)}")
    return [chosen] + (["CPUExecutionProvider"] if chosen != "CPUExecutionProvider" else [])


class Engine:
    """Loads a model once; :meth:`run` is one ORT call for a batch and T targets."""

    def __init__(
        self, path: str | Path, provider: str | None = None, options: ort.SessionOptions | None = None
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise OnnxcamError(f"model file {path} not found; create it with: onnxcam export --arch vgg16 --out {path}")
        providers = _providers(provider)
        options = options or ort.SessionOptions()
        options.log_severity_level = 3  # ORT's warnings (e.g. about the overridable default input) are noise here
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxcamError(f"could not load model {path}: {first}") from exc
        self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        names = {o.name for o in self.session.get_outputs()}
        inputs = {i.name for i in self.session.get_inputs()}
        if not set(contract.OUTPUTS) <= names or not {contract.IMAGE, contract.TARGETS} <= inputs:
            raise OnnxcamError(f"{path} does not have the onnxcam inputs/outputs; re-create it with onnxcam export")
        self.path = path
        self._empty_batch = 0  # image batch size fed with head-only passes (1 if the model cannot take 0)

    def run(self, images: np.ndarray, targets: np.ndarray, full_gradients: bool = False) -> Outputs:
        """``images`` uint8 ``[N, H, W, 3]`` RGB at the model's size; ``targets`` int64 ``[N, T]``."""
        height, width = self.card.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise ValueError(f"images must be uint8 [N, {height}, {width}, 3], got {images.dtype} {images.shape}")
        if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be [N, T] with N = {images.shape[0]}, got {targets.shape}")
        feeds = {
            contract.IMAGE: images,
            contract.TARGETS: targets.astype(np.int64),
            contract.FULL_GRADIENTS: np.asarray(full_gradients),
        }
        values = self.session.run(list(contract.OUTPUTS), feeds)
        return Outputs(**dict(zip(contract.OUTPUTS, values, strict=True)))

    def run_head(self, activations: np.ndarray) -> np.ndarray:
        """Logits ``[M, K]`` of the head alone (target layer -> logits) for ``activations [M, C, h, w]``.

        The image batch is empty, so the backbone does no work.
        """
        inputs = {i.name: i for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        if contract.HEAD_ACTIVATIONS not in inputs:
            raise OnnxcamError(f"{self.path} has no head-only graph (its head is not a cut); re-export it")
        if not isinstance(inputs[contract.IMAGE].shape[0], str):
            raise OnnxcamError(f"{self.path} has a fixed batch size; head-only passes need a dynamic batch")
        height, width = self.card.input_size
        feeds = {
            contract.IMAGE: np.zeros((self._empty_batch, height, width, 3), np.uint8),
            contract.TARGETS: np.zeros((self._empty_batch, 1), np.int64),
            contract.HEAD_ACTIVATIONS: np.ascontiguousarray(activations, dtype=np.float32),
            contract.RUN_HEAD: np.asarray(True),
        }
        try:
            return self.session.run([contract.HEAD_LOGITS], feeds)[0]
        except Exception as exc:  # ORT's Fail: e.g. a Reshape to [-1, ...] cannot take an empty batch
            if self._empty_batch:
                raise
            warnings.warn(
                f"{self.path.name} cannot run an empty image batch ({str(exc).splitlines()[0][:120]}); "
                "head-only passes feed one blank image instead, so the backbone runs once per pass",
                stacklevel=2,
            )
            self._empty_batch = 1
            return self.run_head(activations)
