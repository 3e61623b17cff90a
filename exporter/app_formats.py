"""An encoder/decoder pair (tuned or not) in the formats SAM apps load, checked against our own pipeline.

* ``samexporter``: the encoder as exported (samexporter's runtime normalises and pads a 4-D input itself)
  and the decoder with SAM's official ONNX interface (``graphops.app_format.official_decoder``), which
  samexporter's ``SegmentAnythingONNX`` and C++ ports of SAM's ONNX example load;
* ``anylabeling``: the encoder with preprocessing in the graph (``preprocessing_encoder``: AnyLabeling and
  X-AnyLabeling feed it an HxWx3 image), the official decoder, and the ``config.yaml`` AnyLabeling reads,
  also zipped in one folder as it unpacks its models.

SAM 2 exports are refused: these tools read SAM 2 through another interface.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from sam_reuse.base import imaging
from sam_reuse.base.contract import decoder_feeds
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import folder_lock, staged_outputs
from sam_reuse.base.records import Record
from sam_reuse.base.runtime import check_pair, load_model, ort_session
from sam_reuse.graphops.app_format import ORIG_IM_SIZE, official_decoder, preprocessing_encoder

APP_FORMATS = ("samexporter", "anylabeling")
APP_FORMAT_OUTPUTS = ("encoder.onnx", "decoder.onnx", "config.yaml", "*.zip")
MIN_MASK_IOU = 0.999  # the app pair's mask against our pipeline's, on the check image


def check_app_format(name: str) -> None:
    if name not in APP_FORMATS:
        raise SamReuseError(f"--format: unknown app format '{name}' (choose from {', '.join(APP_FORMATS)})")


def _config_yaml(name: str) -> str:
    """AnyLabeling's model config (its keys as ``model.py`` reads them; paths relative to the file)."""
    return "\n".join([
        "type: segment_anything", f"name: {name}", f"display_name: {name} (sam-reuse)",
        "encoder_model_path: encoder.onnx", "decoder_model_path: decoder.onnx",
        f"input_size: {imaging.IMAGE_SIZE}", f"max_width: {imaging.IMAGE_SIZE}", "max_height: 682", ""])


def _app_masks(encoder: onnx.ModelProto, decoder: onnx.ModelProto, preprocessing: bool, image: np.ndarray,
               coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The app pair's binary mask at the image's size, fed the way the apps feed it."""
    if preprocessing:
        h, w = imaging.resized_shape(*image.shape[:2])
        from PIL import Image

        fed = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), dtype=np.float32)
    else:
        fed = imaging.preprocess(image)
    embedding = ort_session(encoder.SerializeToString()).run(None, {"image": fed})[0]
    feeds = {**decoder_feeds(embedding, coords, labels), ORIG_IM_SIZE: np.array(image.shape[:2], np.float32)}
    return ort_session(decoder.SerializeToString()).run(["masks"], feeds)[0][0, 0] > 0


def _our_masks(encoder: onnx.ModelProto, decoder: onnx.ModelProto, image: np.ndarray, coords: np.ndarray,
               labels: np.ndarray) -> np.ndarray:
    embedding = ort_session(encoder.SerializeToString()).run(None, {"image": imaging.preprocess(image)})[0]
    low_res = ort_session(decoder.SerializeToString()).run(["low_res_masks"],
                                                           decoder_feeds(embedding, coords, labels))[0]
    return imaging.upscale_logits(low_res, image.shape[:2])[0, 0] > 0


def write_app_format(name: str, encoder: str | Path, decoder: str | Path, out_dir: str | Path,
                     check: Sequence[Record]) -> list[str]:
    """Write ``encoder``/``decoder`` in app format ``name`` into ``out_dir`` (all files or none), after checking the
    app pair's masks against our pipeline's on the ``check`` records (IoU at least MIN_MASK_IOU); the names."""
    check_app_format(name)
    encoder_model = load_model(encoder, "encoder ONNX", role="encoder")
    decoder_model = load_model(decoder, "decoder ONNX", role="decoder")
    convention, _ = check_pair(encoder_model, decoder_model, encoder, decoder)
    if convention == imaging.SAM2:
        raise SamReuseError(f"--format {name}: a SAM 1 format; {encoder} is a SAM 2 export")
    preprocessing = name == "anylabeling"
    app_encoder = preprocessing_encoder(encoder_model, str(encoder)) if preprocessing else encoder_model
    app_decoder = official_decoder(decoder_model, str(decoder))
    for record in check:
        image = imaging.load_image_rgb(record.image)
        coords, labels = imaging.prompt_arrays(record.prompt, image.shape[:2])
        ours = _our_masks(encoder_model, decoder_model, image, coords, labels)
        theirs = _app_masks(app_encoder, app_decoder, preprocessing, image, coords, labels)
        iou = imaging.binary_iou(theirs, ours, empty=1.0)
        if iou < MIN_MASK_IOU:
            raise SamReuseError(f"--format {name}: on {record.image} the app pair's mask differs from ours (IoU "
                                f"{iou:.5f} < {MIN_MASK_IOU}); nothing was written")
    out_dir = Path(out_dir)
    written = ["encoder.onnx", "decoder.onnx"]
    with folder_lock(out_dir), staged_outputs(out_dir, replacing=APP_FORMAT_OUTPUTS) as staging:
        onnx.save(app_encoder, str(staging / "encoder.onnx"))
        onnx.save(app_decoder, str(staging / "decoder.onnx"))
        if preprocessing:
            model_name = f"sam_reuse_{out_dir.resolve().name}"
            (staging / "config.yaml").write_text(_config_yaml(model_name))
            with zipfile.ZipFile(staging / f"{model_name}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
                for file in ("config.yaml", "encoder.onnx", "decoder.onnx"):
                    archive.write(staging / file, f"{model_name}/{file}")
            written += ["config.yaml", f"{model_name}.zip"]
    return written
