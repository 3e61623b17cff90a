"""INT8 encoder against fp32: held-out mIoU per set and ONNX Runtime CPU latency, measured side by side.

Usage:
    python benchmarks/int8.py EXPORT_DIR [--sets isic2016 kvasir-seg camo] [--repeats 7] [--threads 2]

EXPORT_DIR is an `export-and-tune export` output (MobileSAM). For each shared set, the encoder is quantized
(``exporter.quantize``) on the first 50 records (the search split) and both encoders are scored with the
float decoder on the last 50 (held out): mIoU, and the paired per-image difference with its 90% bootstrap
interval. Latency: the fp32 and int8 encoders timed interleaved on one held-out image of each set, the
ratio of medians' round-by-round ratios. Writes benchmarks/results/int8.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
from timing import interleaved_times, median_ratio

from sam_reuse.base.files import write_json
from sam_reuse.base.imaging import load_image_rgb, preprocess
from sam_reuse.base.runtime import ort_session
from sam_reuse.calibrate.data import read_records, split_records
from sam_reuse.calibrate.metrics import bootstrap_interval
from sam_reuse.calibrate.tune import TuneSettings, evaluate
from sam_reuse.exporter.quantize import quantize_encoder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def measure(export: Path, work: Path, name: str, repeats: int) -> dict:
    data = SHARED / name
    search, held = split_records(read_records(data), 50, 50)
    int8 = work / f"encoder.{name}.int8.onnx"
    sidecar = quantize_encoder(export / "encoder.onnx", search, int8, progress=False)
    settings = TuneSettings(search_images=50, holdout_images=50, progress=False)
    scores = {label: evaluate(model, export / "decoder.onnx", data, "held-out", settings)
              for label, model in (("fp32", export / "encoder.onnx"), ("int8", int8))}
    difference = (scores["int8"].ious - scores["fp32"].ious) * 100
    feed = {"image": preprocess(load_image_rgb(held[0].image))}
    sessions = {"fp32": ort_session(export / "encoder.onnx"), "int8": ort_session(int8)}
    times = interleaved_times({label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()}, repeats)
    return {"set": name, "fp32_miou": scores["fp32"].miou, "int8_miou": scores["int8"].miou,
            "difference": float(difference.mean()), "difference_interval_90": list(bootstrap_interval(difference)),
            "latency_ratio": median_ratio(times, "int8", "fp32"),
            "fp32_median_s": float(np.median(times["fp32"])), "int8_median_s": float(np.median(times["int8"])),
            "quantized_nodes": len(sidecar["quantized_nodes"]),
            "float_nodes": {k: len(v) for k, v in sidecar["float_nodes"].items()}}


def markdown(rows: list[dict], threads: str) -> str:
    lines = ["# INT8 encoder (weight MatMuls) against fp32, MobileSAM", "",
             f"Calibrated on each set's first 50 records, scored on the last 50; latency on ONNX Runtime CPU, "
             f"{threads} threads, interleaved.", "",
             "| set | fp32 mIoU | int8 mIoU | int8 - fp32 [90% CI] | latency int8 / fp32 |", "|---|---:|---:|---|---:|"]
    for r in rows:
        low, high = r["difference_interval_90"]
        lines.append(f"| {r['set']} | {r['fp32_miou']:.2f} | {r['int8_miou']:.2f} | {r['difference']:+.2f} "
                     f"[{low:+.2f}, {high:+.2f}] | {r['latency_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default="2")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "int8")
    args = parser.parse_args()
    os.environ["SAM_REUSE_THREADS"] = args.threads
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.export, args.work, name, args.repeats) for name in args.sets]
    write_json(RESULTS / "int8.json", {"export": str(args.export), "machine": platform.node(),
                                       "threads": args.threads, "rows": rows})
    (RESULTS / "int8.md").write_text(markdown(rows, args.threads))
    print(markdown(rows, args.threads))


if __name__ == "__main__":
    main()
