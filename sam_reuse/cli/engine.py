"""``export-and-tune engine | verify-engine``: TensorRT engines from ONNX, and engines checked against ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from sam_reuse.base.errors import SamReuseError
from sam_reuse.cli.common import add_data_args, comparison_status, tune_settings
from sam_reuse.samples import BUNDLED_DATA


def register(sub: argparse._SubParsersAction) -> dict:
    from sam_reuse.exporter.engine import BACKENDS, PRECISIONS

    verify_engine = sub.add_parser("verify-engine", help="compare a TensorRT engine with its source ONNX on ONNX "
                                   "Runtime (polygraphy; needs an NVIDIA GPU)")
    verify_engine.add_argument("engine", type=Path, help="an engine built by export-and-tune (with its .json sidecar)")
    verify_engine.add_argument("--data", type=Path, default=BUNDLED_DATA, help="images (and prompts) to compare on")
    verify_engine.add_argument("--images", type=int, default=2, help="number of images (default: 2)")

    engine = sub.add_parser("engine", help="build a TensorRT (or TensorRT-RTX, no GPU needed) engine from an ONNX model")
    engine.add_argument("onnx", type=Path)
    engine.add_argument("--out", type=Path, help="engine path (default: MODEL.<precision>.engine beside the ONNX)")
    engine.add_argument("--precision", default="fp32", choices=PRECISIONS)
    engine.add_argument("--batch", default="1",
                        help="range of the first dimension, MIN:OPT:MAX or one number: images for encoder.onnx and "
                        "decoder.onnx, prompts per call (K) for the app decoders decoder.prompts*.onnx (default: 1)")
    engine.add_argument("--points", default="1:2:16",
                        help="decoder prompt points MIN:OPT:MAX, the padding point included (default: 1:2:16)")
    engine.add_argument("--compute-capability", action="append", default=[], metavar="X.Y",
                        help="TensorRT-RTX target GPU, repeatable, e.g. 8.6 (default: its portable set)")
    engine.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: standard TensorRT when installed, else TensorRT-RTX")

    quantize = sub.add_parser("quantize", help="INT8 encoder (ONNX Runtime static QDQ) calibrated on the search "
                              "split's images; with --decoder, held-out mIoU of fp32 and int8 side by side")
    quantize.add_argument("onnx", type=Path, help="encoder ONNX (original or tuned)")
    quantize.add_argument("--out", type=Path, help="INT8 model path (default: MODEL.int8.onnx beside the ONNX)")
    quantize.add_argument("--decoder", type=Path, help="decoder ONNX: also score fp32 and int8 on the held-out split")
    add_data_args(quantize, BUNDLED_DATA)
    return {"engine": _engine, "verify-engine": _verify_engine, "quantize": _quantize}


def engine_precisions(text: str) -> tuple[str, ...]:
    """``--engines`` of ``run``: comma-separated precisions, or none."""
    from sam_reuse.exporter.engine import PRECISIONS

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


def deployment_engines(encoder: Path, decoder: Path, precisions: tuple[str, ...]) -> None:
    """Engines of the shipped encoder and the decoder; without TensorRT(-RTX), a note and nothing else."""
    from sam_reuse.exporter.engine import ENABLE_HINT, build_deployment_engines, load_backend

    try:
        backend = load_backend()
    except SamReuseError:
        print(f"engines skipped: {ENABLE_HINT}. The ONNX models in {decoder.parent} are complete without them.")
        return
    for path, sidecar in build_deployment_engines((encoder, decoder), precisions, backend):
        _print_engine(sidecar, path)


def _verify_engine(args: argparse.Namespace) -> int:
    from sam_reuse.calibrate.data import load_sample, read_records
    from sam_reuse.exporter.verify import ENGINE_TOLERANCES, verify_engine

    if args.images < 1:
        raise SamReuseError("--images must be at least 1")
    result = verify_engine(args.engine, [load_sample(r) for r in read_records(args.data)[: args.images]])
    return comparison_status(result, "engine - onnxrt",
                             f"verify-engine FAILED: {args.engine} differs from its ONNX beyond the precision's "
                             f"tolerances {ENGINE_TOLERANCES}",
                             f"verify-engine passed: {args.engine} agrees with its source ONNX on ONNX Runtime")


def _engine(args: argparse.Namespace) -> int:
    from sam_reuse.base.contract import ENGINE_SIDECAR_FORMAT
    from sam_reuse.base.files import check_output_file, refuse_overwriting, sidecar_path
    from sam_reuse.exporter.engine import build_engine, engine_name, load_backend, parse_range

    out = args.out or engine_name(args.onnx, args.precision)
    check_output_file(out, "--out")
    refuse_overwriting(out, args.onnx)
    if out.suffix in (".onnx", ".json"):
        raise SamReuseError(f"--out {out}: an engine named {out.suffix} would pass for another kind of file; "
                            "name it .engine")
    refuse_overwriting(sidecar_path(out), args.onnx, option="--out (its sidecar)")
    check_output_file(sidecar_path(out), "--out (its sidecar)", kind=ENGINE_SIDECAR_FORMAT)
    sidecar = build_engine(args.onnx, out, args.precision, parse_range(args.batch, "--batch"),
                           parse_range(args.points, "--points"), tuple(args.compute_capability),
                           load_backend(args.backend))
    _print_engine(sidecar, out)
    return 0


COMPARED_IMAGES = 4  # held-out images polygraphy compares an INT8 encoder with its fp32 source on


def quantized_encoder(encoder: Path, out: Path, decoder: Path | None, args: argparse.Namespace,
                      shown: Path | None = None) -> None:
    """INT8 ``encoder`` at ``out`` calibrated on the search split; with ``decoder``, held-out mIoU of fp32 and
    int8 side by side and their latency ratio, printed and kept in the sidecar. ``shown``: the folder to name
    (``run``'s outputs), whose report (in ``out``'s folder) gets the same figures."""
    from sam_reuse.base.contract import EMBEDDING
    from sam_reuse.base.files import sidecar_path, write_json
    from sam_reuse.base.runtime import default_threads
    from sam_reuse.calibrate.data import read_records, split_records
    from sam_reuse.calibrate.report import Int8Summary, add_int8_summary
    from sam_reuse.calibrate.tune import evaluate
    from sam_reuse.exporter.quantize import latency_ratio, quantize_encoder

    settings = tune_settings(args)
    search, held_out = split_records(read_records(args.data, args.masks), args.search_images, args.holdout_images)
    sidecar = quantize_encoder(encoder, search, out, progress=settings.progress,
                               compare_on=(held_out or search)[:COMPARED_IMAGES])
    kept = sum(len(names) for names in sidecar["float_nodes"].values())
    named = (shown or out.parent) / out.name
    compared = sidecar["polygraphy"]
    embedding = compared["outputs"][EMBEDDING]
    print(f"wrote {named} and {named}.json ({len(sidecar['quantized_nodes'])} MatMuls in int8, {kept} nodes kept "
          f"in float; calibrated on {len(search)} images)")
    print(f"polygraphy, int8 against fp32 on {compared['images']} images: embedding mean |diff| "
          f"{embedding['mean_abs_diff']:.3g}, max {embedding['max_abs_diff']:.3g} "
          f"({'within' if compared['passed'] else 'OVER'} its tolerance, {compared['passes_when']})")
    if decoder is not None:
        scores = {name: evaluate(model, decoder, args.data, "held-out", settings)
                  for name, model in (("fp32", encoder), ("int8", out))}
        held = {"images": len(scores["fp32"].keys), "fp32_miou": scores["fp32"].miou,
                "int8_miou": scores["int8"].miou}
        latency = {"int8_over_fp32": latency_ratio(encoder, out, (held_out or search)[0]), "threads": default_threads(),
                   "how": "ONNX Runtime CPU, one image, median of 5 interleaved rounds"}
        write_json(sidecar_path(out), {**sidecar, "held_out": held, "latency": latency})
        print(f"held-out split ({held['images']} images): mIoU fp32 {held['fp32_miou']:.2f}, "
              f"int8 {held['int8_miou']:.2f} ({held['int8_miou'] - held['fp32_miou']:+.2f}); "
              f"latency int8 / fp32 {latency['int8_over_fp32']:.2f} ({latency['threads']} threads)")
        if shown is not None:
            add_int8_summary(out.parent, Int8Summary(
                model=out.name, images=held["images"], fp32_miou=held["fp32_miou"], int8_miou=held["int8_miou"],
                latency_ratio=latency["int8_over_fp32"], threads=latency["threads"]))


def _quantize(args: argparse.Namespace) -> int:
    from sam_reuse.base.runtime import load_model
    from sam_reuse.exporter.quantize import int8_name

    if args.decoder is not None:
        load_model(args.decoder, "decoder ONNX", role="decoder")  # before minutes of calibration
    quantized_encoder(args.onnx, args.out or int8_name(args.onnx), args.decoder, args)
    return 0
