"""A corpus of files from the exporters users run, grafted with no flag: Hugging Face models built from small
configs (seeded random weights) and exported by optimum (or by torch.onnx with the exporter's names and sidecars,
where optimum has no ONNX config for the architecture).

For each: the task is told right, the automatic layer has a real grid (h, w >= 2), ``explain`` writes a map
that varies, and (where no discrete choice lies on the way: RT-DETR's query selection) the grafted gradient
of two target rows at that layer equals a central finite difference of
the file's own head (the nodes from the layer to the explained scores, cut out of the grafted file and run in
float64 by onnx's reference evaluator), in the layer's own layout (tokens beside the grid unperturbed).

Runs where transformers and optimum import (a venv with torch and torchvision of matching releases: see the
README); skipped elsewhere, with the reason. Slow.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from onnxcam.api import Explainer
from onnxcam.image import read_rgb
from onnxcam_export.from_onnx import graft_file
from tests.graph_fd import finite_difference

try:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
except Exception as exc:  # ImportError, or torchvision's operator errors when releases do not match
    pytest.skip(f"transformers/optimum do not import here ({type(exc).__name__}: {exc})"[:300],
                allow_module_level=True)  # fmt: skip

pytestmark = pytest.mark.slow
PHOTO = Path(__file__).parents[1] / "examples" / "chelsea.png"


def _labels(count: int) -> dict:
    names = {i: f"kind {i}" for i in range(count)}
    return {"num_labels": count, "id2label": names, "label2id": {v: k for k, v in names.items()}}


def _resnet() -> transformers.ResNetConfig:
    return transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                     out_features=["stage2", "stage3", "stage4"])  # fmt: skip


DETR = {"use_timm_backbone": False, "use_pretrained_backbone": False, "d_model": 32, "encoder_layers": 1,
        "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64, "num_queries": 10, "auxiliary_loss": False}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    config: Callable[[], object]
    model: type
    processor: Callable[[], object]
    task: str  # onnxcam's
    optimum: str | None  # optimum's task, or None: torch.onnx with optimum's names
    outputs: tuple[str, ...] = ("logits",)
    grid: str = ""  # a phrase of the card's layer description
    discrete: str = ""  # why a finite difference of its head is ambiguous (a step moves a discrete choice)
    dynamo: bool = False  # torch.onnx's dynamo exporter (the TorchScript one cannot export it)


CORPUS = {
    "levit": Entry(lambda: transformers.LevitConfig(image_size=224, hidden_sizes=[32, 48, 64],
                   num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8], **_labels(10)),
                   transformers.LevitForImageClassification, transformers.LevitImageProcessor, "classification",
                   "image-classification", grid="(64x4x4)"),  # Slice with step 2; its last stage 4 of 7
    "efficientnet": Entry(lambda: transformers.EfficientNetConfig(image_size=224, **_labels(10)),
                          transformers.EfficientNetForImageClassification,
                          lambda: transformers.EfficientNetImageProcessor(size={"height": 224, "width": 224}),
                          "classification", "image-classification", grid="x7x7)"),  # a padded stem, ceil pool
    "swinv2": Entry(lambda: transformers.Swinv2Config(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                    window_size=4, **_labels(10)), transformers.Swinv2ForImageClassification,
                    lambda: transformers.ViTImageProcessor(size={"height": 64, "width": 64}), "classification",
                    "image-classification", grid="64 tokens of 32"),  # not its pooled [N, C, 1]
    "mobilenetv2": Entry(lambda: transformers.MobileNetV2Config(image_size=224, depth_multiplier=0.35, **_labels(10)),
                         transformers.MobileNetV2ForImageClassification, transformers.MobileNetV2ImageProcessor,
                         "classification", "image-classification", grid="x7x7)"),
    "segformer": Entry(lambda: transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                       hidden_sizes=[16, 32], num_attention_heads=[1, 2], decoder_hidden_size=32, **_labels(5)),
                       transformers.SegformerForSemanticSegmentation,
                       lambda: transformers.SegformerImageProcessor(size={"height": 128, "width": 128}),
                       "segmentation", "semantic-segmentation", grid="(32x32x32)"),
    "dpt": Entry(lambda: transformers.DPTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4,
                 num_attention_heads=2, intermediate_size=64, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                 head_in_index=-1, backbone_out_indices=[0, 1, 2, 3], **_labels(5)),
                 transformers.DPTForSemanticSegmentation,
                 lambda: transformers.DPTImageProcessor(size={"height": 64, "width": 64}), "segmentation",
                 "semantic-segmentation", grid="(16x32x32)"),
    "yolos": Entry(lambda: transformers.YolosConfig(image_size=[64, 64], patch_size=16, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_detection_tokens=10,
                   **_labels(5)), transformers.YolosForObjectDetection,
                   lambda: transformers.YolosImageProcessor(size={"height": 64, "width": 64}, do_pad=False),
                   "detection", "object-detection", ("logits", "pred_boxes"),
                   grid="1 prefix and 10 suffix tokens dropped"),  # detection tokens after the patches
    "dinov2-registers": Entry(lambda: transformers.Dinov2WithRegistersConfig(
                              image_size=224, patch_size=28, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128, num_register_tokens=4, **_labels(10)),
                              transformers.Dinov2WithRegistersForImageClassification,
                              lambda: transformers.BitImageProcessor(size={"height": 224, "width": 224},
                              do_center_crop=False), "classification", None,
                              grid="5 prefix tokens dropped", dynamo=True),  # the class token and 4 registers
    "conditional-detr": Entry(lambda: transformers.ConditionalDetrConfig(backbone=None, backbone_config=_resnet(),
                              **DETR, **_labels(5)), transformers.ConditionalDetrForObjectDetection,
                              lambda: transformers.ConditionalDetrImageProcessor(size={"height": 128, "width": 128},
                              do_pad=False), "detection", None, ("logits", "pred_boxes"), grid="x4x4)"),
    "rt-detr": Entry(lambda: transformers.RTDetrConfig(backbone_config=transformers.RTDetrResNetConfig(
                     embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                     out_features=["stage2", "stage3", "stage4"]), encoder_hidden_dim=32, d_model=32,
                     encoder_in_channels=[32, 48, 64], decoder_in_channels=[32, 32, 32], encoder_ffn_dim=64,
                     decoder_ffn_dim=64, decoder_layers=1, num_queries=20, encoder_attention_heads=2,
                     decoder_attention_heads=2, **_labels(5)), transformers.RTDetrForObjectDetection,
                     lambda: transformers.RTDetrImageProcessor(size={"height": 128, "width": 128}), "detection",
                     "object-detection", ("logits", "pred_boxes"), grid="16x16 grid",  # GridSample, ReduceMax+TopK
                     discrete="its encoder's TopK picks the decoder's queries: a step of the layer moves that pick, "
                              "so a difference of the head measures no derivative (rules: tests/test_vjp_rules.py)"),
}  # fmt: skip


def _calibrate(model: torch.nn.Module, size: tuple[int, int]) -> None:
    """Batch norms take the statistics of random images (HF's inits leave the activations fading layer by layer);
    a classifier's head is scaled up so that its classes differ (a detector's sigmoids would saturate)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.momentum = None
        norm.reset_parameters()
    if norms:
        with torch.no_grad():
            model.train()(torch.randn(4, 3, *size))
    model.eval()
    if "Detection" not in type(model).__name__:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels:
                with torch.no_grad():
                    m.weight.mul_(30)


