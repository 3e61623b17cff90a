"""TensorRT engines from the exported ONNX models, with a JSON sidecar describing each.

Engines are built through polygraphy's loaders (``NetworkFromOnnxBytes``,
``CreateConfig``, ``EngineBytesFromNetwork``), which cover both backends:
standard TensorRT (module ``tensorrt``), used when installed, and TensorRT-RTX (``tensorrt_rtx_bindings`` from the
PyPI wheels ``tensorrt-rtx-cu13-bindings`` + ``tensorrt-rtx-cu13-libs``),
which compiles ahead of time on a machine without a GPU: its engines are
finished for the target GPU when they are loaded there.

Precision: TensorRT-RTX (and TensorRT >= 9.1 with strongly typed networks)
takes precision from the ONNX types, so ``fp16`` converts the ONNX to half
precision first, keeping LayerNorm (also the decomposed LayerNorm2d of the
neck, as a whole chain) and Softmax in fp32 - an all-fp16 SAM encoder
overflows there. Inputs and outputs stay fp32. A TensorRT without
strongly typed networks gets the fp32 ONNX and its FP16 builder flag.
``fp32`` turns TF32 off, so an fp32 engine computes in fp32. An engine and
its sidecar are published together or not at all.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import onnx

from sam_reuse.base.contract import ENGINE_SIDECAR_FORMAT
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import as_seen_from, sha256_file, sidecar_path, staged_outputs, write_json

PRECISIONS = ("fp32", "fp16")
BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
FP32_OPS = ["LayerNormalization", "Softmax"]
ENABLE_HINT = ("TensorRT engines need TensorRT or TensorRT-RTX: pip install 'sam-reuse[trt]' "
               "(TensorRT-RTX from PyPI; builds engines without a GPU)")
_MODULES = {"tensorrt": ["tensorrt"], "tensorrt-rtx": ["tensorrt_rtx_bindings", "tensorrt_rtx"]}


@dataclass(frozen=True)
class Backend:
    name: str  # "tensorrt" or "tensorrt-rtx"
    trt: ModuleType

    @property
    def version(self) -> str:
        return str(getattr(self.trt, "__version__", "unknown"))

    @property
    def strongly_typed(self) -> bool:
        """Precision comes from the ONNX types (TensorRT-RTX always; TensorRT when it has the flag)."""
        return self.name == "tensorrt-rtx" or hasattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def load_backend(name: str = "auto") -> Backend:
    """The TensorRT flavour to build with; ``auto`` prefers standard TensorRT, then TensorRT-RTX."""
    if name not in BACKENDS:
        raise SamReuseError(f"unknown TensorRT backend '{name}' (choose from {', '.join(BACKENDS)})")
    for candidate in (["tensorrt", "tensorrt-rtx"] if name == "auto" else [name]):
        for module in _MODULES[candidate]:
            try:
                return Backend(candidate, importlib.import_module(module))
            except ImportError:
                continue
    raise SamReuseError(ENABLE_HINT if name == "auto" else f"backend '{name}' is not installed. {ENABLE_HINT}")


def gpu_available() -> bool:
    """Whether an NVIDIA driver with at least one GPU is present (engines can only run there)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    """``MIN:OPT:MAX`` (or one number for all three) -> a validated (min, opt, max)."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        low, opt, high = (int(p) for p in parts)
    except ValueError:
        raise SamReuseError(f"{what} '{text}': expected MIN:OPT:MAX or one number") from None
    if len(parts) != 3 or not 1 <= low <= opt <= high:
        raise SamReuseError(f"{what} '{text}': need 1 <= MIN <= OPT <= MAX")
    return low, opt, high


def input_profile(model: onnx.ModelProto, batch: tuple[int, int, int] = (1, 1, 1),
                  points: tuple[int, int, int] = (1, 2, 16)) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input: the first symbolic dim is the batch, later ones the point count."""
    profile = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        shapes: list[list[int]] = [[], [], []]
        for position, dim in enumerate(dims):
            if dim.dim_value > 0:
                fixed = (dim.dim_value,) * 3
            elif position == 0:
                fixed = batch
            else:
                fixed = points
            for which in range(3):
                shapes[which].append(fixed[which])
        profile[value.name] = tuple(tuple(s) for s in shapes)
    return profile


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Half-precision weights and activations; fp32 inputs/outputs, LayerNorms and softmaxes.

    Written-out LayerNorms are fused into ``LayerNormalization`` first (``graphops.fuse``), so they can be
    kept fp32 as a whole.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from sam_reuse.graphops.fuse import fuse_decomposed_layernorm
    from sam_reuse.graphops.graph import finalize, load_graph

    graph = load_graph(model)
    fuse_decomposed_layernorm(graph)
    converted = convert_float_to_float16(finalize(graph), keep_io_types=True,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST + FP32_OPS)
    return finalize(load_graph(converted))  # the converter leaves nodes unsorted


