"""PEFT methods against parameter-free reuse, and reuse on top of each, with real MobileSAM.

Usage:
    python benchmarks/peft_vs_reuse.py train --data DATA_ROOT --checkpoint mobile_sam.pt --work out/peft
        [--sets isic2016 kvasir-seg camo] [--blocks all] [--epochs 30]
    python benchmarks/peft_vs_reuse.py evaluate --checkpoint mobile_sam.pt --work out/peft [--reuse]
    python benchmarks/peft_vs_reuse.py report --original EXPORT_DIR --work out/peft [--reuse-work out/guard]

``train`` fits every method (lora, sct, sfa, cobot) on the search split
(first 50 records) of each set, on a GPU when torch sees one, and writes
``WORK/<set>/<method>/{adapters.pt,train.json}``. It needs torch only, so it
can run on a lent GPU machine whose adapters come back as small files.

``evaluate`` runs here, on ONNX Runtime CPU: it exports each fine-tuned model
(adapters merged where linear), scores the held-out split (last 50 records),
tunes channel reuse on top with the default fast guarded search, and times
the exported encoder against the original one, side by side. The reuse-only
row is the guarded search of ``benchmarks/guarded_vs_naive.py`` (same split,
same plan), read from ``--reuse-work``. ``report`` also builds fp16
TensorRT(-RTX) engines of the first set's encoders (original, fine-tuned,
reuse on top; TensorRT-RTX needs no GPU to build). Writes
benchmarks/results/peft_vs_reuse.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from sam_reuse.calibrate.report import TuneReport

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
SETS = ("isic2016", "kvasir-seg", "camo")
METHODS = ("lora", "sct", "sfa", "cobot")
SEARCH, HELD_OUT = 50, 50


def train_all(args: argparse.Namespace) -> None:
    import torch

    from sam_reuse.finetune.config import PeftConfig, TrainSettings
    from sam_reuse.finetune.train import train

    print(f"torch {torch.__version__}, cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
          flush=True)
    for name in args.sets:
        for method in args.methods:
            config = PeftConfig(method=method, blocks=args.blocks, seed=0)
            settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                     search_images=SEARCH, holdout_images=HELD_OUT, progress=False)
            record = train("vit_t", args.checkpoint, args.data / name, args.work / name / method, config, settings)
            print(f"{name} {method}: {record['trainable_parameters']} params, loss {record['initial_loss']:.4f} -> "
                  f"{record['final_loss']:.4f}, {record['train_seconds']:.1f} s on {record['device']}", flush=True)


def _settings(**changes):
    from sam_reuse.calibrate.tune import TuneSettings

    # The search's own choice, always written as encoder.tuned.onnx, as when these figures were measured.
    return TuneSettings(search_images=SEARCH, holdout_images=HELD_OUT, progress=False, selection="guarded",
                        ship_anyway=True, **changes)


def evaluate_all(args: argparse.Namespace) -> None:
    """Export, score held-out, then (with --reuse) tune reuse on top; each step is skipped when already done."""
    from sam_reuse.base.files import write_json
    from sam_reuse.calibrate.data import read_manifest
    from sam_reuse.calibrate.tune import evaluate, tune
    from sam_reuse.finetune.export import export_finetuned

    verify = read_manifest(REPO / "samples" / "data" / "isic2016")[:2]
    jobs = [(name, method) for name in args.sets for method in args.methods]
    for name, method in jobs:
        folder = args.work / name / method
        export = folder / "export"
        if not (export / "export.json").exists():
            export_finetuned("vit_t", folder / "adapters.pt", export, args.checkpoint, verify)
        if not (folder / "held_out.json").exists():
            held = evaluate(export / "encoder.onnx", export / "decoder.onnx", args.data / name, "held-out", _settings())
            write_json(folder / "held_out.json", held.to_json())
        print(f"{name} {method}: held-out mIoU {json.loads((folder / 'held_out.json').read_text())['miou']:.2f}",
              flush=True)
    for name, method in jobs if args.reuse else []:
        folder = args.work / name / method
        if not (folder / "reuse" / "report.json").exists():
            tune(folder / "export" / "encoder.onnx", folder / "export" / "decoder.onnx", args.data / name,
                 folder / "reuse", _settings())
        held = TuneReport.load(folder / "reuse" / "report.json").held_out
        print(f"{name} {method} + reuse: {held.baseline_miou:.2f} -> {held.tuned_miou:.2f}", flush=True)


def _interval(base: dict[str, float], other: dict[str, float]) -> dict:
    from sam_reuse.calibrate.metrics import bootstrap_interval

    keys = sorted(base)
    gains = np.array([other[k] - base[k] for k in keys])
    low, high = bootstrap_interval(gains)
    return {"gain": float(gains.mean()), "gain_interval_90": [low, high]}


def _latency_ratios(original: Path, encoders: dict[str, Path], repeats: int) -> dict[str, float]:
    """Median encoder latency of each model over the original's, timed interleaved in one run."""
    import statistics

    from sam_reuse.base import imaging
    from sam_reuse.base.runtime import ort_session
    from sam_reuse.base.timing import interleaved_times
    from sam_reuse.calibrate.data import read_manifest

    record = read_manifest(REPO / "samples" / "data" / "isic2016")[0]
    x = imaging.preprocess(imaging.load_image_rgb(record.image))
    sessions = {"original": ort_session(original, threads=2),
                **{k: ort_session(v, threads=2) for k, v in encoders.items()}}
    times = interleaved_times({k: lambda s=s: s.run(None, {"image": x}) for k, s in sessions.items()}, repeats)
    base = statistics.median(times["original"])
    return {name: statistics.median(t) / base for name, t in times.items() if name != "original"}


