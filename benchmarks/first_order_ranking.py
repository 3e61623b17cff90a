"""Do first-order scores rank channels and pairs the way measured mIoU changes do?

Usage:
    python benchmarks/first_order_ranking.py EXPORT_DIR CHECKPOINT [--sets isic2016 kvasir-seg camo]
        [--images 24] [--random-pairs 100] [--top-pairs 30]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output and CHECKPOINT the MobileSAM weights it
came from. For the first ``--images`` records of each shared set (one given prompt each):

* first order (torch, one backward per image): G = d softIoU / d image_embeddings, where softIoU compares
  sigmoid(upscaled logits) with the ground truth; with M = G X^T (256 x 256) the first-order change of
  zeroing channel c is -M[c, c] and of the pair t <- s is M[t, s] - M[t, t], mean over images;
* measured (ONNX Runtime, the search's own evaluator): the mIoU change of zeroing each of the 256
  channels, of ``--random-pairs`` random pairs, and of the ``--top-pairs`` pairs first order ranks best;
* the cheap exact screen the fast search uses today, zeroing measured on the first third of the images,
  as the ranking to beat.

Reports Spearman correlations with the measured changes (over all images), the overlap of the top 24
targets and sources with the measured ones, and the measured gain of the pairs each ranking puts first.
Writes benchmarks/results/first_order_ranking.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sam_reuse.base.files import write_json
from sam_reuse.base.imaging import load_image_rgb, preprocess, prompt_arrays, upscale_matrices
from sam_reuse.base.runtime import ort_session
from sam_reuse.calibrate.data import load_sample, read_records
from sam_reuse.calibrate.evaluator import MaskEvaluator
from sam_reuse.graphops.reuse_map import reuse_index

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
TOP = 24  # targets and sources the fast search keeps after screening


def first_order(checkpoint: Path, samples, embeddings: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean over images of M = G X^T (channels x channels), and the seconds it took."""
    import torch

    from sam_reuse.exporter.models import build_sam
    from sam_reuse.exporter.wrappers import SingleMaskDecoder

    decoder = SingleMaskDecoder(build_sam("vit_t", checkpoint)).eval()
    for parameter in decoder.parameters():
        parameter.requires_grad_(False)
    started = time.perf_counter()
    total = np.zeros((embeddings.shape[1],) * 2)
    for sample, embedding in zip(samples, embeddings):
        coords, labels = prompt_arrays(sample.prompt, sample.hw)
        rows, cols = (torch.from_numpy(m) for m in upscale_matrices(sample.hw))
        x = torch.from_numpy(embedding[None].copy()).requires_grad_(True)
        logits, _ = decoder(x, torch.from_numpy(coords), torch.from_numpy(labels), torch.zeros(1, 1, 256, 256),
                            torch.zeros(1))
        probability = torch.sigmoid(rows @ logits[0, 0] @ cols)
        truth = torch.from_numpy(sample.mask.astype(np.float32))
        intersection = (probability * truth).sum()
        soft_iou = intersection / (probability.sum() + truth.sum() - intersection)
        (gradient,) = torch.autograd.grad(soft_iou, x)
        flat_g = gradient[0].reshape(gradient.shape[1], -1).double()
        flat_x = x.detach()[0].reshape(x.shape[1], -1).double()
        total += (flat_g @ flat_x.T).numpy()
    return total / len(samples), time.perf_counter() - started


