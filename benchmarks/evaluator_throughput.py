"""Decoder evaluations per second: our batched ONNX Runtime probe vs a SamPredictor loop.

Usage:
    python benchmarks/evaluator_throughput.py EXPORT_DIR [--images 8] [--maps 6] [--repeats 3]

The reference implementation scores a candidate map by overwriting the
predictor's cached features and calling ``SamPredictor.predict`` once per
image (torch, CPU here). Ours scores it with ``calibrate.evaluator.MaskEvaluator``
(the probe decoder on cached embeddings, batch 8). Both produce a mask at the
image's resolution and its IoU; both skip the encoder (features computed
once). Rounds alternate between the two so machine load hits both alike; the
figure is the median over rounds of image-map evaluations per second, and
their ratio. EXPORT_DIR is an `export-and-tune export --model-type vit_t` output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sam_reuse.base.imaging import binary_iou, load_image_rgb
from sam_reuse.base.runtime import default_threads
from sam_reuse.calibrate.activations import encode
from sam_reuse.calibrate.data import load_sample, read_manifest
from sam_reuse.calibrate.evaluator import MaskEvaluator
from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.weights import cached_weight_path
from sam_reuse.graphops.reuse_map import reuse_index

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "data" / "isic2016"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--maps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = default_threads()  # ONNX Runtime uses this many; torch gets the same
    torch.set_num_threads(threads)

    samples = [load_sample(r) for r in read_manifest(SAMPLES)[: args.images]]
    embeddings = encode(args.export / "encoder.onnx", samples, progress=False)
    rng = np.random.default_rng(0)
    maps = [reuse_index(256, [tuple(int(c) for c in rng.choice(256, 2, replace=False)) for _ in range(4)])
            for _ in range(args.maps)]
    ours = MaskEvaluator(args.export / "decoder.onnx", samples, embeddings)

    from segment_anything import SamPredictor

    predictor = SamPredictor(build_sam("vit_t", cached_weight_path("mobilesam")))
    features = []
    for sample in samples:
        predictor.set_image(load_image_rgb(sample.record.image))
        features.append((predictor.features.clone(), predictor.original_size, predictor.input_size))

    def reference_round() -> list[float]:
        ious = []
        for index in maps:
            for sample, (feature, original_size, input_size) in zip(samples, features):
                predictor.features = feature[:, torch.from_numpy(index)]
                predictor.original_size, predictor.input_size, predictor.is_image_set = original_size, input_size, True
                masks, _, _ = predictor.predict(sample.prompt.points, sample.prompt.labels, multimask_output=False)
                ious.append(binary_iou(masks[0], sample.mask))
        return ious

    def our_round() -> list[float]:
        return [float(v) for index in maps for v in ours.ious(index)]

    rates = {"sampredictor_loop": [], "ours": []}
    work = len(maps) * len(samples)
    agreement = []
    for _ in range(args.repeats):
        for name, run in (("sampredictor_loop", reference_round), ("ours", our_round)):
            started = time.perf_counter()
            ious = run()
            rates[name].append(work / (time.perf_counter() - started))
            agreement.append(ious)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    max_iou_diff = max(abs(a - b) for a, b in zip(agreement[0], agreement[1]))
    print(f"{work} image-map evaluations per round, {args.repeats} rounds, {threads} threads")
    for name, value in medians.items():
        print(f"{name:>18}: {value:6.2f} evaluations/s (median; rounds: {', '.join(f'{v:.2f}' for v in rates[name])})")
    print(f"ratio ours / SamPredictor loop: {medians['ours'] / medians['sampredictor_loop']:.2f}x; "
          f"max |IoU difference| between the two: {max_iou_diff:.2e}")


if __name__ == "__main__":
    main()
