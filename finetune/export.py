"""Export a fine-tuned model: merge what is linear in a base weight, keep the rest as graph pieces.

The ONNX pair is verified against the *unmerged* torch model (adapters as
separate modules), so the parity figures in ``export.json`` cover both the
merge and the export. The result is an ordinary export folder: ``tune``,
``run --encoder/--decoder`` and ``engine`` take it as they take any other.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sam_reuse.base import imaging
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import sha256_file
from sam_reuse.base.records import Record
from sam_reuse.exporter.models import SAM2_FAMILY, build_sam, spec_for
from sam_reuse.exporter.onnx_export import (
    DEFAULT_OPSET,
    ExportResult,
    check_export_request,
    export_identity,
    export_sam,
)
from sam_reuse.exporter.sam2_export import export_sam2
from sam_reuse.exporter.wrappers import as_output_tuple
from sam_reuse.finetune.blocks import encoder_steps, run_steps
from sam_reuse.finetune.checkpoint import check_base, read_adapters
from sam_reuse.finetune.methods import attach, load_adapter_state, merge_adapters, trainable_count
from sam_reuse.finetune.train import convention_of

MERGE_MAX_ABS_DIFF = 1e-3  # merged vs unmerged torch embedding (float re-association only)


def load_finetuned(model_type: str, checkpoint: str | Path | None, adapters: str | Path, seed: int = 0):
    """(model with adapters attached and loaded, config, training record)."""
    check_base(adapters, model_type, checkpoint, seed)
    config, state, record = read_adapters(adapters)
    sam = build_sam(model_type, checkpoint, seed=seed)
    try:
        attach(sam, config)
        load_adapter_state(sam, state)
    except SamReuseError as exc:
        raise SamReuseError(f"{adapters}: does not fit {model_type}: {exc}") from None
    return sam, config, record


@torch.no_grad()
def merge_difference(merged, unmerged, records: Sequence[Record]) -> float:
    """Largest |difference| between the merged and unmerged torch models' encoder outputs on real images."""
    convention = convention_of(merged)
    worst = 0.0
    for record in records:
        x = torch.from_numpy(imaging.preprocess(imaging.load_image_rgb(record.image), convention=convention))
        outputs = (run_steps(encoder_steps(model), x) for model in (merged, unmerged))
        for a, b in zip(*(as_output_tuple(o) for o in outputs)):
            worst = max(worst, float((a - b).abs().max()))
    return worst


def export_finetuned(model_type: str, adapters: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
                     verify_records: Sequence[Record] = (), exporter: str = "legacy", opset: int = DEFAULT_OPSET,
                     seed: int = 0, first_order: bool = False) -> ExportResult:
    """Export ``encoder.onnx``/``decoder.onnx``/``export.json`` of the base model plus ``adapters`` (with
    ``first_order`` also the search's first-order scorer, as ``export_model`` writes it: a tune on the
    fine-tuned model then searches first-order rather than fast, at a quarter of the decoder runs)."""
    check_export_request(model_type, exporter, verify_records, opset)
    unmerged, config, record = load_finetuned(model_type, checkpoint, adapters, seed)
    merged = copy.deepcopy(unmerged)
    pieces = merge_adapters(merged)
    merge_diff = merge_difference(merged, unmerged, verify_records)
    if not np.isfinite(merge_diff) or merge_diff > MERGE_MAX_ABS_DIFF:
        raise SamReuseError(f"{adapters}: merged model differs from the unmerged one by {merge_diff:.3g} "
                            f"(limit {MERGE_MAX_ABS_DIFF})")
    info: dict[str, Any] = {
        **export_identity(model_type, checkpoint, seed, exporter, opset),
        "peft": {
            "adapters": str(adapters),
            "adapters_sha256": sha256_file(adapters),
            "method": config.method,
            "config": config.to_json(),
            "trainable_parameters": trainable_count(unmerged),
            **pieces,
            "merge_max_abs_diff": merge_diff,
            "training": {k: record.get(k) for k in ("device", "train_seconds", "initial_loss", "final_loss")},
        },
    }
    if spec_for(model_type).family == SAM2_FAMILY:
        return export_sam2(merged, out_dir, verify_records, info, reference=unmerged)
    return export_sam(merged, out_dir, verify_records, info, reference=unmerged, first_order=first_order)
