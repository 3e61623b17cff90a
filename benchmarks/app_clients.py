"""Our app-format pair against samexporter's own export of the same weights, in samexporter's own client.

Usage:
    python benchmarks/app_clients.py OUR_SAMEXPORTER_DIR THEIR_ENCODER THEIR_DECODER [--rounds 7] [--threads 2]

OUR_SAMEXPORTER_DIR is ``export-and-tune app-format --format samexporter`` output of a MobileSAM export;
THEIR_ENCODER / THEIR_DECODER come from samexporter 0.5.0's exporter on the same ``mobile_sam.pt``
(``python -m samexporter.export_encoder --model-type mobile ...`` and ``export_decoder --return-single-mask``),
which needs samexporter with its torch dependencies in another environment. In one process, on the bundled
isic2016 images with their points, rounds alternate between the two pairs in ``SegmentAnythingONNX``:
``encode`` (preprocessing included) and ``predict_masks`` (the decoder and the client's upscale), medians
per round, and their ratio ours / theirs. Also the largest embedding difference between the two encoders and
the mask IoU between the pairs. Writes benchmarks/results/app_clients.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ours", type=Path)
    parser.add_argument("their_encoder", type=Path)
    parser.add_argument("their_decoder", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import cv2
    import onnxruntime
    from samexporter.sam_onnx import SegmentAnythingONNX

    from sam_reuse.base.files import write_json
    from sam_reuse.base.imaging import load_image_rgb
    from sam_reuse.calibrate.data import read_records
    from sam_reuse.samples import BUNDLED_DATA

    def client(encoder: Path, decoder: Path) -> SegmentAnythingONNX:
        model = SegmentAnythingONNX(str(encoder), str(decoder))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        model.encoder_session = onnxruntime.InferenceSession(str(encoder), options, ["CPUExecutionProvider"])
        model.decoder_session = onnxruntime.InferenceSession(str(decoder), options, ["CPUExecutionProvider"])
        return model

    pairs = {"ours": client(args.ours / "encoder.onnx", args.ours / "decoder.onnx"),
             "samexporter": client(args.their_encoder, args.their_decoder)}
    records = read_records(BUNDLED_DATA)[: args.images]
    images = [cv2.cvtColor(load_image_rgb(r.image), cv2.COLOR_RGB2BGR) for r in records]
    prompts = [[{"type": "point", "data": [float(v) for v in r.points[0]], "label": 1}] for r in records]
    times = {name: {"encode": [], "predict_masks": []} for name in pairs}
    embeddings, masks = {}, {}
    for _ in range(args.rounds):
        for name, model in pairs.items():  # interleaved: both pairs see the same machine state
            started = time.perf_counter()
            embeddings[name] = [model.encode(image) for image in images]
            times[name]["encode"].append((time.perf_counter() - started) / len(images))
            started = time.perf_counter()
            masks[name] = [model.predict_masks(e, p)[0, 0] > 0 for e, p in zip(embeddings[name], prompts)]
            times[name]["predict_masks"].append((time.perf_counter() - started) / len(images))
    medians = {name: {stage: float(np.median(v)) for stage, v in stages.items()} for name, stages in times.items()}
    ratios = {stage: medians["ours"][stage] / medians["samexporter"][stage] for stage in ("encode", "predict_masks")}
    drift = max(float(np.abs(a["image_embedding"] - b["image_embedding"]).max())
                for a, b in zip(embeddings["ours"], embeddings["samexporter"]))
    ious = [float((a & b).sum() / max((a | b).sum(), 1)) for a, b in zip(masks["ours"], masks["samexporter"])]
    result = {"machine": platform.node(), "threads": args.threads, "rounds": args.rounds, "images": len(images),
              "median_s": medians, "ours_over_samexporter": ratios, "embedding_max_abs_diff": drift,
              "mask_iou": ious}
    write_json(RESULTS / "app_clients.json", result)
    text = "\n".join([
        "# Our app-format pair against samexporter's export, in samexporter's client (MobileSAM, ONNX Runtime CPU)",
        "", f"{len(images)} bundled images, {args.rounds} interleaved rounds, {args.threads} threads; medians.", "",
        "| stage | ours / samexporter |", "|---|---:|",
        *[f"| {stage} | {ratio:.2f} |" for stage, ratio in ratios.items()], "",
        f"Largest embedding difference between the two encoders: {drift:.3g}; mask IoU between the pairs: "
        + ", ".join(f"{v:.4f}" for v in ious) + "."]) + "\n"
    (RESULTS / "app_clients.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
