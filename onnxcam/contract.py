"""The onnxcam graph contract: names and metadata shared by the exporter and the runtime.

One ``.onnx`` file is the whole explainer:

inputs
    ``image``           uint8 ``[N, H, W, 3]``, RGB, already resized to ``H x W``; the
                        normalisation (mean/std, layout) happens inside the graph.
    ``targets``         int64 ``[N, T]``: ``c >= 0`` asks for class ``c``; ``-k`` asks for
                        the k-th highest-scoring class of that image (``-1`` = top-1), so
                        top-k explanations need no second call.
    ``full_gradients``  bool scalar, default ``False``. The per-channel weights never need
                        it; set it when a method needs the full gradient tensor.
    ``head_activations`` float ``[M, C, h, w]``, default empty: activations to send through
                        the head alone (target layer -> logits), e.g. with channels ablated.
                        The head runs only when ``run_head`` (bool, default ``False``) is
                        set; with an empty ``image`` batch the backbone costs nothing.
outputs
    ``logits``          float ``[N, K]``
    ``activations``     float ``[N, C, h, w]``  (the target layer)
    ``weights``         float ``[N, T, C]``: spatial mean of d logit / d activations
    ``gradients``       float ``[N, T, C, h, w]`` when ``full_gradients`` is true, else
                        an empty ``[N, T, C, 0, 0]``
    ``target_classes``  int64 ``[N, T]``: the class each target row explains
    ``head_logits``     float ``[M, K]``: the head's logits for ``head_activations``
"""

from __future__ import annotations

CONTRACT_VERSION = "1"

IMAGE = "image"
TARGETS = "targets"
FULL_GRADIENTS = "full_gradients"
HEAD_ACTIVATIONS = "head_activations"
RUN_HEAD = "run_head"

LOGITS = "logits"
ACTIVATIONS = "activations"
WEIGHTS = "weights"
GRADIENTS = "gradients"
TARGET_CLASSES = "target_classes"
HEAD_LOGITS = "head_logits"
OUTPUTS = (LOGITS, ACTIVATIONS, WEIGHTS, GRADIENTS, TARGET_CLASSES)

# metadata_props keys (values are strings; lists are JSON)
META_PREFIX = "onnxcam."
META_KEYS = (
    "contract",  # CONTRACT_VERSION
    "arch",  # e.g. "vgg16"
    "weights",  # where the weights came from, e.g. "imagenet (torchvision vgg16-397923af.pth)"
    "layer",  # the target layer, as the user named it, and the tensor name
    "input_size",  # JSON [H, W]
    "channel_order",  # "RGB": the order of the last axis of `image`
    "mean",  # JSON [r, g, b], on the 0..1 scale, applied inside the graph
    "std",  # JSON [r, g, b], on the 0..1 scale, applied inside the graph
    "labels",  # JSON list of K class names
    "weights_path",  # how `weights` is computed: "presummed" or "gradient-mean"
)
OPTIONAL_META_KEYS = ("notes",)  # free text: what the exporter assumed or changed
