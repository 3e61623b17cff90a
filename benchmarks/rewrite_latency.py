"""ONNX Runtime CPU latency of rewritten encoders relative to the original (paired, interleaved runs).

Usage:
    python benchmarks/rewrite_latency.py ENCODER.onnx [--repeats 9] [--threads 2] [--seed 0]

Variants, all built from seeded random reuse maps (latency does not depend on
which channels are chosen):
  * embedding-gather-16: 16 pairs at the image embedding (gather, the only exact rewrite there);
  * mlp-fold-16:         16 pairs at every MLP site, folded into fc1 (should cost nothing);
  * mlp-prune-25%:       a quarter of every MLP's hidden channels replaced, then pruned.
Each repeat runs original and variants back to back on the same real image;
the ratio reported is the median over repeats of (variant time / original time).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import onnx

from sam_reuse.base import imaging
from sam_reuse.base.runtime import ort_session
from sam_reuse.base.timing import interleaved_times, median_ratio
from sam_reuse.calibrate.data import read_manifest
from sam_reuse.graphops import ReuseMap, SiteReuse, apply_reuse_map
from sam_reuse.graphops.graph import fingerprint
from sam_reuse.graphops.sites import sites_of

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "data" / "isic2016"


def random_pairs(channels: int, count: int, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    targets = rng.choice(channels, count, replace=False)
    others = np.setdiff1d(np.arange(channels), targets)
    return tuple((int(t), int(rng.choice(others))) for t in targets)


def variant_maps(encoder: Path, seed: int) -> dict[str, tuple[ReuseMap, str]]:
    rng = np.random.default_rng(seed)
    sites = sites_of(encoder)
    fp = fingerprint(onnx.load(str(encoder), load_external_data=False))
    emb = sites["embedding"]
    mlps = [s for name, s in sites.items() if name.startswith("mlp.")]

    def site_map(chosen, count_of):
        return ReuseMap(fp, {s.name: SiteReuse(s.tensor, s.axis, s.channels, random_pairs(s.channels, count_of(s), rng))
                             for s in chosen})

    return {
        "embedding-gather-16": (site_map([emb], lambda s: 16), "gather"),
        "mlp-fold-16": (site_map(mlps, lambda s: 16), "fold"),
        "mlp-prune-25%": (site_map(mlps, lambda s: s.channels // 4), "prune"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("encoder", type=Path)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    image = imaging.preprocess(imaging.load_image_rgb(read_manifest(SAMPLES)[0].image))
    sessions = {"original": ort_session(args.encoder, threads=args.threads)}
    for name, (reuse_map, strategy) in variant_maps(args.encoder, args.seed).items():
        model, _ = apply_reuse_map(args.encoder, reuse_map, strategy)
        sessions[name] = ort_session(model.SerializeToString(), threads=args.threads)
    times = interleaved_times({name: lambda s=s: s.run(None, {"image": image}) for name, s in sessions.items()},
                              args.repeats)
    report = {name: {"median_ms": round(1000 * statistics.median(t), 1),
                     "ratio_to_original": round(median_ratio(times, name, "original"), 3)}
              for name, t in times.items()}
    print(json.dumps({"encoder": str(args.encoder), "threads": args.threads, "repeats": args.repeats,
                      "latency": report}, indent=2))


if __name__ == "__main__":
    main()
