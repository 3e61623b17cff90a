"""Calibration data, channel scoring and pair search on ONNX Runtime (no torch)."""
