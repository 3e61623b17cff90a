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
  (``load_decoder_data`` only; default ``out/demo/encoder.onnx`` under the current folder).

The inputs come from ``sam_reuse.exporter.verify.encoder_inputs`` / ``decoder_inputs``
(built on ``sam_reuse.base.imaging``): the same code ``export-and-tune verify``
and ``verify-engine`` feed, and the same preprocessing the tuner uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from sam_reuse.calibrate.data import load_sample, read_records
from sam_reuse.exporter.verify import decoder_inputs, encoder_inputs
from sam_reuse.samples import BUNDLED_DATA


def _records():
    folder = Path(os.environ.get("SAM_REUSE_DATA") or BUNDLED_DATA)
    count = int(os.environ.get("SAM_REUSE_IMAGES", "2"))
    return read_records(folder)[:count]


def load_encoder_data() -> Iterator[dict[str, np.ndarray]]:
    """``{"image": 1x3x1024x1024}`` per calibration image."""
    yield from encoder_inputs(_records())


def load_decoder_data() -> Iterator[dict[str, np.ndarray]]:
    """Decoder inputs per calibration image: its embedding (from ``SAM_REUSE_ENCODER``) and its prompt."""
    yield from decoder_inputs([load_sample(r) for r in _records()], os.environ.get("SAM_REUSE_ENCODER") or Path("out/demo/encoder.onnx"))
