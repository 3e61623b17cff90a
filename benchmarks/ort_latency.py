"""ONNX Runtime CPU latency of exported encoder/decoder pairs, medians of repeated runs.

Usage:
    python benchmarks/ort_latency.py [OUT_DIR ...] [--random-export MODEL_TYPE ...] [--repeats 7] [--threads 2]

Each OUT_DIR is an `export-and-tune export` output; ``--random-export
sam2.1_hiera_t`` also exports that architecture with random weights (latency
does not depend on the values) into out/<type>-random, once, and times it
too. Models are timed interleaved (A, B, A, B, ...) on the same real image,
preprocessed the way each export's convention says (SAM or SAM 2), so that
machine load hits all of them alike; the first run of each is warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sam_reuse.base import imaging
from sam_reuse.base.contract import EMBEDDING, decoder_feeds, high_res_maps
from sam_reuse.base.runtime import load_model, model_convention, ort_session
from sam_reuse.base.timing import interleaved_times
from sam_reuse.calibrate.data import read_manifest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "data" / "isic2016"


def _random_export(model_type: str, record) -> Path:
    from sam_reuse.exporter.models import build_sam
    from sam_reuse.exporter.onnx_export import export_identity, export_sam
    from sam_reuse.exporter.sam2_export import export_sam2

    folder = REPO / "out" / f"{model_type}-random"
    if not (folder / "export.json").is_file():
        model = build_sam(model_type, random_weights=True)
        info = {**export_identity(model_type, None, 0, "legacy", 17), "random_weights": True}
        export = export_sam2 if type(model).__name__ == "SAM2Base" else export_sam
        export(model, folder, [record], info)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="*", type=Path)
    parser.add_argument("--random-export", nargs="*", default=[], metavar="MODEL_TYPE")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    record = read_manifest(SAMPLES)[0]
    image = imaging.load_image_rgb(record.image)
    folders = [*args.exports, *(_random_export(model_type, record) for model_type in args.random_export)]
    runs = {}
    for folder in folders:
        encoder_model = load_model(folder / "encoder.onnx", role="encoder")
        convention = model_convention(encoder_model)
        x = imaging.preprocess(image, convention=convention)
        encoder = ort_session(encoder_model.SerializeToString(), threads=args.threads)
        decoder = ort_session(folder / "decoder.onnx", threads=args.threads)
        outputs = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, {"image": x})))
        coords, labels = imaging.prompt_arrays(record.prompt, image.shape[:2], convention=convention)
        feeds = decoder_feeds(outputs[EMBEDDING], coords, labels, high_res=high_res_maps(outputs))
        runs[f"{folder.name}/encoder"] = lambda s=encoder, x=x: s.run(None, {"image": x})
        runs[f"{folder.name}/decoder"] = lambda s=decoder, f=feeds: s.run(None, f)
    times = interleaved_times(runs, args.repeats)
    report = {name: {"median_ms": round(1000 * statistics.median(t), 2),
                     "min_ms": round(1000 * min(t), 2), "repeats": args.repeats}
              for name, t in times.items()}
    print(json.dumps({"threads": args.threads, "image": str(record.image), "latency": report}, indent=2))


if __name__ == "__main__":
    main()