def _engines(original: Path, work: Path, name: str, methods: list[str]) -> dict:
    """fp16 engines of the original, each fine-tuned and each reuse-on-top encoder of set ``name``.

    TensorRT-RTX builds them ahead of time without a GPU; returns size and build time per model, or why not.
    """
    from sam_reuse.base.errors import SamReuseError
    from sam_reuse.exporter.engine import build_engine, engine_name

    encoders = {"original": original / "encoder.onnx"}
    for method in methods:
        encoders[method] = work / name / method / "export" / "encoder.onnx"
        encoders[f"{method}+reuse"] = work / name / method / "reuse" / "encoder.tuned.onnx"
    built = {}
    for label, onnx_path in encoders.items():
        if not onnx_path.exists():
            continue
        engine = work / name / "engines" / engine_name(f"{label}.onnx", "fp16")
        try:
            sidecar = build_engine(onnx_path, engine, "fp16")
        except SamReuseError as exc:
            return {"skipped": str(exc)}
        built[label] = {"backend": f"{sidecar['backend']} {sidecar['backend_version']}",
                        "engine_mb": sidecar["engine_bytes"] / 1e6, "build_s": sidecar["build_s"]}
    return {"set": name, "engines": built}


def report_all(args: argparse.Namespace) -> None:
    from sam_reuse.base.files import write_json

    rows = {}
    for name in args.sets:
        reuse_report = TuneReport.load(args.reuse_work / name / "guarded" / "report.json")
        base = {p["key"]: p["baseline"] for p in reuse_report.held_out.per_image}
        reuse = {p["key"]: p["tuned"] for p in reuse_report.held_out.per_image}
        set_rows = {"baseline": {"held_out_miou": reuse_report.held_out.baseline_miou},
                    "reuse": {"held_out_miou": reuse_report.held_out.tuned_miou, **_interval(base, reuse),
                              "pairs": len(reuse_report.candidate_pairs)}}
        for method in args.methods:
            folder = args.work / name / method
            trained = json.loads((folder / "train.json").read_text())
            held = json.loads((folder / "held_out.json").read_text())
            peft = held["per_image"]
            set_rows[method] = {"held_out_miou": held["miou"], **_interval(base, peft),
                                "trainable_parameters": trained["trainable_parameters"],
                                "train_seconds": trained["train_seconds"], "device": trained["device"],
                                "final_train_loss": trained["final_loss"]}
            reuse_file = folder / "reuse" / "report.json"
            if reuse_file.exists():
                on_top = TuneReport.load(reuse_file).held_out
                tuned = {p["key"]: p["tuned"] for p in on_top.per_image}
                set_rows[f"{method}+reuse"] = {"held_out_miou": on_top.tuned_miou, **_interval(base, tuned),
                                               "over_peft": _interval(peft, tuned)}
        rows[name] = set_rows
    first = args.sets[0]
    latency = _latency_ratios(args.original / "encoder.onnx",
                              {m: args.work / first / m / "export" / "encoder.onnx" for m in args.methods},
                              args.repeats)
    result = {"machine": platform.processor() or platform.machine(), "search_images": SEARCH,
              "held_out_images": HELD_OUT, "sets": rows, "encoder_latency_ratio_vs_original": latency,
              "latency_models_from": first, "engines": _engines(args.original, args.work, first, args.methods)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "peft_vs_reuse.json", result)
    (RESULTS / "peft_vs_reuse.md").write_text(_markdown(result))
    print(_markdown(result))


