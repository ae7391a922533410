"""Writing a grafted model: its model card as metadata, the ONNX checker, an atomic write."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from onnxcam import contract
from onnxcam.contract import ModelCard
from onnxcam.outputs import atomic_write
from onnxcam_export.saliency import saliency_methods


def save_explainer(model: onnx.ModelProto, card: ModelCard, out: Path) -> ModelCard:
    """Store ``card`` as ``onnxcam.*`` metadata, check the graph, write ``out`` through a temporary name.

    A graph with the ``saliency`` output gets its methods listed in the card (``saliency_methods``).
    Returns the card as written.
    """
    if any(o.name == contract.SALIENCY for o in model.graph.output):
        card = dataclasses.replace(card, saliency_methods=tuple(saliency_methods()))
    del model.metadata_props[:]
    for key, value in card.to_metadata().items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: onnx.save(model, tmp))
    return card
