"""The first-order strategy against the fast one (today's default): held-out gain, decoder runs and time.

Usage:
    python benchmarks/first_order_vs_fast.py EXPORT_DIR [--sets isic2016 kvasir-seg camo] [--evidence given]
        [--work out/first_order]

EXPORT_DIR is an `export-and-tune export --model-type vit_t --first-order` output. For each shared set, both
strategies tune the same split (first 50 records searched, last 50 held out), each on a cold activation cache
(its time includes encoding) and its own journal. Both candidates are the search's own choice (the guarded
prefix of the greedy path) scored on all 50 held-out images; the shipping rule's verdict is reported beside.

Per set: held-out gain of each over the original with its 90% interval, the paired per-image difference
first-order - fast with its 90% interval (and the average over the sets, images resampled within each set),
decoder runs of the search, first-order prompts scored, and wall time as a ratio to one encoder pass over the
set's 100 images (measured in the same process). Writes benchmarks/results/first_order_vs_fast-<evidence>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from sam_reuse.base.files import write_json
from sam_reuse.base.imaging import load_image_rgb, preprocess
from sam_reuse.base.runtime import ort_session
from sam_reuse.calibrate.data import read_records
from sam_reuse.calibrate.metrics import bootstrap_interval, pooled_bootstrap_interval
from sam_reuse.calibrate.tune import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
STRATEGIES = ("fast", "first-order")


def encoder_pass_s(encoder: Path, data: Path) -> float:
    """Seconds of one encoder pass over every record's image (reading and preprocessing included)."""
    session = ort_session(encoder)
    started = time.perf_counter()
    for record in read_records(data):
        session.run(None, {"image": preprocess(load_image_rgb(record.image))})
    return time.perf_counter() - started


def run_arm(export: Path, data: Path, work: Path, strategy: str, evidence: str) -> dict:
    out = work / strategy
    shutil.rmtree(out, ignore_errors=True)
    settings = TuneSettings(strategy=strategy, selection="guarded", ship_anyway=True, evidence=evidence,
                            search_images=50, holdout_images=50, progress=False, cache_dir=str(out / "cache"))
    started = time.perf_counter()
    result = tune(export / "encoder.onnx", export / "decoder.onnx", data, out, settings)
    wall = time.perf_counter() - started
    report = result.report
    held = report.held_out
    per_image = {p["key"]: (p["baseline"], p["tuned"]) for p in held.per_image}
    gains = np.array([t - b for b, t in per_image.values()])
    return {"pairs": report.candidate_pairs, "search_miou": [report.search.baseline_miou, report.search.tuned_miou],
            "held_out_miou": [held.baseline_miou, held.tuned_miou], "held_out_gain": float(gains.mean()),
            "gain_interval_90": list(bootstrap_interval(gains)), "per_image": per_image,
            "decoder_runs": report.cost["decoder_evaluations"]["search"], "wall_s": wall,
            "stages_s": report.cost["wall_s"], "shortlist": report.strategy_details.get("shortlist"),
            "verdict": report.verdict}


def measure(export: Path, name: str, work: Path, evidence: str) -> dict:
    data = SHARED / name
    arms = {}
    for strategy in STRATEGIES:  # each arm against an encoder pass just before it: the same background load
        encode_s = encoder_pass_s(export / "encoder.onnx", data)
        arms[strategy] = {**run_arm(export, data, work / name, strategy, evidence), "encoder_pass_s": encode_s}
        arms[strategy]["time_over_encoder_pass"] = arms[strategy]["wall_s"] / encode_s
    keys = sorted(arms["fast"]["per_image"])
    difference = np.array([arms["first-order"]["per_image"][k][1] - arms["fast"]["per_image"][k][1] for k in keys])
    return {"set": name, "arms": arms, "difference": float(difference.mean()),
            "difference_interval_90": list(bootstrap_interval(difference)), "difference_per_image": difference.tolist()}


def markdown(rows: list[dict], evidence: str, average: dict) -> str:
    lines = ["# First-order against fast (the default), MobileSAM, 50 search / 50 held-out", "",
             f"Evidence: {evidence}. Candidates: the search's own choice (guarded prefix), on all 50 held-out "
             "images. Time: the whole tune on a cold cache over one encoder pass of the set's 100 images timed "
             "just before it.", "",
             "| set | strategy | pairs | search mIoU | held-out gain [90% CI] | decoder runs | time / encoder pass |",
             "|---|---|---:|---|---|---:|---:|"]
    for r in rows:
        for strategy, a in r["arms"].items():
            low, high = a["gain_interval_90"]
            lines.append(f"| {r['set']} | {strategy} | {len(a['pairs'])} | {a['search_miou'][0]:.2f} -> "
                         f"{a['search_miou'][1]:.2f} | {a['held_out_gain']:+.2f} [{low:+.2f}, {high:+.2f}] | "
                         f"{a['decoder_runs']:,} | {a['time_over_encoder_pass']:.1f} |")
    lines += ["", "| set | first-order - fast, held-out [90% CI] | decoder runs first-order / fast | time ratio |",
              "|---|---|---:|---:|"]
    for r in rows:
        low, high = r["difference_interval_90"]
        fast, first = r["arms"]["fast"], r["arms"]["first-order"]
        lines.append(f"| {r['set']} | {r['difference']:+.2f} [{low:+.2f}, {high:+.2f}] | "
                     f"{first['decoder_runs'] / fast['decoder_runs']:.2f} | {first['wall_s'] / fast['wall_s']:.2f} |")
    low, high = average["interval_90"]
    lines.append(f"| average | {average['difference']:+.2f} [{low:+.2f}, {high:+.2f}] | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--evidence", default="given", choices=["given", "points"])
    parser.add_argument("--work", type=Path, default=REPO / "out" / "first_order")
    args = parser.parse_args()
    rows = [measure(args.export, name, args.work, args.evidence) for name in args.sets]
    differences = [np.array(r["difference_per_image"]) for r in rows]
    average = {"difference": float(np.mean([d.mean() for d in differences])),
               "interval_90": list(pooled_bootstrap_interval(differences))}
    stem = f"first_order_vs_fast-{args.evidence}"
    write_json(RESULTS / f"{stem}.json", {"export": str(args.export), "machine": platform.node(),
                                         "threads": os.environ.get("SAM_REUSE_THREADS", "default"),
                                         "evidence": args.evidence, "rows": rows, "average": average})
    (RESULTS / f"{stem}.md").write_text(markdown(rows, args.evidence, average))
    print(markdown(rows, args.evidence, average))


if __name__ == "__main__":
    main()
