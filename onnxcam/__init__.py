"""onnxcam: Grad-CAM on any ONNX runtime, with the class gradient grafted into the graph."""

from onnxcam.api import Explainer, Explanation, Prediction, TargetMap
from onnxcam.errors import OnnxcamError

__all__ = ["Explainer", "Explanation", "OnnxcamError", "Prediction", "TargetMap"]
__version__ = "0.1.0"
