"""Argument groups shared by several commands, declared once, and the helpers that read them back."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from sam_reuse.base.errors import SamReuseError
from sam_reuse.samples import BUNDLED_DATA


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint to export, how, and on which images the export is verified."""
    from sam_reuse.exporter.models import model_types
    from sam_reuse.exporter.onnx_export import DEFAULT_OPSET, EXPORTERS

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


def add_first_order_arg(parser: argparse.ArgumentParser) -> None:
    """Whether an export also writes the first-order scorer (``export`` and ``peft-export``)."""
    from sam_reuse.base.contract import FIRST_ORDER_SCORER

    parser.add_argument("--first-order", action=argparse.BooleanOptionalAction, default=True,
                        help=f"write the first-order scorer {FIRST_ORDER_SCORER} (a gradient pass of the decoder) "
                             "that tune's default strategy needs (default: yes; without it tune uses --strategy "
                             "fast)")


def first_order_files(info: dict) -> list[str]:
    """The first-order scorer's file name when an export (its ``export.json`` info) wrote one, else nothing."""
    from sam_reuse.base.contract import FIRST_ORDER_SCORER

    return [FIRST_ORDER_SCORER] if "first_order" in info["models"] else []


def print_why_no_first_order(info: dict) -> None:
    """The export's reason for having no first-order scorer (SAM 2's), when it gives one."""
    if isinstance(info.get("first_order"), str):
        print(f"first-order scorer {info['first_order']}")


