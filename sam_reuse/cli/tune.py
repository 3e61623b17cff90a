"""``export-and-tune tune | evaluate | run``: search a reuse map, score a model pair, or the whole pipeline.

``tune`` and ``run`` exit 0 when a tuned model ships (the encoder, or the
decoder's mask token) and 3 when the originals do
(``sam_reuse.calibrate.shipping``); scripts branch on that.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sam_reuse.base.errors import SamReuseError
from sam_reuse.cli.common import add_data_args, add_model_args, add_search_args, tune_settings
from sam_reuse.cli.engine import deployment_engines, engine_precisions, quantized_encoder
from sam_reuse.cli.export import export_and_report
from sam_reuse.samples import BUNDLED_DATA

if TYPE_CHECKING:
    from sam_reuse.calibrate.report import TuneReport


def register(sub: argparse._SubParsersAction) -> dict:
    tune = sub.add_parser("tune", help="search a reuse map on calibration data; write the tuned encoder and a report")
    tune.add_argument("--out", type=Path, required=True, help="output directory (default models: OUT/encoder.onnx, OUT/decoder.onnx)")
    tune.add_argument("--encoder", type=Path, help="encoder ONNX (default: OUT/encoder.onnx)")
    tune.add_argument("--decoder", type=Path, help="decoder ONNX (default: OUT/decoder.onnx)")
    add_data_args(tune, None)
    add_search_args(tune)

    evaluate = sub.add_parser("evaluate", help="mIoU of an encoder/decoder ONNX pair on a split of labelled data")
    evaluate.add_argument("--encoder", type=Path, required=True)
    evaluate.add_argument("--decoder", type=Path, required=True)
    evaluate.add_argument("--split", default="held-out", choices=["held-out", "search", "all"])
    evaluate.add_argument("--json", type=Path, help="also write the per-image figures to this JSON file")
    add_data_args(evaluate, None)

    run = sub.add_parser("run", help="the whole pipeline: export (or take an ONNX pair), tune, build engines")
    add_model_args(run)
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.add_argument("--encoder", type=Path, help="tune this encoder ONNX instead of exporting (with --decoder)")
    run.add_argument("--decoder", type=Path, help="decoder ONNX to go with --encoder")
    run.add_argument("--engines", default="fp32,fp16",
                     help="precisions of the TensorRT engines built from the shipped encoder and the decoder, "
                          "comma-separated, or 'none' (default: fp32,fp16; skipped with a note without TensorRT)")
    run.add_argument("--quantize", default="none", choices=["none", "int8"],
                     help="int8: also write the INT8 (ONNX Runtime QDQ) version of the shipped encoder, calibrated "
                          "on the search split, with held-out mIoU of fp32 and int8 in its sidecar (default: none)")
    add_data_args(run, BUNDLED_DATA)
    add_search_args(run)
    return {"tune": _tune, "evaluate": _evaluate, "run": _run}


def _print_report(report: TuneReport) -> None:
    search, held, shipping = report.search, report.held_out, report.shipping
    pairs = ", ".join(f"{t} <- {s}" for t, s in report.candidate_pairs)
    print(f"candidate pairs (target <- source): {pairs or 'none'}")
    print(f"search split   ({search.images} images): mIoU {search.baseline_miou:.2f} -> {search.tuned_miou:.2f}")
    if held:
        print(f"held-out split ({held.images} images): mIoU {held.baseline_miou:.2f} -> {held.tuned_miou:.2f}")
    if held and shipping.reported:
        low, high = shipping.reported.interval
        where = ("cross-fitted, each scored with the map chosen on the other half"
                 if report.settings["selection"] == "cross-fitted" else "test part, decided nothing")
        print(f"held-out gain ({shipping.reported.images} images, {where}): "
              f"{shipping.reported.gain:+.2f} mIoU, 90% CI [{low:+.2f}, {high:+.2f}]")
    if report.mask_token is not None:
        token = report.mask_token
        print(f"mask token (held-out mIoU of tokens 0-3: {' / '.join(f'{v:.1f}' for v in token.held_out_miou)}): "
              f"{token.verdict}")
    print(f"verdict: {report.verdict}")


def _tune_into(out: Path, encoder: Path, decoder: Path, args: argparse.Namespace, shown: Path | None = None
               ) -> tuple[int, str, str]:
    """Tune; returns the exit status (0: a tuned model ships, 3: the originals) and the shipped encoder's and
    decoder's names.

    ``shown``: the folder the outputs will be published in, when ``out`` is a work folder (``run``).
    """
    from sam_reuse.calibrate.tune import TUNED_DECODER, tune

    result = tune(encoder, decoder, args.data, out, tune_settings(args))
    _print_report(result.report)
    shipping = result.report.shipping
    shown = shown or out
    decoder_name = result.shipped_decoder
    tuned_decoder = [decoder_name] if decoder_name == TUNED_DECODER else []
    print(f"{'will publish' if shown != out else 'wrote'} {shown}: "
          f"{', '.join(shipping.candidate_files + tuned_decoder + ['report.md', 'report.json', 'miou_vs_pairs.png'])}")
    decoder_line = f" with {shown / decoder_name}" if tuned_decoder else ""
    if result.decision.ship_tuned:
        print(f"shipped: {shown / shipping.encoder}{decoder_line} (exit status 0)")
    elif tuned_decoder:
        print(f"shipped: the original encoder {shown / shipping.encoder}{decoder_line} (exit status 0)")
    else:
        print(f"shipped: the original encoder {shown / shipping.encoder} (exit status {result.exit_status}: "
              f"no tuned model ships{'; --ship-anyway ships the candidate' if shipping.candidate_files else ''})")
    return result.exit_status, shipping.encoder, decoder_name


def _tune(args: argparse.Namespace) -> int:
    return _tune_into(args.out, args.encoder or args.out / "encoder.onnx", args.decoder or args.out / "decoder.onnx",
                      args)[0]


def _evaluate(args: argparse.Namespace) -> int:
    from sam_reuse.base.contract import EVALUATION_FORMAT
    from sam_reuse.base.files import check_output_file, refuse_overwriting, write_json
    from sam_reuse.calibrate.tune import evaluate

    if args.json:
        refuse_overwriting(args.json, args.encoder, args.decoder, args.data / "manifest.jsonl", option="--json")
        check_output_file(args.json, "--json", kind=EVALUATION_FORMAT)
    result = evaluate(args.encoder, args.decoder, args.data, args.split, tune_settings(args))
    print(f"{args.split} split ({len(result.keys)} images): mIoU {result.miou:.2f}")
    if args.json:
        write_json(args.json, result.to_json())
    return 0


def _is_exported_pair(out: Path, encoder: Path, decoder: Path) -> bool:
    """Whether ``encoder`` and ``decoder`` are the very files of ``out``'s export (a rerun on its own models)."""
    try:
        return (out / "encoder.onnx").samefile(encoder) and (out / "decoder.onnx").samefile(decoder)
    except OSError:
        return False


