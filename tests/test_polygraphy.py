"""The polygraphy data-loader sample feeds real preprocessed images and prompts to `polygraphy run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from polygraphy.json import load_json

from sam_reuse.base.imaging import load_image_rgb, preprocess, prompt_arrays
from tests.conftest import REPO

LOADER = REPO / "samples" / "polygraphy" / "data_loader.py"


def _polygraphy_run(model: Path, function: str, saved: Path, env: dict[str, str]) -> None:
    command = [str(Path(sys.executable).with_name("polygraphy")), "run", str(model), "--onnxrt",
               "--data-loader-script", f"{LOADER}:{function}", "--save-inputs", str(saved)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SAM_REUSE_IMAGES": "2", **env})
    assert done.returncode == 0 and "PASSED" in done.stdout + done.stderr, done.stdout + done.stderr


def test_polygraphy_runs_tiny_models_on_real_calibration_inputs(tiny_exports, sample_records, tmp_path):
    export = tiny_exports["test_vit_b"]
    _polygraphy_run(export.encoder, "load_encoder_data", tmp_path / "enc.json", {})
    fed = load_json(tmp_path / "enc.json")
    assert len(fed) == 2
    np.testing.assert_array_equal(fed[1]["image"], preprocess(load_image_rgb(sample_records[1].image)))

    _polygraphy_run(export.decoder, "load_decoder_data", tmp_path / "dec.json",
                    {"SAM_REUSE_ENCODER": str(export.encoder)})
    fed = load_json(tmp_path / "dec.json")
    image = load_image_rgb(sample_records[0].image)
    coords, labels = prompt_arrays(sample_records[0].prompt, image.shape[:2])
    np.testing.assert_array_equal(fed[0]["point_coords"], coords)
    np.testing.assert_array_equal(fed[0]["point_labels"], labels)
    assert fed[0]["image_embeddings"].shape[1] == 256 and np.abs(fed[0]["image_embeddings"]).max() > 0
