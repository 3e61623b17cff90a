"""ONNX Runtime sessions and ONNX model introspection (no torch)."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import onnx
import onnxruntime as ort

from sam_reuse.base.contract import (
    CONVENTION_PROPERTY,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    EMBEDDING,
    ENCODER_INPUTS,
    FIRST_ORDER_INPUTS,
    FIRST_ORDER_OUTPUTS,
    HIGH_RES_FEATURES,
)
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.imaging import SAM1

THREADS_VARIABLE = "SAM_REUSE_THREADS"
DEVICES = ("cpu", "cuda")
CPU_PROVIDERS = ["CPUExecutionProvider"]
_session_providers = CPU_PROVIDERS  # what ort_session uses unless told; set for a block by on_device


class DeviceFallbackWarning(UserWarning):
    """``--device cuda`` was asked for and this ONNX Runtime cannot do it: the CPU runs instead."""


class ThreadsCappedWarning(UserWarning):
    """More ONNX Runtime threads were asked for than this process has CPUs: the CPU count runs instead."""


def _usable_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once), from /proc/cpuinfo.

    ONNX Runtime's CPU kernels gain little from a core's second hardware thread, so this is the default.
    """
    allowed = _usable_cpus()
    cores = set()
    try:
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "processor" in fields and int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
    except (OSError, ValueError):
        pass
    return max(1, len(cores) or len(allowed))


def default_threads() -> int:
    """``$SAM_REUSE_THREADS`` (``--threads`` sets it), else every physical core."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return physical_cores()
    if not value.isdigit() or int(value) < 1:
        raise SamReuseError(f"{THREADS_VARIABLE}={value!r}: expected a number of threads, 1 or more")
    usable = len(_usable_cpus())
    if int(value) > usable:  # spinning threads past the CPUs slow every run (64 threads on 2 CPUs: 20x)
        if value not in _capped:
            _capped.add(value)
            warnings.warn(ThreadsCappedWarning(f"{THREADS_VARIABLE}={value} (or --threads): more threads than the "
                                               f"{usable} CPUs this process may use; {usable} run"), stacklevel=2)
        return usable
    return int(value)


_capped: set[str] = set()  # thread counts already warned about


def execution_providers(device: str) -> list[str]:
    """ONNX Runtime's providers for a device: CUDA (onnxruntime-gpu) with the CPU behind it, or the CPU alone.

    Without a CUDA execution provider (the plain ``onnxruntime`` wheel, or no GPU), ``cuda`` warns once and
    falls back to the CPU: a tune asked to run on the GPU still finishes, and says where it ran.
    """
    if device not in DEVICES:
        raise SamReuseError(f"--device {device}: choose from {', '.join(DEVICES)}")
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", *CPU_PROVIDERS]
        warnings.warn(DeviceFallbackWarning(
            "--device cuda: this ONNX Runtime has no CUDA execution provider (pip install 'sam-reuse[gpu]' "
            "installs onnxruntime-gpu in place of onnxruntime); running on the CPU"), stacklevel=2)
    return CPU_PROVIDERS


@contextlib.contextmanager
def on_device(device: str) -> Iterator[list[str]]:
    """Sessions that ``ort_session`` opens in the block run on ``device``; yields the providers in force."""
    global _session_providers
    previous, _session_providers = _session_providers, execution_providers(device)
    try:
        yield _session_providers
    finally:
        _session_providers = previous


def active_providers() -> list[str]:
    """The providers sessions open with now (recorded in reports: where a tune actually ran)."""
    return list(_session_providers)


def ort_session(model: str | Path | bytes, threads: int | None = None,
                providers: list[str] | None = None) -> ort.InferenceSession:
    """A session with a fixed CPU thread count (``default_threads`` unless given): reproducible timings.

    It runs on ``providers``, else on the device of the enclosing ``on_device`` block (the CPU by default).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers or _session_providers)


def load_model(path: str | Path, what: str = "ONNX model", role: str | None = None) -> onnx.ModelProto:
    """``onnx.load`` with errors that name the file and the problem.

    ``role`` ("encoder", "decoder" or "first_order", the scorer): also check the model has that exported
    model's inputs and outputs, so an encoder passed as the decoder (or the reverse) is one clear line, not an
    ONNX Runtime error minutes later.
    """
    path = Path(path)
    if path.is_dir():
        raise SamReuseError(f"{path}: is a folder, not an {what} file")
    if not path.is_file():
        raise SamReuseError(f"{path}: {what} not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends without a common base
        raise SamReuseError(f"{path}: not a readable ONNX model ({exc})") from None
    if not model.graph.node:
        raise SamReuseError(f"{path}: not an ONNX model (no graph: empty or another kind of file)")
    if role is not None:
        _check_role(path, model, role)
    return model


def _check_role(path: Path, model: onnx.ModelProto, role: str) -> None:
    """The exported encoder reads ``image`` and writes the embedding; the decoder reads the decoder inputs."""
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    expected_inputs, expected_outputs = {"encoder": (ENCODER_INPUTS, (EMBEDDING,)),
                                         "decoder": (DECODER_INPUTS, DECODER_OUTPUTS),
                                         "first_order": (FIRST_ORDER_INPUTS, FIRST_ORDER_OUTPUTS)}[role]
    if not (set(expected_inputs) <= set(inputs) and set(expected_outputs) <= set(outputs)):
        raise SamReuseError(f"{path}: not a SAM {role} exported by export-and-tune (inputs {', '.join(inputs)}; "
                            f"expected {', '.join(expected_inputs)} -> {', '.join(expected_outputs)})")


def model_convention(model: onnx.ModelProto) -> str:
    """The predictor conventions an exported model follows (``CONVENTION_PROPERTY``; ``sam`` when absent)."""
    return next((p.value for p in model.metadata_props if p.key == CONVENTION_PROPERTY), SAM1)


def check_pair(encoder: onnx.ModelProto, decoder: onnx.ModelProto, encoder_path: str | Path,
               decoder_path: str | Path) -> tuple[str, tuple[str, ...]]:
    """The pair's convention and the encoder outputs besides the embedding that the decoder reads (SAM 2's
    high-resolution features); a SAM encoder with a SAM 2 decoder, or the reverse, is one line."""
    convention = model_convention(encoder)
    if model_convention(decoder) != convention:
        raise SamReuseError(f"{decoder_path}: a decoder of a {model_convention(decoder)} export, but {encoder_path} "
                            f"is a {convention} encoder: use the encoder and decoder of one export")
    features = tuple(i.name for i in decoder.graph.input if i.name in HIGH_RES_FEATURES)
    missing = [name for name in features if name not in {o.name for o in encoder.graph.output}]
    if missing:
        raise SamReuseError(f"{decoder_path}: reads {', '.join(missing)}, which {encoder_path} does not write: use "
                            "the encoder and decoder of one export")
    return convention, features


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def onnx_io_spec(path: str | Path) -> dict[str, Any]:
    """Input/output names, element types and shapes (symbolic dims by name)."""
    model = onnx.load(str(path), load_external_data=False)
    elem = onnx.helper.tensor_dtype_to_np_dtype

    def describe(values) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": str(elem(v.type.tensor_type.elem_type)), "shape": _dims(v)} for v in values]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
