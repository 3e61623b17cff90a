"""Export SAM-family checkpoints to verified ONNX, build TensorRT engines, and run both (``sam_reuse.exporter``).

Importing this package does not import torch: only ``onnx_export``, ``models``
and ``wrappers`` need it, and they import it themselves.
"""