@contextmanager
def _named_as_published(work: Path, out: Path) -> Iterator[None]:
    """Errors about files of the work folder name them where the user will find them (OUT, not OUT/.run-work)."""
    try:
        yield
    except SamReuseError as exc:
        raise SamReuseError(str(exc).replace(str(work), str(out))) from None


def _run(args: argparse.Namespace) -> int:
    """Export (or copy the given ONNX pair), tune and build the engines of what ships; publish it all at once.

    The stages work in ``OUT/.run-work`` (``resumable_outputs``): until the last stage is done, ``OUT`` holds
    exactly what it held before, and an interrupted run resumes its search there.
    """
    from sam_reuse.base.contract import (
        APP_DECODER_OUTPUTS,
        EXPORT_DERIVED_OUTPUTS,
        EXPORT_OUTPUTS,
        FIRST_ORDER_SCORER,
        JOURNAL,
    )
    from sam_reuse.base.files import check_output_folder, folder_lock, resumable_outputs
    from sam_reuse.base.runtime import load_model
    from sam_reuse.calibrate.tune import copy_model
    from sam_reuse.exporter.quantize import int8_name

    check_output_folder(args.out)
    if (args.encoder is None) != (args.decoder is None):
        raise SamReuseError("--encoder and --decoder go together")
    if args.encoder is not None:  # named as the user wrote them, before they are copied
        load_model(args.encoder, "encoder ONNX", role="encoder")
        load_model(args.decoder, "decoder ONNX", role="decoder")
    precisions = engine_precisions(args.engines)  # a typo here must not cost an export and a search
    replacing = (*EXPORT_OUTPUTS, APP_DECODER_OUTPUTS, FIRST_ORDER_SCORER, *EXPORT_DERIVED_OUTPUTS, JOURNAL)
    linked = (*EXPORT_OUTPUTS, *(path.name for path in args.out.glob(APP_DECODER_OUTPUTS)),
              *([FIRST_ORDER_SCORER] if (args.out / FIRST_ORDER_SCORER).is_file() else []))
    with folder_lock(args.out), resumable_outputs(args.out, replacing, linked=linked, copied=(JOURNAL,)) as work, \
            _named_as_published(work, args.out):
        if args.encoder is not None:
            if not _is_exported_pair(args.out, args.encoder, args.decoder):
                for stale in ("export.json", *linked[len(EXPORT_OUTPUTS):]):  # of the models this run replaces
                    (work / stale).unlink(missing_ok=True)
            copy_model(args.encoder, work / "encoder.onnx")
            copy_model(args.decoder, work / "decoder.onnx")
        else:
            export_and_report(args, out=work, reuse=True)
        status, shipped, decoder = _tune_into(work, work / "encoder.onnx", work / "decoder.onnx", args, shown=args.out)
        if precisions:
            deployment_engines(work / shipped, work / decoder, precisions)
        if args.quantize == "int8":
            quantized_encoder(work / shipped, int8_name(work / shipped), work / decoder, args, shown=args.out)
    print(f"published {args.out}")
    return status
