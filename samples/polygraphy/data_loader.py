"""polygraphy data loader: real preprocessed calibration images (and prompts) instead of random inputs.

    polygraphy run out/demo/encoder.tuned.onnx --onnxrt \
        --data-loader-script samples/polygraphy/data_loader.py:load_encoder_data
    SAM_REUSE_ENCODER=out/demo/encoder.onnx polygraphy run out/demo/decoder.onnx --onnxrt \
        --data-loader-script samples/polygraphy/data_loader.py:load_decoder_data

Random inputs exercise a model far from where it is used (SAM's encoder
sees normalised images, its decoder real embeddings and prompts), so
accuracy checks feed what deployment feeds. Environment:

- ``SAM_REUSE_DATA``: calibration folder (default: the bundled CC0 isic2016 images);
- ``SAM_REUSE_IMAGES``: how many records to yield (default 2);
- ``SAM_REUSE_ENCODER``: the encoder ONNX whose embeddings feed the decoder
  (``load_decoder_data`` only; default ``out/demo/encoder.onnx``).

The preprocessing and prompt encoding are the project's own
(``exporter.imaging``), the same code the ONNX path and the tuner use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from calibrate.data import load_sample, read_records
from exporter.imaging import load_image_rgb, preprocess, prompt_arrays
from exporter.onnx_export import decoder_feeds
from exporter.runtime import ort_session

REPO = Path(__file__).resolve().parents[2]


def _samples():
    folder = Path(os.environ.get("SAM_REUSE_DATA") or REPO / "samples" / "data" / "isic2016")
    count = int(os.environ.get("SAM_REUSE_IMAGES", "2"))
    return [load_sample(record) for record in read_records(folder)[:count]]


def load_encoder_data() -> Iterator[dict[str, np.ndarray]]:
    """``{"image": 1x3x1024x1024}`` per calibration image."""
    for sample in _samples():
        yield {"image": preprocess(load_image_rgb(sample.record.image))}


def load_decoder_data() -> Iterator[dict[str, np.ndarray]]:
    """Decoder inputs per calibration image: its embedding (from ``SAM_REUSE_ENCODER``) and its prompt."""
    encoder = ort_session(os.environ.get("SAM_REUSE_ENCODER") or REPO / "out" / "demo" / "encoder.onnx")
    for sample in _samples():
        embedding = encoder.run(None, {"image": preprocess(load_image_rgb(sample.record.image))})[0]
        coords, labels = prompt_arrays(sample.prompt, sample.hw)
        yield decoder_feeds(embedding, coords, labels)
