"""Image + prompt -> mask with an encoder and a decoder on ONNX Runtime or as TensorRT engines.

Both back ends share ``sam_reuse.base.imaging`` (the single pre/post-processing),
so a mask differs between them only by what the networks compute:

    model = SamModel.from_onnx("out/demo/encoder.tuned.onnx", "out/demo/decoder.onnx")
    model = SamModel.from_engines("out/demo/encoder.tuned.fp16.engine", "out/demo/decoder.fp16.engine")  # GPU
    prediction = model.predict(load_image_rgb("photo.jpg"), Prompt(points=np.array([[420, 310]])))

Several prompts on one image (``predict_many``) go in one decoder call per point count with an app decoder
(``export --app-decoders``: one embedding, K prompts; the multimask one returns SAM's three masks per
prompt), and one call per prompt with the search's ``decoder.onnx`` (embedding b paired with prompt b).

Engines run through polygraphy's ``TrtRunner`` (TensorRT, or TensorRT-RTX
when the engine's sidecar says so; that needs the ``tensorrt-rtx`` package
polygraphy imports) and need an NVIDIA GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sam_reuse.base.contract import EMBEDDING, SAM2_ENCODER_OUTPUTS, decoder_feeds, high_res_maps
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.imaging import (
    SAM1,
    SAM2,
    Upscaling,
    groups_by_point_count,
    preprocess,
    prompt_arrays,
)
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


def shares_embedding(embedding_shape: Sequence[int | str]) -> bool:
    """Whether a decoder with this ``image_embeddings`` shape is an app decoder (one embedding for K prompts):
    its first dimension is fixed at 1 (in ONNX, and -1 vs 1 in an engine's sidecar)."""
    return embedding_shape[0] == 1


class SamModel:
    """SAM's (or SAM 2's) encoder and decoder behind any runner, with its predictor's pre/post-processing.

    ``shared_embedding``: the decoder is an app decoder, which takes one image's encoder outputs and K prompts
    per call. ``convention``: how images and prompts are framed (``sam_reuse.base.imaging``; ``sam2`` for SAM 2
    exports, whose decoder also reads the encoder's two high-resolution feature maps).
    """

    def __init__(self, encoder: Runner, decoder: Runner, shared_embedding: bool = False, convention: str = SAM1):
        self.encoder, self.decoder, self.shared_embedding = encoder, decoder, shared_embedding
        self.convention = convention
        self.features = SAM2_ENCODER_OUTPUTS if convention == SAM2 else (EMBEDDING,)
        self._upscalings: dict[tuple[int, int], Upscaling] = {}  # per image size: its matrices, made once

    def _upscaling(self, hw: tuple[int, int]) -> Upscaling:
        if hw not in self._upscalings:
            self._upscalings[hw] = Upscaling(hw, convention=self.convention)
        return self._upscalings[hw]

    @classmethod
    def from_onnx(cls, encoder: str | Path, decoder: str | Path) -> SamModel:
        from sam_reuse.base.runtime import check_pair, load_model, onnx_io_spec

        convention, _ = check_pair(load_model(encoder, "encoder", role="encoder"),
                                   load_model(decoder, "decoder", role="decoder"), encoder, decoder)
        shape = next(i["shape"] for i in onnx_io_spec(decoder)["inputs"] if i["name"] == EMBEDDING)
        return cls(onnx_runner(encoder), onnx_runner(decoder), shares_embedding(shape), convention)

    @classmethod
    def from_engines(cls, encoder: str | Path, decoder: str | Path) -> SamModel:
        from sam_reuse.exporter.engine import read_sidecar

        sidecar = read_sidecar(decoder)
        shape = next(i["shape"] for i in sidecar["inputs"] if i["name"] == EMBEDDING)
        return cls(engine_runner(encoder), engine_runner(decoder), shares_embedding(shape),
                   sidecar.get("convention", SAM1))

    def embed(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """HxWx3 uint8 RGB -> what the decoder reads from the encoder, by name: the 1x256x64x64
        ``image_embeddings`` (and SAM 2's two ``high_res_feats``)."""
        outputs = self.encoder({"image": preprocess(image, convention=self.convention)})
        return {name: outputs[name] for name in self.features}

    def predict(self, image: np.ndarray, prompt: Prompt, features: dict[str, np.ndarray] | None = None
                ) -> Prediction:
        """The decoder's first mask for ``prompt`` (with ``decoder.onnx``: the single mask of
        ``SamPredictor.predict(multimask_output=False)``, or ``SAM2ImagePredictor``'s)."""
        return self.predict_many(image, [prompt], features)[0][0]

    def predict_many(self, image: np.ndarray, prompts: Sequence[Prompt], features: dict[str, np.ndarray] | None = None
                     ) -> list[list[Prediction]]:
        """Per prompt, the decoder's masks: one (single-mask decoders) or three (the multimask one).

        The image is encoded once (or ``features``, from ``embed``, are used); prompts are decoded together
        where the decoder allows (see the module docstring) and returned in the order given.
        """
        features = self.embed(image) if features is None else features
        hw = image.shape[:2]
        arrays = [prompt_arrays(prompt, hw, convention=self.convention) for prompt in prompts]
        results: list[list[Prediction]] = [[] for _ in prompts]
        for group in groups_by_point_count(arrays, None if self.shared_embedding else 1):
            coords = np.concatenate([arrays[k][0] for k in group])
            labels = np.concatenate([arrays[k][1] for k in group])
            outputs = self.decoder(decoder_feeds(features[EMBEDDING], coords, labels, high_res=high_res_maps(features)))
            masks, scores = outputs["low_res_masks"], outputs["iou_predictions"]
            for row, k in enumerate(group):
                results[k] = [Prediction(mask=self._upscaling(hw).mask(low_res),
                              low_res_logits=low_res, iou_prediction=float(score))
                              for low_res, score in zip(masks[row], scores[row])]
        return results
