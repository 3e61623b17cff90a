"""ONNX Runtime CPU latency of exported encoder/decoder pairs, medians of repeated runs.

Usage:
    python benchmarks/ort_latency.py OUT_DIR [OUT_DIR ...] [--repeats 7] [--threads 2]

Each OUT_DIR is an `export-and-tune export` output. Models are timed
interleaved (A, B, A, B, ...) on the same real preprocessed image so that
machine load hits all of them alike; the first run of each is warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sam_reuse.base import imaging
from sam_reuse.base.contract import decoder_feeds
from sam_reuse.base.runtime import ort_session
from sam_reuse.base.timing import interleaved_times
from sam_reuse.calibrate.data import read_manifest

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "data" / "isic2016"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    record = read_manifest(SAMPLES)[0]
    image = imaging.load_image_rgb(record.image)
    x = imaging.preprocess(image)
    coords, labels = imaging.prompt_arrays(record.prompt, image.shape[:2])
    runs = {}
    for folder in args.exports:
        encoder = ort_session(folder / "encoder.onnx", threads=args.threads)
        decoder = ort_session(folder / "decoder.onnx", threads=args.threads)
        embedding = encoder.run(None, {"image": x})[0]
        feeds = decoder_feeds(embedding, coords, labels)
        runs[f"{folder.name}/encoder"] = lambda s=encoder: s.run(None, {"image": x})
        runs[f"{folder.name}/decoder"] = lambda s=decoder, f=feeds: s.run(None, f)
    times = interleaved_times(runs, args.repeats)
    report = {name: {"median_ms": round(1000 * statistics.median(t), 2),
                     "min_ms": round(1000 * min(t), 2), "repeats": args.repeats}
              for name, t in times.items()}
    print(json.dumps({"threads": args.threads, "image": str(record.image), "latency": report}, indent=2))


if __name__ == "__main__":
    main()
