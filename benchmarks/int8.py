"""INT8 encoder and decoder against fp32: held-out mIoU per set and ONNX Runtime CPU latency, side by side.

Usage:
    python benchmarks/int8.py EXPORT_DIR [--sets isic2016 kvasir-seg camo] [--repeats 7] [--threads 2]

EXPORT_DIR is an `export-and-tune export` output (MobileSAM). For each shared set, the encoder is quantized
(``exporter.quantize``) on the first 50 records (the search split) and both encoders are scored with the
float decoder on the last 50 (held out): mIoU, and the paired per-image difference with its 90% bootstrap
interval. The decoder is quantized with the same recipe (weight MatMuls int8), calibrated on the search
split's embeddings and prompts, and scored with the float encoder the same way. Latency: each fp32 model and
its int8 version timed interleaved on one held-out image (``exporter.quantize.latency_ratio`` for the
encoder), the median of round-by-round ratios. Writes benchmarks/results/int8.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import onnx
from onnxruntime import InferenceSession
from onnxruntime.quantization import CalibrationDataReader

from sam_reuse.base.contract import decoder_feeds
from sam_reuse.base.files import write_json
from sam_reuse.base.imaging import load_image_rgb, preprocess, prompt_arrays
from sam_reuse.base.records import Record
from sam_reuse.base.runtime import ort_session
from sam_reuse.base.timing import interleaved_times, median_ratio
from sam_reuse.calibrate.data import load_sample, read_records, split_records
from sam_reuse.calibrate.metrics import bootstrap_interval
from sam_reuse.calibrate.tune import TuneSettings, evaluate
from sam_reuse.exporter.quantize import float_nodes, latency_ratio, quantize_encoder, quantize_weight_matmuls

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def _decoder_feeds(encoder: InferenceSession, record: Record) -> dict[str, np.ndarray]:
    sample = load_sample(record)
    embedding = encoder.run(None, {"image": preprocess(load_image_rgb(record.image))})[0]
    return decoder_feeds(embedding, *prompt_arrays(sample.prompt, sample.hw))


class _DecoderCalibration(CalibrationDataReader):
    """The search split's embeddings (float encoder) and given prompts, one decoder call each."""

    def __init__(self, encoder_path: Path, records: list[Record]):
        encoder = ort_session(encoder_path)
        self._feeds = iter([_decoder_feeds(encoder, r) for r in records])

    def get_next(self):
        return next(self._feeds, None)


def _compare(label: str, scores: dict, latency: float) -> dict:
    difference = (scores["int8"].ious - scores["fp32"].ious) * 100
    return {f"{label}_fp32_miou": scores["fp32"].miou, f"{label}_int8_miou": scores["int8"].miou,
            f"{label}_difference": float(difference.mean()),
            f"{label}_difference_interval_90": list(bootstrap_interval(difference)),
            f"{label}_latency_ratio": latency}


def measure(export: Path, work: Path, name: str, repeats: int) -> dict:
    data = SHARED / name
    encoder, decoder = export / "encoder.onnx", export / "decoder.onnx"
    search, held = split_records(read_records(data), 50, 50)
    settings = TuneSettings(search_images=50, holdout_images=50, progress=False)

    int8_encoder = work / f"encoder.{name}.int8.onnx"
    sidecar = quantize_encoder(encoder, search, int8_encoder, progress=False)
    encoder_scores = {label: evaluate(model, decoder, data, "held-out", settings)
                      for label, model in (("fp32", encoder), ("int8", int8_encoder))}

    int8_decoder = work / f"decoder.{name}.int8.onnx"
    quantize_weight_matmuls(decoder, int8_decoder, _DecoderCalibration(encoder, search),
                            float_nodes(onnx.load(str(decoder))))
    decoder_scores = {label: evaluate(encoder, model, data, "held-out", settings)
                      for label, model in (("fp32", decoder), ("int8", int8_decoder))}
    feed = _decoder_feeds(ort_session(encoder), held[0])
    sessions = {"fp32": ort_session(decoder), "int8": ort_session(int8_decoder)}
    times = interleaved_times({label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()}, repeats)
    return {"set": name, **_compare("encoder", encoder_scores, latency_ratio(encoder, int8_encoder, held[0], repeats)),
            **_compare("decoder", decoder_scores, median_ratio(times, "int8", "fp32")),
            "encoder_quantized_nodes": len(sidecar["quantized_nodes"]),
            "encoder_float_nodes": {k: len(v) for k, v in sidecar["float_nodes"].items()}}


def markdown(rows: list[dict], threads: str) -> str:
    lines = ["# INT8 (weight MatMuls) against fp32, MobileSAM", "",
             "Calibrated on each set's first 50 records, scored on the last 50 with the other network in fp32; "
             f"latency on ONNX Runtime CPU, {threads} threads, interleaved.", "",
             "| set | model | fp32 mIoU | int8 mIoU | int8 - fp32 [90% CI] | latency int8 / fp32 |",
             "|---|---|---:|---:|---|---:|"]
    for r in rows:
        for label in ("encoder", "decoder"):
            low, high = r[f"{label}_difference_interval_90"]
            lines.append(f"| {r['set']} | {label} | {r[f'{label}_fp32_miou']:.2f} | {r[f'{label}_int8_miou']:.2f} | "
                         f"{r[f'{label}_difference']:+.2f} [{low:+.2f}, {high:+.2f}] | "
                         f"{r[f'{label}_latency_ratio']:.2f} |")
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
