"""Image + prompt -> mask with an encoder and a decoder on ONNX Runtime or as TensorRT engines.

Both back ends share ``sam_reuse.base.imaging`` (the single pre/post-processing),
so a mask differs between them only by what the networks compute:

    model = SamModel.from_onnx("out/demo/encoder.tuned.onnx", "out/demo/decoder.onnx")
    model = SamModel.from_engines("out/demo/encoder.tuned.fp16.engine", "out/demo/decoder.fp16.engine")  # GPU
    prediction = model.predict(load_image_rgb("photo.jpg"), Prompt(points=np.array([[420, 310]])))

Engines run through polygraphy's ``TrtRunner`` (TensorRT, or TensorRT-RTX
when the engine's sidecar says so; that needs the ``tensorrt-rtx`` package
polygraphy imports) and need an NVIDIA GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sam_reuse.base.contract import decoder_feeds
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.imaging import logits_to_mask, preprocess, prompt_arrays, upscale_logits
from sam_reuse.base.records import Prompt
from sam_reuse.base.runtime import ort_session

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def onnx_runner(path: str | Path) -> Runner:
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def engine_runner(path: str | Path) -> Runner:
    """A TensorRT engine as a runner (activated until the process ends); needs an NVIDIA GPU."""
    from sam_reuse.base.files import sidecar_path
    from sam_reuse.exporter.engine import gpu_available

    path = Path(path)
    if not path.is_file():
        raise SamReuseError(f"{path}: engine not found")
    if not gpu_available():
        raise SamReuseError(f"{path}: running a TensorRT engine needs an NVIDIA GPU (none found); "
                            "use the ONNX models on ONNX Runtime instead")
    sidecar = json.loads(sidecar_path(path).read_text()) if sidecar_path(path).is_file() else {}
    from polygraphy import config

    config.USE_TENSORRT_RTX = sidecar.get("backend") == "tensorrt-rtx"  # read when backend.trt is first imported
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(BytesFromPath(str(path))))
    runner.activate()
    return lambda feeds: {name: np.asarray(value) for name, value in runner.infer(feeds).items()}


@dataclass
class Prediction:
    mask: np.ndarray  # HxW bool at the image's resolution
    low_res_logits: np.ndarray  # 256x256
    iou_prediction: float


class SamModel:
    """SAM's encoder and decoder behind any runner, with SamPredictor's pre/post-processing."""

    def __init__(self, encoder: Runner, decoder: Runner):
        self.encoder, self.decoder = encoder, decoder

    @classmethod
    def from_onnx(cls, encoder: str | Path, decoder: str | Path) -> SamModel:
        return cls(onnx_runner(encoder), onnx_runner(decoder))

    @classmethod
    def from_engines(cls, encoder: str | Path, decoder: str | Path) -> SamModel:
        return cls(engine_runner(encoder), engine_runner(decoder))

    def embed(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> 1x256x64x64 image embedding."""
        return self.encoder({"image": preprocess(image)})["image_embeddings"]

    def predict(self, image: np.ndarray, prompt: Prompt, embedding: np.ndarray | None = None) -> Prediction:
        """The mask for ``prompt`` (mask token 0, like ``SamPredictor.predict(multimask_output=False)``)."""
        embedding = self.embed(image) if embedding is None else embedding
        outputs = self.decoder(decoder_feeds(embedding, *prompt_arrays(prompt, image.shape[:2])))
        low_res = outputs["low_res_masks"][0, 0]
        return Prediction(mask=logits_to_mask(upscale_logits(low_res, image.shape[:2])), low_res_logits=low_res,
                          iou_prediction=float(outputs["iou_predictions"].ravel()[0]))