def _fmt(row: dict) -> str:
    low, high = row["gain_interval_90"]
    return f"{row['gain']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _markdown(result: dict) -> str:
    lines = ["# PEFT vs parameter-free reuse, MobileSAM (held-out mIoU, 50 search / 50 held-out)", "",
             "Gain: held-out mIoU minus the original model's; '+reuse over PEFT': the reuse search's gain on top "
             "of the fine-tuned model. Both with their 90% paired bootstrap interval.", ""]
    for name, rows in result["sets"].items():
        lines += [f"## {name}", "",
                  "| model | held-out mIoU | gain [90% CI] | +reuse over PEFT [90% CI] | trainable params | training |",
                  "|---|---:|---|---|---:|---|"]
        for label, row in rows.items():
            gain = _fmt(row) if "gain" in row else ""
            over = _fmt(row["over_peft"]) if "over_peft" in row else ""
            params = row.get("trainable_parameters", "0" if label in ("baseline", "reuse") else "")
            train = f"{row['train_seconds']:.0f} s, {row['device']}" if "train_seconds" in row else ""
            lines.append(f"| {label} | {row['held_out_miou']:.2f} | {gain} | {over} | {params} | {train} |")
        lines.append("")
    lines += ["Encoder latency on ONNX Runtime CPU (2 threads), median ratio to the original, timed interleaved "
              f"(models of {result['latency_models_from']}):", ""]
    lines += [f"- {method}: {ratio:.3f}" for method, ratio in result["encoder_latency_ratio_vs_original"].items()]
    engines = result["engines"]
    if "skipped" in engines:
        lines += ["", f"TensorRT engines: not built ({engines['skipped']})."]
    else:
        lines += ["", f"fp16 TensorRT engines of the {engines['set']} encoders, built here ahead of time (no GPU); "
                  "their latency needs a GPU this TensorRT can run on and was not measured:", "",
                  "| encoder | backend | engine | build |", "|---|---|---:|---:|"]
        lines += [f"| {label} | {e['backend']} | {e['engine_mb']:.1f} MB | {e['build_s']:.1f} s |"
                  for label, e in engines["engines"].items()]
    return "\n".join(lines) + "\n"


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "peft")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    return parser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = _common(commands.add_parser("train"))
    trainer.add_argument("--blocks", default="all")
    trainer.add_argument("--epochs", type=int, default=30)
    trainer.add_argument("--lr", type=float, default=1e-3)
    trainer.add_argument("--batch-size", type=int, default=4)
    evaluator = _common(commands.add_parser("evaluate"))
    evaluator.add_argument("--reuse", action="store_true", help="also tune channel reuse on top of each model")
    reporter = commands.add_parser("report")
    reporter.add_argument("--original", type=Path, required=True, help="export folder of the original model")
    reporter.add_argument("--work", type=Path, default=REPO / "out" / "peft")
    reporter.add_argument("--reuse-work", type=Path, default=REPO / "out" / "guard")
    reporter.add_argument("--sets", nargs="+", default=list(SETS))
    reporter.add_argument("--methods", nargs="+", default=list(METHODS))
    reporter.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    {"train": train_all, "evaluate": evaluate_all, "report": report_all}[args.command](args)


if __name__ == "__main__":
    main()
