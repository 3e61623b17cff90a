"""``export-and-tune sites | apply | mask-token | verify``: where reuse applies, rewriting an encoder by a map or a
decoder to another mask token, and checking a rewrite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sam_reuse.base.errors import SamReuseError
from sam_reuse.cli.common import comparison_status
from sam_reuse.samples import BUNDLED_DATA


def register(sub: argparse._SubParsersAction) -> dict:
    from sam_reuse.exporter.verify import DEFAULT_ATOL, DEFAULT_RTOL

    sites = sub.add_parser("sites", help="list the channel sites of an encoder ONNX and the exact rewrites there")
    sites.add_argument("encoder", type=Path)
    sites.add_argument("--json", action="store_true", help="print JSON instead of a table")

    apply = sub.add_parser("apply", help="rewrite an encoder ONNX by a reuse map")
    apply.add_argument("encoder", type=Path)
    apply.add_argument("reuse_map", type=Path)
    apply.add_argument("--out", type=Path, required=True, help="output ONNX path (e.g. encoder.tuned.onnx)")
    apply.add_argument("--strategy", default="auto", choices=["auto", "gather", "fold", "prune"],
                       help="rewrite to use at every site (default: cheapest exact one per site)")

    token = sub.add_parser("mask-token", help="rewrite a decoder ONNX (decoder.onnx or an app decoder) to return "
                           "another of SAM's mask tokens, e.g. the one a tune shipped (report.json: mask_token)")
    token.add_argument("decoder", type=Path)
    token.add_argument("token", help="0: SAM's single mask; 1-3: its multimask masks; click: SAM's single-click rule "
                       "(one click and no box: the multimask mask with the best predicted IoU; otherwise token 0)")
    token.add_argument("--out", type=Path, required=True, help="output ONNX path (e.g. decoder.prompts.tuned.onnx)")

    verify = sub.add_parser("verify", help="compare a tuned encoder with the original + its reuse map (polygraphy, ONNX Runtime)")
    verify.add_argument("tuned", type=Path, help="the rewritten encoder, e.g. OUT/encoder.tuned.onnx")
    verify.add_argument("--reference", type=Path, required=True, help="the original encoder ONNX")
    verify.add_argument("--reuse-map", type=Path, help="reuse map JSON (default: the one recorded in the tuned model)")
    verify.add_argument("--data", type=Path, default=BUNDLED_DATA, help="images to compare on (default: bundled isic2016)")
    verify.add_argument("--images", type=int, default=2, help="number of images (default: 2)")
    verify.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default: {DEFAULT_ATOL:g})")
    verify.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default: {DEFAULT_RTOL:g})")
    return {"sites": _sites, "apply": _apply, "mask-token": _mask_token, "verify": _verify}


def _sites(args: argparse.Namespace) -> int:
    from sam_reuse.graphops.sites import sites_of

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
    from sam_reuse.base.files import check_output_file
    from sam_reuse.graphops.rewrites import apply_reuse_map_file

    check_output_file(args.out, "--out")
    applied = apply_reuse_map_file(args.encoder, args.reuse_map, args.out, args.strategy)
    done = ", ".join(f"{site}: {strategy}" for site, strategy in applied.items()) or "no pairs, model unchanged"
    print(f"wrote {args.out} ({done})")
    return 0


def _mask_token(args: argparse.Namespace) -> int:
    from sam_reuse.graphops.mask_token import SINGLE_CLICK, with_mask_token_file

    if args.token != SINGLE_CLICK and not args.token.lstrip("-").isdigit():
        raise SamReuseError(f"mask token '{args.token}': a number 0 to 3, or {SINGLE_CLICK}")
    with_mask_token_file(args.decoder, args.token if args.token == SINGLE_CLICK else int(args.token), args.out)
    print(f"wrote {args.out} (mask token {args.token})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sam_reuse.calibrate.data import read_records
    from sam_reuse.exporter.verify import verify_tuned

    if args.images < 1:
        raise SamReuseError("--images must be at least 1")
    for option, value in (("--atol", args.atol), ("--rtol", args.rtol)):
        if not value >= 0:
            raise SamReuseError(f"{option} {value:g}: a tolerance must be 0 or more")
    result = verify_tuned(args.reference, args.tuned, read_records(args.data)[: args.images], args.reuse_map,
                          args.atol, args.rtol)
    return comparison_status(result, "tuned - reference",
                             f"verify FAILED: {args.tuned} differs from {args.reference} + its reuse map beyond "
                             f"atol {args.atol:g} / rtol {args.rtol:g}",
                             f"verify passed: {args.tuned} equals {args.reference} + its reuse map (gather reference)")
