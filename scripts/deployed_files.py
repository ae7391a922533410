"""Write stand-ins for the ONNX files other pipelines deploy, each with its ecosystem's layout of facts.

    python scripts/deployed_files.py deployed

- ``yolo/best.onnx``: an ultralytics-shaped detector (raw ``[N, 4 + K, A]``) with the metadata ultralytics'
  exporter writes (``names``, ``imgsz``, ``stride``, ``task``, ``author``);
- ``hf/model.onnx``: a classifier as optimum writes it (every input axis symbolic, ``pixel_values``), with
  ``config.json`` (``id2label``) and ``preprocessor_config.json`` (DeiT's: 256x256, centre crop 224, bicubic, 0.5);
- ``timm/model.onnx`` and ``timm/pretrained_cfg.json`` (crop_pct 0.9, bicubic, ImageNet's mean/std);
- ``keras/model.onnx``: an NHWC classifier that takes Keras' ``preprocess_input(mode="caffe")`` pixels;
- ``ocr/cls.onnx``: a 48-pixel-high text-line classifier with a dynamic width (PaddleOCR's layout).

The weights are seeded random ones (their maps mean nothing): the files stand in for the real ones so that the
README's "Bring your own file" block runs where the exporters are not installed. Needs PyTorch.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn


def features(channels: int = 3) -> nn.Sequential:
    """Four stride-2 convolutions with batch norms."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((channels, 8), (8, 16), (16, 16), (16, 24)):
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    def __init__(self, classes: int, channels_last: bool = False) -> None:
        super().__init__()
        self.features, self.head, self.channels_last = features(), nn.Linear(24, classes), channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2) if self.channels_last else x
        return self.head(self.features(x).mean((2, 3)))


class Detector(nn.Module):
    """An anchor-free head at stride 16 on a 64x64 input: cx, cy, w, h in pixels and sigmoid class scores."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features, self.box, self.cls = features(), nn.Conv2d(24, 4, 1), nn.Conv2d(24, classes, 1)
        cells = torch.arange(4, dtype=torch.float32) + 0.5
        self.register_buffer("grid", torch.stack(torch.meshgrid(cells, cells, indexing="xy")).reshape(1, 2, -1) * 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        box = self.box(f).flatten(2)
        xywh = torch.cat([self.grid + torch.tanh(box[:, :2]) * 16, torch.exp(box[:, 2:]) * 16], 1)
        return torch.cat([xywh, torch.sigmoid(self.cls(f).flatten(2))], 1)


def export(model: nn.Module, path: Path, shape: tuple[int, ...], axes: dict[int, str], name: str = "x") -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train()(torch.rand(4, *shape[1:]))  # batch norms take the statistics of random images
        torch.onnx.export(model.eval(), (torch.zeros(*shape),), path, input_names=[name], output_names=["out"],
                          dynamic_axes={name: axes}, opset_version=17, dynamo=False)  # fmt: skip
    return path


def main(out: Path) -> None:
    torch.manual_seed(0)
    yolo = export(Detector(3), out / "yolo" / "best.onnx", (1, 3, 64, 64), {}, "images")
    model = onnx.load(yolo)
    onnx.helper.set_model_props(model, {"author": "Ultralytics", "task": "detect", "stride": "16", "batch": "1",
                                        "imgsz": "[64, 64]", "names": "{0: 'cat', 1: 'cup', 2: 'rocket'}"})  # fmt: skip
    onnx.save(model, yolo)

    symbolic = {0: "batch_size", 1: "num_channels", 2: "height", 3: "width"}
    export(Classifier(4), out / "hf" / "model.onnx", (1, 3, 224, 224), symbolic, "pixel_values")
    labels = {"id2label": {str(i): name for i, name in enumerate(("tabby", "mug", "astronaut", "grass"))}}
    (out / "hf" / "config.json").write_text(json.dumps(labels, indent=1))
    processor = {"image_processor_type": "DeiTImageProcessor", "do_resize": True, "size": {"height": 256, "width": 256},
                 "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3}  # fmt: skip
    (out / "hf" / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))

    export(Classifier(5), out / "timm" / "model.onnx", (1, 3, 224, 224), {0: "N"})
    cfg = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 5}  # fmt: skip
    (out / "timm" / "pretrained_cfg.json").write_text(json.dumps(cfg, indent=1))

    export(Classifier(6, channels_last=True), out / "keras" / "model.onnx", (1, 224, 224, 3), {0: "N"})
    export(Classifier(2), out / "ocr" / "cls.onnx", (1, 3, 48, 192), {0: "N", 3: "W"})
    print(f"wrote stand-ins for ultralytics, Hugging Face, timm, Keras and PaddleOCR files to {out}/")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "deployed"))
