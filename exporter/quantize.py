"""INT8 encoders: ONNX Runtime static quantization (QDQ), calibrated on the user's own images.

What is quantized was chosen by measurement on real MobileSAM (benchmarks/README.md, "INT8 encoder"): the
MatMuls that multiply an activation by a weight (the transformer's linear layers) take int8 weights, per
output channel, and uint8 activations whose ranges come from the calibration images (MinMax). Two kinds of
op stay in float, each listed by node in the sidecar:

* convolutions: quantizing TinyViT's convolutional stages as well took the embedding from a cosine of 0.997
  with fp32 to 0.85 (a relative error of 0.7), the masks with it;
* MatMuls of two activations (attention scores and their product with the values): no weight to quantize
  per channel, and their ranges vary with every image.

Weights use 7 of their 8 bits (``reduce_range``). On x86 CPUs without VNNI (AVX2 only), ONNX Runtime
multiplies uint8 activations by int8 weights with an instruction whose 16-bit sums saturate: there the
full-range model drifted (a tiny encoder's embedding fell from a cosine above 0.99 with fp32 to 0.983, on
an AMD EPYC with AVX2), and the machine that runs a shipped model is not the one that quantized it.

A quantized model and its sidecar ``<model>.json`` are published together. The model must be an encoder
exported by export-and-tune (tuned or not) that is not already quantized.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Iterator, Sequence

import onnx
from onnxruntime import __version__ as ort_version
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from sam_reuse.base.contract import INT8_SIDECAR_FORMAT
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import (
    ENCODER_KIND,
    as_seen_from,
    check_output_file,
    refuse_overwriting,
    sha256_file,
    sidecar_path,
    staged_outputs,
    write_json,
)
from sam_reuse.base.imaging import load_image_rgb, preprocess
from sam_reuse.base.records import Record
from sam_reuse.base.runtime import load_model
from sam_reuse.exporter.verify import INT8_MEAN_ATOL, compare_int8

QUANTIZED_NODES = "MatMul with a weight operand"
QUANTIZED_MARKERS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                     "ConvInteger", "DynamicQuantizeLinear"}


def int8_name(onnx_path: str | Path) -> Path:
    """``encoder.tuned.onnx`` -> ``encoder.tuned.int8.onnx`` beside it."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.name.removesuffix('.onnx')}.int8.onnx")


def _weight_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and constants, and what reshaping them yields: the tensors a MatMul can take as weights."""
    weights = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.op_type in ("Transpose", "Reshape", "Cast", "Unsqueeze")
                                          and node.input and node.input[0] in weights):
            weights.update(node.output)
    return weights


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """The MatMuls that take a weight: the nodes quantized."""
    weights = _weight_tensors(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]


def float_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The nodes that stay in float, by reason (see the module docstring)."""
    weights = _weight_tensors(model)
    return {"Conv (accuracy)": [n.name for n in model.graph.node if n.op_type == "Conv"],
            "MatMul of two activations (no weight)": [n.name for n in model.graph.node if n.op_type == "MatMul"
                                                      and not any(i in weights for i in n.input)]}


class _Calibration(CalibrationDataReader):
    """ONNX Runtime's calibration reader over records: each image preprocessed exactly as deployment does."""

    def __init__(self, records: Sequence[Record], progress: bool):
        from tqdm import tqdm

        self._images: Iterator[Record] = iter(tqdm(records, desc="calibrate int8", unit="img", disable=not progress))

    def get_next(self) -> dict[str, Any] | None:
        record = next(self._images, None)
        return None if record is None else {"image": preprocess(load_image_rgb(record.image))}


