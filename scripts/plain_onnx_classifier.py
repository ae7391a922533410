"""Write EfficientNet-Lite0 (ImageNet) as a *plain* ONNX classifier, the kind of file users bring.

    python scripts/plain_onnx_classifier.py your_model.onnx

The file is what torch.onnx gives for the bare network: float NCHW input, normalised outside
the graph, logits out, no onnxcam anything. It stands in for "your own model" in the
README's `onnxcam export --from` example. Needs PyTorch (the export extra).
"""

import sys
import warnings

import torch

from onnxcam_export.torch_export import ARCHS, load_weights


def main() -> None:
    arch = ARCHS["efficientnet_lite0"]
    model = arch.build().eval()
    load_weights(arch, model, "imagenet")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), sys.argv[1], dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["scores"], dynamic_axes={"input": {0: "N"}})  # fmt: skip


if __name__ == "__main__":
    main()