def measure(export: Path, checkpoint: Path, name: str, images: int, random_pairs: int, top_pairs: int,
            seed: int) -> dict:
    samples = [load_sample(r) for r in read_records(SHARED / name)[:images]]
    encoder = ort_session(export / "encoder.onnx")
    embeddings = np.concatenate([encoder.run(None, {"image": preprocess(load_image_rgb(s.record.image))})[0]
                                 for s in samples])
    channels = embeddings.shape[1]
    m, gradient_s = first_order(checkpoint, samples, embeddings)
    diagonal = np.diag(m)
    predicted_zero = -diagonal * 100  # points of soft IoU
    predicted_pair = (m - diagonal[:, None]) * 100  # [t, s]: t <- s
    np.fill_diagonal(predicted_pair, -np.inf)

    evaluator = MaskEvaluator(export / "decoder.onnx", samples, embeddings)
    started = time.perf_counter()
    baseline = evaluator.ious()
    per_run_s = (time.perf_counter() - started) / images
    zero = evaluator.zero
    zeroed = np.stack([evaluator.ious(reuse_index(channels, [(c, zero)])) - baseline for c in range(channels)]) * 100
    measured_zero = zeroed.mean(axis=1)
    race = max(images // 3, 1)
    raced_zero = zeroed[:, :race].mean(axis=1)

    rng = np.random.default_rng(seed)
    chosen = set()
    while len(chosen) < random_pairs:
        t, s = (int(v) for v in rng.choice(channels, 2, replace=False))
        chosen.add((t, s))
    random_list = sorted(chosen)
    order = np.argsort(-predicted_pair, axis=None)[:top_pairs]
    top_list = [(int(i // channels), int(i % channels)) for i in order]
    measured_pair = {}
    for pair in dict.fromkeys(random_list + top_list):
        measured_pair[pair] = float((evaluator.ious(reuse_index(channels, [pair])) - baseline).mean() * 100)

    def overlap(predicted: np.ndarray, rising: bool) -> int:
        sign = -1 if rising else 1
        return len(set(np.argsort(sign * predicted)[:TOP]) & set(np.argsort(sign * measured_zero)[:TOP]))

    random_measured = np.array([measured_pair[p] for p in random_list])
    random_predicted = np.array([predicted_pair[p] for p in random_list])
    top_measured = np.array([measured_pair[p] for p in top_list])
    return {
        "set": name, "images": images, "race_images": race, "baseline_miou": float(baseline.mean() * 100),
        "gradient_s_per_image": gradient_s / images, "decoder_run_s": per_run_s,
        "zero": {"spearman_first_order": float(spearmanr(predicted_zero, measured_zero)[0]),
                 "spearman_race": float(spearmanr(raced_zero, measured_zero)[0]),
                 "top_targets_first_order": overlap(predicted_zero, True),
                 "top_targets_race": overlap(raced_zero, True),
                 "top_sources_first_order": overlap(predicted_zero, False),
                 "top_sources_race": overlap(raced_zero, False)},
        "pairs": {"spearman_random": float(spearmanr(random_predicted, random_measured)[0]),
                  "random_mean": float(random_measured.mean()), "random_best": float(random_measured.max()),
                  "top_mean": float(top_measured.mean()), "top_best": float(top_measured.max()),
                  "top_positive": int((top_measured > 0).sum()), "top_count": len(top_list)},
        "measured_zero": measured_zero.tolist(), "predicted_zero": predicted_zero.tolist(),
        "top_pairs": [[t, s, predicted_pair[t, s], measured_pair[(t, s)]] for t, s in top_list],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["# First-order ranking against measured mIoU changes, MobileSAM", "",
             f"{rows[0]['images']} images per set, one given prompt each; the race screen zeroes channels on "
             f"the first {rows[0]['race_images']}. Top-{TOP} overlap: of the {TOP} channels whose zeroing "
             "raises (targets) or lowers (sources) mIoU most over all images, how many each ranking puts in "
             f"its own top {TOP}.", "",
             "| set | zeroing: Spearman first order / race | targets in top 24: first order / race | sources in "
             "top 24: first order / race | random pairs: Spearman | measured gain: random pairs mean (best) | "
             "first order's top pairs: mean (best), positive |",
             "|---|---|---|---|---:|---|---|"]
    for r in rows:
        z, p = r["zero"], r["pairs"]
        lines.append(f"| {r['set']} | {z['spearman_first_order']:.2f} / {z['spearman_race']:.2f} | "
                     f"{z['top_targets_first_order']} / {z['top_targets_race']} | {z['top_sources_first_order']} / "
                     f"{z['top_sources_race']} | {p['spearman_random']:.2f} | {p['random_mean']:+.2f} "
                     f"({p['random_best']:+.2f}) | {p['top_mean']:+.2f} ({p['top_best']:+.2f}), "
                     f"{p['top_positive']}/{p['top_count']} |")
    cost = ", ".join(f"{r['set']} {r['gradient_s_per_image'] / r['decoder_run_s']:.1f}" for r in rows)
    lines += ["", f"One backward per image costs this many decoder runs of the ONNX evaluator (torch, same "
              f"threads): {cost}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--random-pairs", type=int, default=100)
    parser.add_argument("--top-pairs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [measure(args.export, args.checkpoint, name, args.images, args.random_pairs, args.top_pairs, args.seed)
            for name in args.sets]
    write_json(RESULTS / "first_order_ranking.json", {"export": str(args.export), "machine": platform.node(),
                                                      "threads": os.environ.get("SAM_REUSE_THREADS", "default"),
                                                      "rows": rows})
    (RESULTS / "first_order_ranking.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
