"""Export SAM-family checkpoints to ONNX (and, later, TensorRT engines).

Importing this package does not import torch: the pre/post-processing in
``exporter.imaging`` and the file helpers are used by torch-free stages too.
"""
