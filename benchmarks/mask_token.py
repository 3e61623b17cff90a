"""Which of SAM's mask tokens serves a domain: a zero-parameter decoder choice, judged by the shipping rule.

Usage:
    python benchmarks/mask_token.py EXPORT_DIR [--sets isic2016 kvasir-seg camo coco]
        [--splits pc1-low pc1-high fixed random-0 random-1] [--against carry_over-mean-given]
        [--held-out-prompts evidence|own]

SAM's decoder has four mask tokens: token 0 is the single mask (what the exported decoder returns, and
``SamPredictor.predict(multimask_output=False)``), tokens 1-3 the multimask output, among which apps often
take the one the IoU head rates best. Choosing another token is a rewrite of the decoder graph with no
trained weight. For every image of each set (MobileSAM, EXPORT_DIR's encoder, cached embeddings), each
choice's IoU is measured on the image's own prompt and 2 spread points (torch's decoder, all four tokens
in one pass). Per split (``shift_splits.py``, 50 / 50), the choice with the best lower 90% bound of per-image
gain over token 0 on the search split (mean over prompts) is the candidate, and the default shipping rule
(cross-fitted over the 50 held-out images, each image's mean over its 3 prompts, as tune decides on tokens;
``--held-out-prompts own``: its own prompt) decides whether it ships. Reported: the chosen
token, its search and held-out gains, shipped or not, its shipped gain on the held-out test part (odd
positions, own prompt) and, with ``--against``, channel reuse's shipped test gain on the same split from
results/<AGAINST>.json (``carry_over.py``). Writes benchmarks/results/mask_token.{json,md}
(mask_token-own-prompt.* with ``--held-out-prompts own``).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from shift_splits import SHIFT_SPLITS, split_order

from sam_reuse.base.files import write_json
from sam_reuse.base.imaging import Upscaling, prompt_arrays
from sam_reuse.calibrate.activations import encode
from sam_reuse.calibrate.data import load_calibration, read_records
from sam_reuse.calibrate.evidence import evidence_samples
from sam_reuse.calibrate.metrics import bootstrap_interval
from sam_reuse.calibrate.shipping import best_on, decide_on_held_out, held_out_parts
from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.weights import fetch_weights
from sam_reuse.exporter.wrappers import PromptsDecoder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
CHOICES = ("token 0", "token 1", "token 2", "token 3", "IoU head's best of 1-3")
PROMPTS = 3  # own prompt + 2 spread points


def choice_ious(export: Path, name: str, single: PromptsDecoder, multimask: PromptsDecoder
                ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Record keys, IoUs (images x prompts x CHOICES) and the pooled embeddings (images x channels) of a set."""
    samples = load_calibration(SHARED / name, search_images=len(read_records(SHARED / name)), holdout_images=0).search
    embeddings = encode(export / "encoder.onnx", samples, progress=False)
    ious = np.zeros((len(samples), PROMPTS, len(CHOICES)))
    no_mask = torch.zeros(PROMPTS, 1, 256, 256), torch.zeros(PROMPTS)
    for i, sample in enumerate(samples):
        upscaling = Upscaling(sample.hw)
        target = upscaling.target(sample.mask)
        prompts = [prompt_arrays(s.prompt, sample.hw) for s in evidence_samples([sample], "points")]
        coords = torch.from_numpy(np.concatenate([c for c, _ in prompts]))
        labels = torch.from_numpy(np.concatenate([lab for _, lab in prompts]))
        embedding = torch.from_numpy(np.ascontiguousarray(embeddings[i:i + 1]))
        with torch.no_grad():
            token0, _ = single(embedding, coords, labels, *no_mask)
            tokens, predicted = multimask(embedding, coords, labels, *no_mask)
        masks, predicted = torch.cat([token0, tokens], dim=1).numpy(), predicted.numpy()  # predicted: tokens 1-3
        for p in range(PROMPTS):
            ious[i, p, :4] = [upscaling.iou(masks[p, t], target) for t in range(4)]
            ious[i, p, 4] = ious[i, p, 1 + int(np.argmax(predicted[p]))]
    pooled = embeddings.reshape(len(samples), embeddings.shape[1], -1).mean(axis=2)
    return [s.key for s in samples], ious, pooled


