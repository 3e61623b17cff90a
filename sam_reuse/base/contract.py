"""The names and formats every stage agrees on: the exported models' inputs and outputs, and the JSON formats.

The exporter writes models with these tensor names, the search feeds them,
the engines keep them, and the C++ sample reads them; a format id is written
into every JSON file a stage publishes, so a reader can refuse one it does
not know.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

ENCODER_INPUTS = ("image",)
EMBEDDING = "image_embeddings"  # the encoder's output, the decoder's first input, and the reference reuse site
ENCODER_OUTPUTS = (EMBEDDING,)
DECODER_INPUTS = (EMBEDDING, "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")
# SAM 2: the encoder also hands the decoder two high-resolution feature maps (Bx32x256x256, Bx64x128x128), which
# channel reuse at the embedding leaves alone.
HIGH_RES_FEATURES = ("high_res_feats_0", "high_res_feats_1")
SAM2_ENCODER_OUTPUTS = (EMBEDDING, *HIGH_RES_FEATURES)
SAM2_DECODER_INPUTS = (EMBEDDING, *HIGH_RES_FEATURES, *DECODER_INPUTS[1:])
# Metadata key of every exported encoder and decoder: the predictor conventions its inputs and outputs follow
# (sam_reuse.base.imaging.CONVENTIONS); absent in exports made before SAM 2 was supported, which follow "sam".
CONVENTION_PROPERTY = "sam_reuse.convention"
# The first-order scorer (``export --first-order``): one prompt of FIRST_ORDER_POINTS points and its ground truth
# in the low-res frame -> M = G X^T and the soft IoU (``exporter.wrappers.FirstOrderScorer``).
FIRST_ORDER_SCORER = "decoder.first_order.onnx"
FIRST_ORDER_INPUTS = (EMBEDDING, "point_coords", "point_labels", "target", "valid")
FIRST_ORDER_OUTPUTS = ("channel_products", "soft_iou")
FIRST_ORDER_POINTS = 2  # one point and SAM's padding point, or a box: what the search's prompts mostly are

# Files of an output folder that a tune writes, and those derived from the folder's exported models. A tune
# replaces every earlier tune output, engines of a tuned encoder included, so a stale tuned encoder never sits
# beside a run that shipped the original; a new export removes everything derived from the models it replaces.
TUNE_OUTPUTS = ("encoder.tuned.*", "decoder.tuned.onnx", "reuse_map*.json", "report.json", "report.md",
                "miou_vs_pairs.png", "overlay-*.png")
EXPORT_DERIVED_OUTPUTS = (*TUNE_OUTPUTS, "*.engine", "*.engine.json", "*.int8.onnx", "*.int8.onnx.json")
EXPORT_OUTPUTS = ("encoder.onnx", "decoder.onnx", "export.json")
APP_DECODER_OUTPUTS = "decoder.prompts*.onnx"  # export --app-decoders: valid as long as the export they came with
JOURNAL = "search.jsonl"  # a tune's progress, appended to as the search goes, so a rerun resumes

REUSE_MAP_FORMAT = "sam-reuse/reuse-map@1"
REUSE_MAP_PROPERTY = "sam_reuse.reuse_map"  # metadata key of a rewritten model: the map it was rewritten by
MASK_TOKEN_PROPERTY = "sam_reuse.mask_token"  # metadata key of a decoder rewritten to return another mask token
REPORT_FORMAT = "sam-reuse/report@2"
EXPORT_FORMAT = "sam-reuse/export@1"  # export.json
EVALUATION_FORMAT = "sam-reuse/evaluation@1"  # evaluate --json
ENGINE_SIDECAR_FORMAT = "sam-reuse/engine@1"
INT8_SIDECAR_FORMAT = "sam-reuse/int8@1"


def high_res_maps(outputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The SAM 2 high-resolution maps among encoder outputs named as the decoder's inputs (none for SAM)."""
    return [outputs[name] for name in HIGH_RES_FEATURES if name in outputs]


def decoder_feeds(embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                  mask_input: np.ndarray | None = None, high_res: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
    """Decoder inputs: embeddings paired one-to-one with prompts, or one embedding shared by K prompts (the
    app decoders, ``APP_DECODER_OUTPUTS``); ``high_res``: a SAM 2 encoder's maps, in ``HIGH_RES_FEATURES`` order."""
    batch = coords.shape[0]
    has_mask = mask_input is not None
    return {  # no copies of arrays that are float32 already (a search feeds a batch of embeddings per call)
        EMBEDDING: np.asarray(embedding, dtype=np.float32),
        **{name: np.asarray(value, dtype=np.float32) for name, value in zip(HIGH_RES_FEATURES, high_res)},
        "point_coords": np.asarray(coords, dtype=np.float32),
        "point_labels": np.asarray(labels, dtype=np.float32),
        "mask_input": np.asarray(mask_input, dtype=np.float32) if has_mask else np.zeros((batch, 1, 256, 256),
                                                                                          np.float32),
        "has_mask_input": np.full((batch,), float(has_mask), dtype=np.float32),
    }