def quantize_weight_matmuls(source: Path, destination: Path, calibration: CalibrationDataReader,
                            keep_float: dict[str, list[str]]) -> None:
    """The QDQ recipe of the module docstring: ``source``'s weight MatMuls in int8 at ``destination``, activation
    ranges from ``calibration``'s feeds, the nodes of ``keep_float`` in float. Writes a temporary file beside
    ``destination`` (a staging folder's)."""
    prepared = destination.with_name(f".prepared.{destination.name}")
    # An encoder saved with external data (required over 2 GB) keeps it: the preprocessed copy and the result
    # are written the same way, each with its data file beside it.
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(source), load_external_data=False).graph.initializer)
    try:
        quant_pre_process(onnx.load(str(source)) if external else str(source), str(prepared),
                          skip_symbolic_shape=True, save_as_external_data=external, all_tensors_to_one_file=True,
                          external_data_location=f"{prepared.name}.data")
        quantize_static(str(prepared), str(destination), calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                        op_types_to_quantize=["MatMul"], use_external_data_format=external,
                        nodes_to_exclude=[name for names in keep_float.values() for name in names])
    finally:
        prepared.unlink(missing_ok=True)
        prepared.with_name(f"{prepared.name}.data").unlink(missing_ok=True)


def latency_ratio(fp32: str | Path, int8: str | Path, record: Record, rounds: int = 5) -> float:
    """INT8 over fp32 encoder time on one image, ONNX Runtime CPU: the median of interleaved rounds' ratios."""
    from sam_reuse.base.runtime import ort_session
    from sam_reuse.base.timing import interleaved_times, median_ratio

    feed = {"image": preprocess(load_image_rgb(record.image))}
    sessions = {"fp32": ort_session(fp32, providers=["CPUExecutionProvider"]),
                "int8": ort_session(int8, providers=["CPUExecutionProvider"])}
    times = interleaved_times({name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}, rounds)
    return median_ratio(times, "int8", "fp32")


def quantize_encoder(onnx_path: str | Path, records: Sequence[Record], out: str | Path | None = None,
                     progress: bool = True, compare_on: Sequence[Record] = ()) -> dict[str, Any]:
    """Write the INT8 (QDQ) encoder of ``onnx_path`` calibrated on ``records``' images, and its sidecar.

    ``compare_on``: images polygraphy compares the INT8 encoder with ``onnx_path`` on before it is published
    (sidecar ``polygraphy``; ``exporter.verify.compare_int8``). Returns the sidecar. Checks everything before
    the calibration starts: the model's role, that it is not quantized already, the output path, and that
    there are calibration images.
    """
    onnx_path = Path(onnx_path)
    out = Path(out) if out is not None else int8_name(onnx_path)
    model = load_model(onnx_path, "encoder ONNX", role="encoder")
    already = sorted({n.op_type for n in model.graph.node} & QUANTIZED_MARKERS)
    if already:
        raise SamReuseError(f"{onnx_path}: already quantized (it has {', '.join(already)} nodes); "
                            "quantize the float encoder")
    refuse_overwriting(out, onnx_path)
    refuse_overwriting(sidecar_path(out), onnx_path, option="--out (its sidecar)")
    check_output_file(out, "--out", kind=ENCODER_KIND)  # never over a decoder or a record
    check_output_file(sidecar_path(out), "--out (its sidecar)", kind=INT8_SIDECAR_FORMAT)
    if not records:
        raise SamReuseError("no calibration images: INT8 ranges come from the calibration split's images")
    kept = float_nodes(model)

    with staged_outputs(out.parent) as staging:
        quantize_weight_matmuls(onnx_path, staging / out.name, _Calibration(records, progress), kept)
        compared = compare_int8(onnx_path, staging / out.name, compare_on).to_json() if compare_on else None
        sidecar = {"format": INT8_SIDECAR_FORMAT,
                   "source_onnx": as_seen_from(out.parent, onnx_path),
                   "source_onnx_sha256": sha256_file(onnx_path),
                   "quantized": QUANTIZED_NODES, "weights": "int8 (7-bit range), symmetric, per output channel",
                   "activations": "uint8, asymmetric, per tensor, MinMax over the calibration images",
                   "quantized_nodes": quantized_nodes(model),
                   "float_nodes": kept,
                   "calibration_images": [r.key for r in records],
                   **({"polygraphy": {**compared, "passes_when": f"mean |diff| <= {INT8_MEAN_ATOL}"}}
                      if compared else {}),
                   "onnxruntime_version": ort_version, "python": platform.python_version()}
        write_json(staging / sidecar_path(out).name, sidecar)
    return sidecar
