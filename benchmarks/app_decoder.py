"""The decoder for apps: K prompts in one call against K calls of one prompt, ONNX Runtime CPU.

Usage:
    python benchmarks/app_decoder.py EXPORT_DIR [--prompts 16] [--repeats 7] [--threads 2]

EXPORT_DIR is an `export-and-tune export --app-decoders single` output. On one bundled image's embedding,
K one-point prompts are decoded in one call and in K calls, interleaved; prints the per-prompt latency ratio
and whether the binary masks are identical. Writes benchmarks/results/app_decoder.json.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np

from sam_reuse.base import imaging
from sam_reuse.base.contract import decoder_feeds
from sam_reuse.base.files import write_json
from sam_reuse.base.runtime import ort_session
from sam_reuse.base.timing import interleaved_times, median_ratio
from sam_reuse.calibrate.data import read_manifest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "data" / "isic2016"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default="2")
    args = parser.parse_args()
    os.environ["SAM_REUSE_THREADS"] = args.threads
    record = read_manifest(SAMPLES)[0]
    image = imaging.load_image_rgb(record.image)
    embedding = ort_session(args.export / "encoder.onnx").run(None, {"image": imaging.preprocess(image)})[0]
    decoder = ort_session(args.export / "decoder.prompts.onnx")
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1024, (args.prompts, 1, 2)).astype(np.float32)
    coords = np.concatenate([points, np.zeros_like(points)], axis=1)  # each prompt: a point and the padding point
    labels = np.tile(np.array([[1.0, -1.0]], np.float32), (args.prompts, 1))
    together = decoder_feeds(embedding, coords, labels)
    together["mask_input"] = np.zeros((args.prompts, 1, 256, 256), np.float32)
    together["has_mask_input"] = np.zeros(args.prompts, np.float32)
    singles = [decoder_feeds(embedding, coords[k:k + 1], labels[k:k + 1]) for k in range(args.prompts)]

    def one_call():
        return decoder.run(None, together)[0]

    def separate_calls():
        return np.concatenate([decoder.run(None, feeds)[0] for feeds in singles])

    identical = bool(np.array_equal(one_call() > 0, separate_calls() > 0))
    times = interleaved_times({"one call": one_call, "separate calls": separate_calls}, args.repeats)
    result = {"prompts": args.prompts, "threads": args.threads, "machine": platform.node(),
              "binary_masks_identical": identical,
              "one_call_over_separate_calls": median_ratio(times, "one call", "separate calls"),
              "median_s": {name: float(np.median(t)) for name, t in times.items()}}
    write_json(REPO / "benchmarks" / "results" / "app_decoder.json", result)
    print(result)


if __name__ == "__main__":
    main()
