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

from calibrate.data import Record
from exporter.errors import SamReuseError
from exporter.imaging import load_image_rgb, preprocess
from exporter.runtime import load_model
from graphops.reuse_map import ReuseMap
from graphops.rewrites import apply_reuse_map

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
MAP_PROPERTY = "sam_reuse.reuse_map"


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
        if prop.key == MAP_PROPERTY:
            return ReuseMap.from_json(json.loads(prop.value), source=f"{source} metadata")
    raise SamReuseError(f"{source}: no reuse map in the model's metadata; pass --reuse-map")


def verify_tuned(original: str | Path, tuned: str | Path, records: Sequence[Record],
                 reuse_map: str | Path | None = None, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL) -> VerifyResult:
    """Compare ``tuned`` with ``original`` + the map by gather, output by output, on ``records``' images."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    if not records:
        raise SamReuseError("verify needs at least one image")
    tuned_model = load_model(tuned)
    mapping = ReuseMap.load(reuse_map) if reuse_map else embedded_reuse_map(tuned_model, str(tuned))
    reference, _ = apply_reuse_map(load_model(original), mapping, strategy="gather")
    feeds = [{"image": preprocess(load_image_rgb(r.image))} for r in records]
    runners = [OnnxrtRunner(SessionFromOnnx(reference.SerializeToString(), providers=["cpu"]), name="reference"),
               OnnxrtRunner(SessionFromOnnx(tuned_model.SerializeToString(), providers=["cpu"]), name="tuned")]
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))[0]
    outputs: dict[str, dict[str, float]] = {}
    for per_image in accuracy[("reference", "tuned")]:
        for name, compared in per_image.items():
            worst = outputs.setdefault(name, {"max_abs_diff": 0.0})
            worst["max_abs_diff"] = max(worst["max_abs_diff"], float(compared.max_absdiff))
    return VerifyResult(passed=bool(accuracy), images=len(feeds), outputs=outputs)
