"""torch -> ONNX export of a SAM 2 image model (encoder with high-resolution features, single-mask decoder),
verified against torch and ``SAM2ImagePredictor`` before anything is published.

The same exporter settings as SAM's (``exporter.onnx_export``). Both files
carry ``CONVENTION_PROPERTY`` = ``sam2`` so that every later stage frames
images and prompts the way ``SAM2ImagePredictor`` does.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sam_reuse.base import imaging
from sam_reuse.base.contract import (
    APP_DECODER_OUTPUTS,
    CONVENTION_PROPERTY,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    EXPORT_DERIVED_OUTPUTS,
    EXPORT_FORMAT,
    FIRST_ORDER_SCORER,
    SAM2_DECODER_INPUTS,
    SAM2_ENCODER_OUTPUTS,
    decoder_feeds,
)
from sam_reuse.base.files import folder_lock, sha256_file, staged_outputs, write_json
from sam_reuse.base.records import Record
from sam_reuse.base.runtime import onnx_io_spec, ort_session
from sam_reuse.exporter.onnx_export import (
    ExportResult,
    _check_limits,
    _declare_outputs,
    _torch_export,
    add_app_decoders,
    check_app_decoders,
    require_finite,
)

FEATURE_SHAPES = {"image_embeddings": [256, 64, 64], "high_res_feats_0": [32, 256, 256],
                  "high_res_feats_1": [64, 128, 128]}
CONVENTION = {CONVENTION_PROPERTY: imaging.SAM2}  # the metadata every SAM 2 graph carries
NO_FIRST_ORDER = ("not exported: SAM 2 returns a single mask chosen by a stability test between mask tokens, "
                  "which has no useful gradient; the search uses the fast strategy")


def export_sam2_encoder(sam2, path: Path, exporter: str, opset: int) -> None:
    """``image`` Bx3x1024x1024 -> ``image_embeddings`` and the two ``high_res_feats``."""
    import torch

    from sam_reuse.exporter.sam2_wrappers import Sam2ImageEncoder

    dynamic = {name: {0: "batch"} for name in (*ENCODER_INPUTS, *SAM2_ENCODER_OUTPUTS)}
    with torch.no_grad():
        _torch_export(Sam2ImageEncoder(sam2).eval(), (torch.zeros(1, 3, 1024, 1024),), path, ENCODER_INPUTS,
                      SAM2_ENCODER_OUTPUTS, dynamic, exporter, opset)
    _declare_outputs(path, {name: ["batch", *FEATURE_SHAPES[name]] for name in SAM2_ENCODER_OUTPUTS}, CONVENTION)


def _example_decoder_inputs(batch: int = 2, points: int = 3) -> tuple:
    import torch

    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(batch, *FEATURE_SHAPES[name], generator=generator) for name in SAM2_ENCODER_OUTPUTS]
    coords = torch.randint(0, 1024, (batch, points, 2), generator=generator).float()
    labels = torch.tensor([[1.0] * (points - 1) + [-1.0]] * batch)
    return (*features, coords, labels, torch.zeros(batch, 1, 256, 256), torch.zeros(batch))


def export_sam2_decoder(sam2, path: Path, exporter: str, opset: int) -> None:
    """The single-mask decoder (``exporter.sam2_wrappers.Sam2SingleMaskDecoder``)."""
    import torch

    from sam_reuse.exporter.sam2_wrappers import Sam2SingleMaskDecoder

    dynamic = {name: {0: "batch"} for name in (*SAM2_DECODER_INPUTS, *DECODER_OUTPUTS)}
    dynamic["point_coords"][1] = dynamic["point_labels"][1] = "num_points"
    with torch.no_grad():
        _torch_export(Sam2SingleMaskDecoder(sam2).eval(), _example_decoder_inputs(), path, SAM2_DECODER_INPUTS,
                      DECODER_OUTPUTS, dynamic, exporter, opset)
    _declare_outputs(path, {"low_res_masks": ["batch", 1, 256, 256], "iou_predictions": ["batch", 1]}, CONVENTION)


def export_sam2_prompts_decoder(sam2, path: Path, multimask: bool, exporter: str, opset: int) -> None:
    """The app decoder (``exporter.sam2_wrappers.Sam2PromptsDecoder``): one image's outputs, K prompts."""
    import torch

    from sam_reuse.exporter.sam2_wrappers import Sam2PromptsDecoder

    *features, coords, labels, mask_input, has_mask_input = _example_decoder_inputs(batch=3)
    dynamic = {name: {0: "prompts"} for name in ("point_coords", "point_labels", "mask_input", "has_mask_input",
                                                 *DECODER_OUTPUTS)}
    dynamic["point_coords"][1] = dynamic["point_labels"][1] = "num_points"
    with torch.no_grad():
        _torch_export(Sam2PromptsDecoder(sam2, multimask).eval(),
                      (*(feature[:1] for feature in features), coords, labels, mask_input, has_mask_input), path,
                      SAM2_DECODER_INPUTS, DECODER_OUTPUTS, dynamic, exporter, opset)
    masks = 3 if multimask else 1
    _declare_outputs(path, {"low_res_masks": ["prompts", masks, 256, 256], "iou_predictions": ["prompts", masks]},
                     CONVENTION)


