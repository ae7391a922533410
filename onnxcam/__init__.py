"""onnxcam: Grad-CAM on any ONNX runtime, with the class gradient grafted into the graph."""

from onnxcam.api import Explainer, Explanation, Prediction, Prepared, TargetMap
from onnxcam.errors import OnnxcamError

__all__ = ["Explainer", "Explanation", "OnnxcamError", "Prediction", "Prepared", "TargetMap"]
__version__ = "0.1.0"
