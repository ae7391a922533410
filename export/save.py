"""Writing a grafted model: its model card as metadata, the ONNX checker, an atomic write."""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxcam.contract import ModelCard
from onnxcam.outputs import atomic_write


def save_explainer(model: onnx.ModelProto, card: ModelCard, out: Path) -> None:
    """Store ``card`` as ``onnxcam.*`` metadata, check the graph, write ``out`` through a temporary name."""
    del model.metadata_props[:]
    for key, value in card.to_metadata().items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: onnx.save(model, tmp))