def verify_sam2_export(sam2, encoder_path: Path, decoder_path: Path, records: Sequence[Record]) -> dict[str, Any]:
    """The parity figures of ``exporter.onnx_export.verify_export``, against the SAM 2 wrappers and
    ``SAM2ImagePredictor.predict(multimask_output=False)``; raises ``SamReuseError`` outside the limits."""
    import torch

    from sam_reuse.exporter.sam2_wrappers import Sam2ImageEncoder, Sam2SingleMaskDecoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sam2's deprecation notices
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(sam2)
    encoder, decoder = ort_session(encoder_path), ort_session(decoder_path)
    torch_encoder, torch_decoder = Sam2ImageEncoder(sam2).eval(), Sam2SingleMaskDecoder(sam2).eval()
    figures = {"images": 0, "encoder_max_abs_diff": 0.0, "decoder_max_abs_diff": 0.0,
               "predictor_max_abs_diff": 0.0, "min_mask_iou": 1.0, "reference": "SAM2ImagePredictor"}
    for record in records:
        image = imaging.load_image_rgb(record.image)
        x = imaging.preprocess(image, convention=imaging.SAM2)
        with torch.no_grad():
            torch_features = [value.numpy() for value in torch_encoder(torch.from_numpy(x))]
        onnx_features = encoder.run(list(SAM2_ENCODER_OUTPUTS), {"image": x})
        coords, labels = imaging.prompt_arrays(record.prompt, image.shape[:2], convention=imaging.SAM2)
        feeds = decoder_feeds(torch_features[0], coords, labels, high_res=torch_features[1:])
        onnx_logits = decoder.run(None, feeds)[0]
        with torch.no_grad():
            torch_logits = torch_decoder(*(torch.from_numpy(feeds[name]) for name in SAM2_DECODER_INPUTS))[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predictor.set_image(image)
            masks, _, _ = predictor.predict(record.points, record.labels, record.box, multimask_output=False,
                                            return_logits=True)
        onnx_path_low_res = decoder.run(None, decoder_feeds(onnx_features[0], coords, labels,
                                                              high_res=onnx_features[1:]))[0]
        onnx_path_logits = imaging.upscale_logits(onnx_path_low_res, image.shape[:2], convention=imaging.SAM2)[0, 0]
        require_finite({**dict(zip(SAM2_ENCODER_OUTPUTS, onnx_features)), "mask logits": onnx_logits,
                        "mask logits on its own features": onnx_path_low_res}, record.image)
        figures["images"] += 1
        figures["encoder_max_abs_diff"] = max(figures["encoder_max_abs_diff"], *(
            float(np.abs(o - t).max()) for o, t in zip(onnx_features, torch_features)))
        figures["decoder_max_abs_diff"] = max(figures["decoder_max_abs_diff"],
                                              float(np.abs(onnx_logits - torch_logits.numpy()).max()))
        figures["predictor_max_abs_diff"] = max(figures["predictor_max_abs_diff"],
                                                float(np.abs(onnx_path_logits - masks[0]).max()))
        figures["min_mask_iou"] = min(figures["min_mask_iou"], imaging.binary_iou(
            imaging.logits_to_mask(onnx_path_logits), imaging.logits_to_mask(masks[0]), empty=1.0))
    _check_limits(figures)
    return figures


def export_sam2(sam2, out_dir: str | Path, verify_records: Sequence[Record], info: dict[str, Any],
                app_decoders: Sequence[str] = (), reference=None) -> ExportResult:
    """Export a built SAM 2 image model into ``out_dir`` (all or nothing, like ``export_sam``), verified against
    ``reference`` (default: ``sam2`` itself; a fine-tuned model's unmerged adapters)."""
    from sam_reuse.exporter.sam2_wrappers import Sam2ImageEncoder, Sam2PromptsDecoder

    check_app_decoders(app_decoders)
    reference_model = reference if reference is not None else sam2
    out_dir = Path(out_dir)
    exporter, opset = info["exporter"], info["opset"]
    replacing = (*EXPORT_DERIVED_OUTPUTS, APP_DECODER_OUTPUTS, FIRST_ORDER_SCORER)
    with folder_lock(out_dir), staged_outputs(out_dir, replacing=replacing) as staging:
        started = time.perf_counter()
        export_sam2_encoder(sam2, staging / "encoder.onnx", exporter, opset)
        export_sam2_decoder(sam2, staging / "decoder.onnx", exporter, opset)
        export_seconds = time.perf_counter() - started
        parity = verify_sam2_export(reference_model, staging / "encoder.onnx", staging / "decoder.onnx",
                                    verify_records)
        info = {**info, "convention": imaging.SAM2, "export_seconds": round(export_seconds, 2),
                "models": {name: {"file": f"{name}.onnx", "sha256": sha256_file(staging / f"{name}.onnx"),
                                  **onnx_io_spec(staging / f"{name}.onnx")} for name in ("encoder", "decoder")},
                "parity": {**parity, "verified_on": [str(r.image) for r in verify_records]},
                "first_order": NO_FIRST_ORDER}
        add_app_decoders(staging, info, app_decoders,
                         lambda path, multimask: export_sam2_prompts_decoder(sam2, path, multimask, exporter, opset),
                         lambda multimask: Sam2PromptsDecoder(reference_model, multimask),
                         Sam2ImageEncoder(reference_model).eval(), verify_records, imaging.SAM2)
        write_json(staging / "export.json", {"format": EXPORT_FORMAT, **info})
    return ExportResult(out_dir / "encoder.onnx", out_dir / "decoder.onnx", out_dir / "export.json", info)