def _export(name: str, folder: Path) -> Path:
    """The model as its users export it: optimum's ``main_export``, or torch.onnx with optimum's input and output
    names and the sidecars ``save_pretrained`` writes (config.json, preprocessor_config.json)."""
    entry = CORPUS[name]
    processor = entry.processor()
    size = processor.size
    size = (size["height"], size["width"]) if "height" in size else (224, 224)
    torch.manual_seed(0)
    model = entry.model(entry.config())
    _calibrate(model, size)
    model.requires_grad_(False)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        if entry.optimum is not None:
            model.save_pretrained(folder / "hub")
            processor.save_pretrained(folder / "hub")
            main_export(str(folder / "hub"), output=folder / "onnx", task=entry.optimum, no_post_process=True)
        else:
            model.config.save_pretrained(folder / "onnx")
            processor.save_pretrained(folder / "onnx")

            class Outputs(torch.nn.Module):
                def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    out = model(pixel_values=pixel_values)
                    return tuple(getattr(out, o) for o in entry.outputs)

            batch = {"dynamic_shapes": {"pixel_values": {0: torch.export.Dim("batch_size")}}} if entry.dynamo else {
                "dynamic_axes": {"pixel_values": {0: "batch_size"}}}  # fmt: skip
            with torch.no_grad():
                torch.onnx.export(Outputs(), (torch.zeros(1, 3, *size),), folder / "onnx" / "model.onnx",
                                  input_names=["pixel_values"], output_names=list(entry.outputs), opset_version=18,
                                  dynamo=entry.dynamo, **batch)
    return folder / "onnx" / "model.onnx"


@pytest.mark.parametrize("name", list(CORPUS))
def test_an_exported_file_grafts_with_no_flag_and_its_gradients_match_its_head(name: str, tmp_path: Path) -> None:
    entry = CORPUS[name]
    source = _export(name, tmp_path)
    card, _ = graft_file(source, tmp_path / "model.cam.onnx")
    path = tmp_path / "model.cam.onnx"
    assert card["task"] == entry.task, card["notes"]
    assert entry.grid in card["layer"], card["layer"]
    grid = [int(d) for d in re.search(r"\((\d+)x(\d+)x(\d+)\)", card["layer"]).groups()[1:]]
    assert min(grid) >= 2
    explainer = Explainer(path)
    photo = read_rgb(PHOTO)
    result = explainer.explain(photo, **({"conf": 0.0} if entry.task == "detection" else {}))
    assert result.maps and np.ptp(result.maps[0].cam) > 0, "a map that varies"
    image = explainer.prepare(photo).model_input
    rows = np.array([[0, 1]]) if entry.task == "detection" else np.array([[-1, 1]])
    if not entry.discrete:
        finite_difference(path, card, image, rows)
