"""Check a tuned encoder against its exact reference with polygraphy's Comparator.

The reference is the original encoder with the reuse map applied by
``gather`` (a copy of channels, exact by construction); the candidate is the
model that ships (``fold`` or ``prune`` where ``auto`` chose them). Both run
on ONNX Runtime over real preprocessed calibration images and polygraphy
compares every output. The reuse map comes from the tuned model's metadata
(``apply_reuse_map`` records it) unless given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import onnx

from sam_reuse.base.contract import REUSE_MAP_PROPERTY
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.imaging import SAM1, load_image_rgb, preprocess, prompt_arrays
from sam_reuse.base.records import Record, Sample
from sam_reuse.base.runtime import load_model, model_convention
from sam_reuse.graphops.reuse_map import ReuseMap
from sam_reuse.graphops.rewrites import apply_reuse_map

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
# engine vs ONNX Runtime, per engine precision: (atol, rtol)
ENGINE_TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2)}
INT8_MEAN_ATOL = 0.05  # mean |diff| of an INT8 encoder's embedding against fp32


@dataclass
class VerifyResult:
    passed: bool
    images: int
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)  # worst case over images

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "images": self.images, "outputs": self.outputs}


def embedded_reuse_map(model: onnx.ModelProto, source: str) -> ReuseMap:
    """The reuse map recorded in a tuned model's metadata."""
    for prop in model.metadata_props:
        if prop.key == REUSE_MAP_PROPERTY:
            return ReuseMap.from_json(json.loads(prop.value), source=f"{source} metadata")
    raise SamReuseError(f"{source}: no reuse map in the model's metadata; pass --reuse-map")


def verify_tuned(original: str | Path, tuned: str | Path, records: Sequence[Record],
                 reuse_map: str | Path | None = None, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL) -> VerifyResult:
    """Compare ``tuned`` with ``original`` + the map by gather, output by output, on ``records``' images."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    if not records:
        raise SamReuseError("verify needs at least one image")
    tuned_model = load_model(tuned)
    mapping = ReuseMap.load(reuse_map) if reuse_map else embedded_reuse_map(tuned_model, str(tuned))
    reference, _ = apply_reuse_map(load_model(original), mapping, strategy="gather")
    feeds = encoder_inputs(records, model_convention(tuned_model))
    runners = [OnnxrtRunner(SessionFromOnnx(reference.SerializeToString(), providers=["cpu"]), name="reference"),
               OnnxrtRunner(SessionFromOnnx(tuned_model.SerializeToString(), providers=["cpu"]), name="tuned")]
    return _compare(runners, feeds, atol, rtol)


def _compare(runners: list, feeds: list[dict[str, Any]], atol: float, rtol: float, error_stat: str = "elemwise"
             ) -> VerifyResult:
    """polygraphy: run both runners on ``feeds``, compare every output; worst max and mean |diff| per output.

    ``error_stat`` is what the tolerances bound (polygraphy's ``check_error_stat``): every element, or the mean.
    """
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
            atol=atol, rtol=rtol, check_error_stat=error_stat))[0]
    outputs: dict[str, dict[str, float]] = {}
    for per_image in accuracy[(runners[0].name, runners[1].name)]:
        for name, compared in per_image.items():
            worst = outputs.setdefault(name, {"max_abs_diff": 0.0, "mean_abs_diff": 0.0})
            worst["max_abs_diff"] = max(worst["max_abs_diff"], float(compared.max_absdiff))
            worst["mean_abs_diff"] = max(worst["mean_abs_diff"], float(compared.mean_absdiff))
    return VerifyResult(passed=bool(accuracy), images=len(feeds), outputs=outputs)


def compare_int8(fp32: str | Path, int8: str | Path, records: Sequence[Record]) -> VerifyResult:
    """polygraphy: an INT8 encoder against its fp32 source on real images. It passes when the mean |diff| of
    every image's embedding is within ``INT8_MEAN_ATOL`` (int8 is not meant to agree element by element)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    runners = [OnnxrtRunner(SessionFromOnnx(str(fp32), providers=["cpu"]), name="fp32"),
               OnnxrtRunner(SessionFromOnnx(str(int8), providers=["cpu"]), name="int8")]
    return _compare(runners, encoder_inputs(records), INT8_MEAN_ATOL, 0.0, error_stat="mean")


def encoder_inputs(records: Sequence[Record], convention: str = SAM1) -> list[dict[str, Any]]:
    """``{"image": 1x3x1024x1024}`` per record: real preprocessed images, what deployment feeds."""
    return [{"image": preprocess(load_image_rgb(r.image), convention=convention)} for r in records]


def decoder_inputs(samples: Sequence[Sample], encoder: str | Path) -> list[dict[str, Any]]:
    """Decoder inputs per sample: what ``encoder`` (ONNX) computes for its image (the embedding, and SAM 2's
    high-resolution features), and its prompt, framed by the encoder's convention."""
    from sam_reuse.base.contract import EMBEDDING, HIGH_RES_FEATURES, decoder_feeds
    from sam_reuse.base.runtime import ort_session

    model = load_model(encoder, "encoder ONNX", role="encoder")
    convention = model_convention(model)
    outputs = [EMBEDDING, *(o.name for o in model.graph.output if o.name in HIGH_RES_FEATURES)]
    session = ort_session(model.SerializeToString())
    feeds = []
    for sample, image in zip(samples, encoder_inputs([s.record for s in samples], convention)):
        embedding, *features = session.run(outputs, image)
        feeds.append({**decoder_feeds(embedding, *prompt_arrays(sample.prompt, sample.hw, convention=convention)),
                      **dict(zip(outputs[1:], features))})
    return feeds


def _engine_feeds(sidecar: dict[str, Any], engine: Path, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Real inputs for an engine: images for an encoder; embeddings (from encoder.onnx beside it) and prompts."""
    from sam_reuse.exporter.engine import source_onnx

    if [i["name"] for i in sidecar["inputs"]] == ["image"]:
        source = load_model(source_onnx(engine, sidecar), "engine's source ONNX")
        return encoder_inputs([s.record for s in samples], model_convention(source))
    encoder_path = source_onnx(engine, sidecar).with_name("encoder.onnx")
    if not encoder_path.is_file():
        raise SamReuseError(f"{engine}: decoder engine, but no {encoder_path} to compute embeddings with")
    return decoder_inputs(samples, encoder_path)


def verify_engine(engine: str | Path, samples: Sequence[Sample]) -> VerifyResult:
    """A TensorRT engine against its source ONNX on ONNX Runtime (polygraphy), with the precision's tolerances.

    Needs an NVIDIA GPU: engines are finished for, and run on, the GPU.
    """
    from sam_reuse.exporter.engine import gpu_available, read_sidecar, source_onnx

    engine = Path(engine)
    sidecar = read_sidecar(engine)
    if not gpu_available():
        raise SamReuseError(f"{engine}: comparing an engine with ONNX Runtime needs an NVIDIA GPU (none found)")
    from polygraphy import config

    config.USE_TENSORRT_RTX = sidecar["backend"] == "tensorrt-rtx"  # read when backend.trt is first imported
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    atol, rtol = ENGINE_TOLERANCES[sidecar["precision"]]
    feeds = _engine_feeds(sidecar, engine, samples)
    runners = [OnnxrtRunner(SessionFromOnnx(str(source_onnx(engine, sidecar)), providers=["cpu"]), name="onnxrt"),
               TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="engine")]
    return _compare(runners, feeds, atol, rtol)
