"""ONNX Runtime sessions and ONNX model introspection (no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from sam_reuse.base.errors import SamReuseError

DEFAULT_THREADS = int(os.environ.get("SAM_REUSE_THREADS", "2"))


def ort_session(model: str | Path | bytes, threads: int = DEFAULT_THREADS,
                providers: list[str] | None = None) -> ort.InferenceSession:
    """A CPU session with a fixed thread count, so timings and results are reproducible."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def load_model(path: str | Path, what: str = "ONNX model") -> onnx.ModelProto:
    """``onnx.load`` with errors that name the file and the problem."""
    if not Path(path).is_file():
        raise SamReuseError(f"{path}: {what} not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends without a common base
        raise SamReuseError(f"{path}: not a readable ONNX model ({exc})") from None


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def onnx_io_spec(path: str | Path) -> dict[str, Any]:
    """Input/output names, element types and shapes (symbolic dims by name)."""
    model = onnx.load(str(path), load_external_data=False)
    elem = onnx.helper.tensor_dtype_to_np_dtype

    def describe(values) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": str(elem(v.type.tensor_type.elem_type)), "shape": _dims(v)} for v in values]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