def judge(ious: np.ndarray, search: list[int], held: list[int], held_out_prompts: str) -> dict:
    """The candidate choice on the search split and what the shipping rule does with it on the held-out split,
    deciding on each held-out image's mean over its prompts (``evidence``, as tune does) or its own prompt."""
    mean = ious.mean(axis=1)  # per image and choice, over its prompts
    candidate, _ = best_on([mean[search, 0]] + [mean[search, c] for c in range(1, len(CHOICES))],
                           np.arange(len(search)))
    curve_own = [ious[held, 0, 0], ious[held, 0, candidate]]
    deciding = [mean[held, 0], mean[held, candidate]] if held_out_prompts == "evidence" else curve_own
    decision = decide_on_held_out(deciding, 1)
    _, test = held_out_parts(len(held))
    gains = (curve_own[1] - curve_own[0]) * 100
    shipped = gains if decision.ship_tuned else np.zeros_like(gains)
    search_gain = float((mean[search, candidate] - mean[search, 0]).mean() * 100)
    return {"choice": CHOICES[candidate], "search_gain": search_gain,
            "held_out_gain": float(gains.mean()), "held_out_interval_90": list(bootstrap_interval(gains)),
            "shipped": decision.ship_tuned, "verdict": decision.verdict, "test_gain": float(shipped[test].mean()),
            "held_out_miou_by_choice": [float(v) for v in mean[held].mean(axis=0) * 100]}


def markdown(rows: list[dict], against: str | None, held_out_prompts: str) -> str:
    deciding = ("each held-out image's mean over its 3 prompts" if held_out_prompts == "evidence"
                else "each held-out image's own prompt")
    lines = ["# Mask token choice under the shipping rule (MobileSAM, 50 / 50, 3 prompts per image)", "",
             f"The held-out decision reads {deciding}.", "",
             "Held-out mIoU by choice (mean over 3 prompts): " + ", ".join(CHOICES) + ". Gains in mIoU points on "
             "each image's own prompt; the test part is the 25 odd-position held-out images.", "",
             "| set | split | held-out mIoU by choice | chosen on search | search gain | held-out gain [90% CI] | "
             f"ships | test gain |{' reuse test gain |' if against else ''}",
             "|---|---|---|---|---:|---|---|---:|" + ("---:|" if against else "")]
    for r in rows:
        low, high = r["held_out_interval_90"]
        lines.append(f"| {r['set']} | {r['split']} | {' / '.join(f'{v:.1f}' for v in r['held_out_miou_by_choice'])} "
                     f"| {r['choice']} | {r['search_gain']:+.2f} | {r['held_out_gain']:+.2f} [{low:+.2f}, {high:+.2f}] "
                     f"| {'yes' if r['shipped'] else 'no'} | {r['test_gain']:+.2f} |"
                     + (f" {r['reuse_test_gain']:+.2f} |" if against else ""))
    shipped = sum(r["shipped"] for r in rows)
    mean_test = np.mean([r["test_gain"] for r in rows])
    lines += ["", f"Shipped on {shipped} of {len(rows)} splits; mean test gain {mean_test:+.2f}"
              + (f" (channel reuse on the same splits: {np.mean([r['reuse_test_gain'] for r in rows]):+.2f})"
                 if against else "") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo", "coco"])
    parser.add_argument("--splits", nargs="+", default=[*SHIFT_SPLITS, "fixed", "random-0", "random-1"])
    parser.add_argument("--against", help="carry_over.py's results stem whose 'new' arm is channel reuse")
    parser.add_argument("--held-out-prompts", choices=["evidence", "own"], default="evidence",
                        help="what decides on each held-out image: the mean over its 3 prompts (as tune) or its "
                             "own prompt (results/mask_token-own-prompt.*)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sam = build_sam("vit_t", fetch_weights("mobilesam")).eval()
    single, multimask = PromptsDecoder(sam).eval(), PromptsDecoder(sam, multimask=True).eval()
    reuse = {}
    if args.against:
        reuse = {(r["set"], r["split"]): r["arms"]["new"]["test_gain"]
                 for r in json.loads((RESULTS / f"{args.against}.json").read_text())["rows"]}
    rows = []
    for name in args.sets:
        keys, ious, pooled = choice_ious(args.export, name, single, multimask)
        for split in args.splits:
            search, held = split_order(split, keys, pooled if split in SHIFT_SPLITS else None)
            row = {"set": name, "split": split, **judge(ious, search, held, args.held_out_prompts)}
            if args.against:
                row["reuse_test_gain"] = reuse[(name, split)]
            rows.append(row)
            print(row["set"], row["split"], row["choice"], f"{row['held_out_gain']:+.2f}", row["shipped"], flush=True)
    stem = "mask_token" if args.held_out_prompts == "evidence" else "mask_token-own-prompt"
    write_json(RESULTS / f"{stem}.json", {"export": str(args.export), "machine": platform.node(),
                                          "held_out_prompts": args.held_out_prompts, "rows": rows})
    text = markdown(rows, args.against, args.held_out_prompts)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