def add_data_args(parser: argparse.ArgumentParser, data_default: Path | None) -> None:
    """The labelled data and its split (dest names are ``TuneSettings`` fields)."""
    from sam_reuse.base.runtime import DEVICES
    from sam_reuse.calibrate.data import DEFAULT_MIN_IMAGES, PROMPT_MODES
    from sam_reuse.calibrate.tune import TuneSettings

    defaults = TuneSettings()
    data = parser.add_argument_group("calibration data")
    data.add_argument("--data", type=Path, default=data_default, required=data_default is None,
                      help="folder with manifest.jsonl, or with images/ + masks/, or of images (with --masks)"
                      + (" (default: bundled isic2016)" if data_default else ""))
    data.add_argument("--masks", type=str, help="folder of masks paired with the --data images by file stem")
    data.add_argument("--prompt", default=defaults.prompt, choices=PROMPT_MODES,
                      help="given: the records' points/box (else a point derived from the mask); "
                           "point: the interior point farthest from the mask border; box: the mask's bounding box")
    data.add_argument("--search-images", type=int, help="first K records form the search split (default: first half)")
    data.add_argument("--holdout-images", type=int,
                      help="last M records are held out (default: all after the search split; 0: none, and the "
                           "report gives a cross-validated estimate instead)")
    data.add_argument("--min-images", type=int, default=DEFAULT_MIN_IMAGES,
                      help=f"fail if a split has fewer usable images (default: {DEFAULT_MIN_IMAGES})")
    data.add_argument("--batch-size", type=int, default=defaults.batch_size, help="decoder batch (default: 8)")
    data.add_argument("--cache-dir", type=str, help="activation cache (default: $SAM_REUSE_CACHE/activations)")
    data.add_argument("--device", default=defaults.device, choices=DEVICES,
                      help="where ONNX Runtime encodes and scores: cpu (default) or cuda (needs onnxruntime-gpu, "
                           "the 'gpu' extra; without it a warning, and the CPU)")
    data.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_search_args(parser: argparse.ArgumentParser) -> None:
    """How pairs are searched and what ships (dest names are ``TuneSettings`` fields)."""
    from sam_reuse.calibrate.evidence import EVIDENCE
    from sam_reuse.calibrate.fast import OBJECTIVES
    from sam_reuse.calibrate.shipping import SELECTIONS
    from sam_reuse.calibrate.token_choice import MASK_TOKEN_CHOICES
    from sam_reuse.calibrate.tune import STRATEGIES, TuneSettings

    defaults = TuneSettings()
    search = parser.add_argument_group("search")
    search.add_argument("--strategy", default=defaults.strategy, choices=STRATEGIES,
                        help="first-order: the pairs a gradient pass ranks best, raced, then a greedy path (the "
                             "default at the embedding when the export has its scorer); fast: ablation screening, "
                             "racing and the greedy path, about 4x the decoder runs (the default otherwise); "
                             "exhaustive: the reference method, every pair then 2^N-1 subsets, hours unless "
                             "restricted")
    search.add_argument("--selection", default=defaults.selection, choices=SELECTIONS,
                        help="the candidate map and what decides: cross-fitted = the map along the search's curve "
                             "with the best lower 90%% bound of per-image gain on the held-out images, shipped if "
                             "the maps chosen on each half gain on the other half with a bound above 0 (default); "
                             "validated = chosen and decided on the held-out validation part alone; guarded = the "
                             "greedy-path prefix with the best bound on the search split, naive = the whole path, "
                             "each decided on the validation part (see README, 'What ships')")
    search.add_argument("--objective", default=defaults.objective, choices=sorted(OBJECTIVES),
                        help="how the fast and first-order searches rank pairs and take greedy steps: mean = the "
                             "rise of search-split mIoU; trimmed = the mean per-image change without the 10%% "
                             f"largest and smallest, which a few flipped masks cannot carry (default: "
                             f"{defaults.objective})")
    search.add_argument("--mask-token", default=defaults.mask_token, choices=MASK_TOKEN_CHOICES,
                        help="which of SAM's 4 mask tokens the shipped decoder returns: auto = the one best on the "
                             "search split, shipped as decoder.tuned.onnx when the held-out rule says it beats "
                             "token 0 (SAM's single mask), before the channel search runs on its masks; 0-3 = that "
                             f"token (default: {defaults.mask_token})")
    search.add_argument("--ship-anyway", action="store_true",
                        help="ship the candidate even when the evidence shows no improvement (exit status 0)")
    search.add_argument("--evidence", default=defaults.evidence, choices=sorted(EVIDENCE),
                        help="prompts per search image: points (its own prompt plus 2 of the same kind derived "
                             "from the mask: points spread over it, or the box grown and shrunk by 5%%; IoU "
                             "averaged, 3x the decoder runs; default at the embedding) or given (its own prompt "
                             "only; default inside the encoder); held-out images are scored on their own prompt")
    search.add_argument("--augment", type=int, default=defaults.augment, metavar="K",
                        help="also score each search image on K altered copies (mirror, contrast, blur, colour "
                             "casts; at most 2), K+1 times the search's decoder runs: simulated shift, so a pair "
                             "must help beyond the search images as they are (default: 0; see README)")
    search.add_argument("--top-pairs", dest="top_n", type=int, default=defaults.top_n,
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
    search.add_argument("--overlays", type=int, default=defaults.overlays, help="held-out overlay PNGs (default: 4)")


def tune_settings(args: argparse.Namespace):
    """``TuneSettings`` from the options the command declared (each option's dest is the field's name)."""
    from sam_reuse.calibrate.tune import TuneSettings

    return TuneSettings(**{f.name: getattr(args, f.name) for f in fields(TuneSettings) if hasattr(args, f.name)})


def resolve_checkpoint(model_type: str, checkpoint: Path | None) -> Path | None:
    """vit_t falls back to the fetched MobileSAM weights (fetching them on first use)."""
    if checkpoint is not None or model_type != "vit_t":
        return checkpoint
    from sam_reuse.exporter.weights import fetch_weights

    return fetch_weights("mobilesam")


def verify_records(args: argparse.Namespace):
    """The records an export is verified on (``--verify-data``, ``--verify-images``)."""
    from sam_reuse.calibrate.data import read_manifest

    if args.verify_images < 1:
        raise SamReuseError("--verify-images must be at least 1")
    return read_manifest(args.verify_data)[: args.verify_images]


def comparison_status(result, difference: str, failed: str, passed: str) -> int:
    """Print a comparison's worst differences (verify, verify-engine); 0 when it passed, 1 when not."""
    for name, figures in result.outputs.items():
        print(f"{name}: max |{difference}| {figures['max_abs_diff']:.2e} over {result.images} image(s)")
    if not result.passed:
        print(f"export-and-tune: {failed}", file=sys.stderr)
        return 1
    print(passed)
    return 0
