"""Build-time side of onnxcam (import name ``onnxcam_export``).

``graft``, ``builder`` and ``vjp`` need only the ``onnx`` package; ``models`` and
``torch_export`` need PyTorch.
"""