def _compute_capability(trt: ModuleType, text: str):
    name = "SM" + text.replace(".", "")
    value = getattr(trt.ComputeCapability, name, None)
    if value is None:
        known = [n[2:] for n in dir(trt.ComputeCapability) if n.startswith("SM")]
        raise SamReuseError(f"compute capability '{text}' is not a target of this TensorRT-RTX (known: "
                            f"{', '.join(f'{k[:-1]}.{k[-1]}' for k in known)})")
    return value


def _io(trt: ModuleType, network, profile: dict[str, tuple[tuple[int, ...], ...]]) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes, shapes (-1: dynamic) and the profile's min/opt/max of the engine's bindings."""
    def describe(tensor) -> dict[str, Any]:
        return {"name": tensor.name, "dtype": np.dtype(trt.nptype(tensor.dtype)).name, "shape": list(tensor.shape)}

    inputs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        low, opt, high = profile[tensor.name]
        inputs.append({**describe(tensor), "min": list(low), "opt": list(opt), "max": list(high)})
    return {"inputs": inputs, "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)]}


def _build_with_polygraphy(backend: Backend, source: onnx.ModelProto, onnx_path: Path, precision: str,
                           typed_fp16: bool, profile_shapes: dict[str, tuple[tuple[int, ...], ...]],
                           compute_capabilities: tuple[str, ...]) -> tuple[Any, bytes]:
    """(network, serialized engine) built by polygraphy's loaders, for standard TensorRT and TensorRT-RTX alike.

    What polygraphy's ``CreateConfig`` does not cover, the TensorRT-RTX target GPUs, is set in a
    ``PostprocessConfig`` hook.
    """
    from polygraphy import config as polygraphy_config

    polygraphy_config.USE_TENSORRT_RTX = backend.name == "tensorrt-rtx"  # read when backend.trt is first imported
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxBytes,
        PostprocessConfig,
        Profile,
    )
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    trt = backend.trt
    profile = Profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.add(name, low, opt, high)

    def targets(builder, network, config) -> None:
        if compute_capabilities:
            config.num_compute_capabilities = len(compute_capabilities)
            for i, text in enumerate(compute_capabilities):
                config.set_compute_capability(_compute_capability(trt, text), i)

    verbose = bool(os.environ.get("SAM_REUSE_TRT_VERBOSE"))
    strongly_typed = backend.name == "tensorrt" and backend.strongly_typed and typed_fp16
    with G_LOGGER.verbosity(G_LOGGER.VERBOSE if verbose else G_LOGGER.ERROR):
        try:
            network = NetworkFromOnnxBytes(source.SerializeToString(), strongly_typed=strongly_typed or None)()
        except PolygraphyException as exc:
            raise SamReuseError(f"{onnx_path}: {backend.name} cannot parse it: {_first_line(exc)}") from None
        config = PostprocessConfig(CreateConfig(tf32=False, fp16=precision == "fp16" and not typed_fp16,
                                                profiles=[profile]), targets)
        try:
            with warnings.catch_warnings():  # polygraphy sets a timing cache, a no-op TensorRT-RTX deprecates
                warnings.filterwarnings("ignore", message=".*Timing cache operations are no-ops",
                                        category=DeprecationWarning)
                serialized = EngineBytesFromNetwork(network, config)()
        except PolygraphyException as exc:
            raise SamReuseError(f"{onnx_path}: {backend.name} could not build an engine ({precision}): "
                                f"{_first_line(exc)}; rerun with SAM_REUSE_TRT_VERBOSE=1 for the builder log") from None
    return network[1], bytes(serialized)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp32",
                 batch: tuple[int, int, int] = (1, 1, 1), points: tuple[int, int, int] = (1, 2, 16),
                 compute_capabilities: tuple[str, ...] = (), backend: Backend | None = None) -> dict[str, Any]:
    """Build ``engine_path`` (and ``<engine>.json``) from an ONNX model; returns the sidecar.

    Both files are written atomically; on any failure neither is touched.
    """
    if precision not in PRECISIONS:
        raise SamReuseError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    from sam_reuse.base.runtime import load_model, model_convention

    model = load_model(onnx_path, "ONNX model")
    backend = backend or load_backend()
    trt = backend.trt
    if compute_capabilities and backend.name != "tensorrt-rtx":
        raise SamReuseError("--compute-capability applies to TensorRT-RTX only (standard TensorRT builds for "
                            "the GPU it runs on)")
    typed_fp16 = precision == "fp16" and backend.strongly_typed
    source = to_fp16(model) if typed_fp16 else model
    profile_shapes = input_profile(model, batch, points)

    started = time.perf_counter()
    network, serialized = _build_with_polygraphy(backend, source, onnx_path, precision, typed_fp16, profile_shapes,
                                                 compute_capabilities)
    build_s = time.perf_counter() - started

    sidecar = {"format": ENGINE_SIDECAR_FORMAT, "backend": backend.name, "backend_version": backend.version,
               "precision": precision, "fp16_by": ("onnx types" if typed_fp16 else "builder flag") if precision == "fp16" else None,
               "fp32_ops": FP32_OPS if typed_fp16 else [],
               "compute_capabilities": list(compute_capabilities) or ("portable default" if backend.name == "tensorrt-rtx" else "build GPU"),
               "convention": model_convention(model),
               "source_onnx": as_seen_from(engine_path.parent, onnx_path),
               "source_onnx_sha256": sha256_file(onnx_path),
               **_io(trt, network, profile_shapes), "build_s": round(build_s, 2)}
    sidecar["engine_bytes"] = len(serialized)
    sidecar["engine_sha256"] = hashlib.sha256(serialized).hexdigest()
    with staged_outputs(engine_path.parent) as staging:  # the engine and its sidecar appear together
        (staging / engine_path.name).write_bytes(serialized)
        write_json(staging / sidecar_path(engine_path).name, sidecar)
    return sidecar


def source_onnx(engine_path: str | Path, sidecar: dict[str, Any]) -> Path:
    """The ONNX an engine was built from (a bare name in the sidecar means: beside the engine)."""
    source = Path(engine_path).parent / sidecar["source_onnx"]
    if not source.is_file():
        raise SamReuseError(f"{engine_path}: its source ONNX {source} is gone (the sidecar names it)")
    return source


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """An engine's sidecar, or one line saying why it cannot be read."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise SamReuseError(f"{engine_path}: no sidecar {path.name} (build engines with export-and-tune)")
    try:
        sidecar = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SamReuseError(f"{path}: not a valid engine sidecar ({exc})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != ENGINE_SIDECAR_FORMAT:
        raise SamReuseError(f"{path}: not an engine sidecar of this version (expected format {ENGINE_SIDECAR_FORMAT})")
    return sidecar


def engine_name(onnx_path: str | Path, precision: str) -> Path:
    """``encoder.tuned.onnx`` -> ``encoder.tuned.fp16.engine`` beside it."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.name.removesuffix('.onnx')}.{precision}.engine")


def build_deployment_engines(models: Sequence[str | Path], precisions: tuple[str, ...] = PRECISIONS,
                             backend: Backend | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Engines of what ``tune`` ships (the shipped encoder and the decoder) at each precision, beside each model.

    Returns (engine path, sidecar) per engine.
    """
    backend = backend or load_backend()
    built = []
    for precision in precisions:
        for model in map(Path, models):
            path = engine_name(model, precision)
            built.append((path, build_engine(model, path, precision, backend=backend)))
    return built
