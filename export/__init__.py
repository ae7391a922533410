"""Build-time side of onnxcam: the folder ``export/``, imported as ``onnxcam_export`` (``pyproject.toml``'s
``package-dir`` maps the one to the other, so that ``import export`` never shadows another package).

``walk`` (the reverse mode), ``vjp`` (its rules), ``ops`` (the op facts), ``builder``, ``probe`` and ``graft``
need only the ``onnx`` package (and ONNX Runtime for probes); ``models`` and ``torch_export`` need PyTorch.
"""
