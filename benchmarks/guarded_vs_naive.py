"""Naive against guarded selection of the fast search, with real MobileSAM on the three shared domains.

Usage:
    python benchmarks/guarded_vs_naive.py EXPORT_DIR [--sets isic2016 kvasir-seg camo] [--work out/guard]
        [--search-images 50] [--arms naive guarded guarded-points naive-points]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output. For each
set: search split = first 50 (--search-images) manifest records, held-out = last 50, the
records' single positive point. Arms:

* naive: the fast strategy with ``selection="naive"`` (the whole greedy path:
  it trusts any rise of the search-split mean), on a cold activation cache,
  so its wall time includes encoding;
* guarded: ``selection="guarded"`` on the naive arm's journal, which redoes
  no search work (only the choice along the path differs);
* guarded-points: guarded selection on a search that scores every search
  image on its prompt plus 2 spread points (``evidence="points"``), its own
  journal and cold cache;
* naive-points: the whole greedy path of the guarded-points search, read
  back from its journal (no search work).

All maps are scored on the held-out split with the records' prompt. Arms
not named in --arms are kept from an earlier results file (``--arms`` with no
name only redoes the comparison below).

Every arm is also compared with naive on the same held-out images: the
per-image IoU difference (arm - naive), its mean and 90% bootstrap interval
per set, and the average over the sets with an interval from a bootstrap
that resamples images within each set. The maps are rescored from their
pairs for this, and each rescored gain must match the arm's reported gain.

Writes benchmarks/results/guarded_vs_naive[-N].{json,md} (N: search images when not 50): search-split and
held-out mIoU before/after, the per-image held-out gain distribution, the 90%
paired bootstrap interval of the held-out gain, decoder runs, and the tune
time as a ratio to one encoder pass over the search images.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sam_reuse.base.contract import JOURNAL
from sam_reuse.base.files import write_json
from sam_reuse.calibrate.activations import encode
from sam_reuse.calibrate.data import load_calibration
from sam_reuse.calibrate.evaluator import MaskEvaluator
from sam_reuse.calibrate.metrics import bootstrap_interval, pooled_bootstrap_interval
from sam_reuse.calibrate.report import TuneReport
from sam_reuse.calibrate.tune import TuneSettings, tune
from sam_reuse.graphops.reuse_map import reuse_index

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
# arm -> (selection, evidence, arm whose journal it reads back or None). An arm that reads another's journal
# redoes no search work: only the choice along the same greedy path differs.
ARMS = {"naive": ("naive", "given", None), "guarded": ("guarded", "given", "naive"),
        "guarded-points": ("guarded", "points", None), "naive-points": ("naive", "points", "guarded-points")}


def _summary(report: TuneReport) -> dict:
    held, search, cost = report.held_out, report.search, report.cost
    gains = np.array([p["tuned"] - p["baseline"] for p in held.per_image])
    return {
        "pairs": report.candidate_pairs,
        "search_miou": [search.baseline_miou, search.tuned_miou],
        "held_out_miou": [held.baseline_miou, held.tuned_miou],
        "held_out_gain": held.gain.gain, "gain_interval_90": list(held.gain.interval),
        "improved_same_worse": [held.gain.improved, held.gain.unchanged, held.gain.worse],
        "gain_quantiles_5_25_50_75_95": [float(q) for q in np.percentile(gains, [5, 25, 50, 75, 95])],
        "verdict": report.verdict,
        "decoder_evaluations": cost["decoder_evaluations"], "wall_s": cost["wall_s"],
        "path_lower_bounds_90": report.strategy_details["path_lower_bounds_90"],
        "curve": [[p["pairs"], p["search_miou"], p["held_out_miou"]] for p in report.curve],
    }


def _run_arm(args, name: str, arm: str, work: Path, cold_cache: str) -> dict:
    selection, evidence, searched_by = ARMS[arm]
    out = work / name / arm
    if searched_by:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / name / searched_by / JOURNAL, out / JOURNAL)
    settings = TuneSettings(selection=selection, evidence=evidence, search_images=args.search_images,
                            holdout_images=50, cache_dir=cold_cache, progress=False)
    report = tune(args.export / "encoder.onnx", args.export / "decoder.onnx", SHARED / name, out, settings).report
    summary = _summary(report)
    if not searched_by:  # a search of its own on a cold cache: its wall time is a tune time
        wall = summary["wall_s"]
        encode_search = wall["encode"] * args.search_images / (args.search_images + 50)  # same cost per image
        summary["tune_minutes"] = (encode_search + wall["search"]) / 60
        summary["tune_over_encode"] = (encode_search + wall["search"]) / encode_search
    return summary


def _held_out_gains(args, row: dict) -> dict[str, np.ndarray]:
    """Per-image held-out IoU gain (mIoU points) of each arm's map, rescored on one evaluator for the set."""
    held_out = load_calibration(SHARED / row["set"], search_images=args.search_images, holdout_images=50,
                                min_images=0).held_out
    embeddings = encode(args.export / "encoder.onnx", held_out, progress=False)
    evaluator = MaskEvaluator(args.export / "decoder.onnx", held_out, embeddings)
    baseline = evaluator.ious()
    gains = {}
    for arm in (a for a in ARMS if a in row):
        ious = evaluator.ious(reuse_index(evaluator.channels, [tuple(p) for p in row[arm]["pairs"]]))
        gains[arm] = (ious - baseline) * 100
        if abs(gains[arm].mean() - row[arm]["held_out_gain"]) > 1e-4:  # float32 IoUs
            raise SystemExit(f"{row['set']} {arm}: rescored held-out gain {gains[arm].mean():+.4f} is not the "
                             f"reported {row[arm]['held_out_gain']:+.4f} (results from another model or data?)")
    return gains


def _against_naive(args, rows: list[dict]) -> list[dict]:
    """Paired held-out difference of every arm against naive, per set and averaged over the sets."""
    per_set = {r["set"]: _held_out_gains(args, r) for r in rows if "naive" in r}
    comparison = []
    for arm in (a for a in ARMS if a != "naive"):
        sets = [name for name, gains in per_set.items() if arm in gains]
        if not sets:
            continue
        differences = [per_set[name][arm] - per_set[name]["naive"] for name in sets]
        comparison.append({
            "arm": arm, "sets": sets,
            "per_set": [{"set": name, "difference": float(d.mean()), "interval_90": list(bootstrap_interval(d)),
                         "better_same_worse": [int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())]}
                        for name, d in zip(sets, differences)],
            "average": float(np.mean([d.mean() for d in differences])),
            "average_interval_90": list(pooled_bootstrap_interval(differences))})
    return comparison


def _comparison_markdown(comparison: list[dict]) -> str:
    if not comparison:
        return ""
    sets = list(dict.fromkeys(s["set"] for c in comparison for s in c["per_set"]))
    lines = ["", "Against naive on the same held-out images: mean per-image IoU difference (arm - naive) "
             "[90% bootstrap interval] (images where the arm is better/same/worse than naive). The average over "
             "the sets resamples images within each set.", "",
             "| arm | " + " | ".join(sets) + " | average over the sets |", "|---|" + "---|" * (len(sets) + 1)]
    for c in comparison:
        by_set = {s["set"]: s for s in c["per_set"]}
        cells = [f"{by_set[name]['difference']:+.2f} [{by_set[name]['interval_90'][0]:+.2f}, "
                 f"{by_set[name]['interval_90'][1]:+.2f}] ({'/'.join(str(v) for v in by_set[name]['better_same_worse'])})"
                 if name in by_set else "not run" for name in sets]
        lines.append(f"| {c['arm']} | " + " | ".join(cells) + f" | {c['average']:+.2f} "
                     f"[{c['average_interval_90'][0]:+.2f}, {c['average_interval_90'][1]:+.2f}] ({len(c['sets'])} sets) |")
    return "\n".join(lines) + "\n"


def _markdown(rows: list[dict], search_images: int) -> str:
    arms = [arm for arm in ARMS if any(arm in r for r in rows)]
    lines = [f"Fast search (default plan), MobileSAM, image-embedding site, {search_images} search / 50 held-out "
             "images, ONNX Runtime CPU (2 threads). Arms: naive = whole greedy path, one prompt per search image; "
             "guarded = the same search, prefix with the best lower bound; guarded-points = guarded, every search "
             "image scored on its prompt + 2 spread points (`--evidence points`); naive-points = the whole path of "
             "that search. Gains in mIoU points; per-image gain quantiles are 5/25/50/75/95%.", "",
             "| set | arm | pairs | search before -> after | held-out before -> after | held-out gain [90% CI] "
             "| better/same/worse | per-image gain quantiles |",
             "|---|---|---:|---|---|---|---|---|"]
    for r in rows:
        for arm in (a for a in arms if a in r):
            s = r[arm]
            lines.append(
                f"| {r['set']} | {arm} | {len(s['pairs'])} | {s['search_miou'][0]:.2f} -> {s['search_miou'][1]:.2f} "
                f"| {s['held_out_miou'][0]:.2f} -> {s['held_out_miou'][1]:.2f} | {s['held_out_gain']:+.2f} "
                f"[{s['gain_interval_90'][0]:+.2f}, {s['gain_interval_90'][1]:+.2f}] "
                f"| {'/'.join(str(v) for v in s['improved_same_worse'])} "
                f"| {', '.join(f'{q:+.1f}' for q in s['gain_quantiles_5_25_50_75_95'])} |")
    for arm in arms:
        gains = [r[arm]["held_out_gain"] for r in rows if arm in r]
        lines.append(f"\nAverage held-out gain, {arm}: {np.mean(gains):+.2f} ({len(gains)} sets)")
    lines += ["", f"| set | arm | search decoder runs | tune time (encode {search_images} + search) "
              f"| ratio to encoding {search_images} images |", "|---|---|---:|---:|---:|"]
    for r in rows:
        for arm in (a for a in arms if a in r and "tune_minutes" in r[a]):
            lines.append(f"| {r['set']} | {arm} | {r[arm]['decoder_evaluations']['search']:,} "
                         f"| {r[arm]['tune_minutes']:.1f} min | {r[arm]['tune_over_encode']:.1f} |")
    return "\n".join(lines) + "\n"


def _write_results(results: Path, args, rows: list[dict], comparison: list[dict] | None = None) -> None:
    write_json(results, {"export": str(args.export), "rows": rows,
                         **({"against_naive": comparison} if comparison is not None else {}),
                         "machine": f"{platform.machine()}, {platform.python_version()}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                        help="arms to run now; the others are kept from an earlier results file")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "guard")
    parser.add_argument("--search-images", type=int, default=50)
    args = parser.parse_args()
    stem = "guarded_vs_naive" + ("" if args.search_images == 50 else f"-{args.search_images}")
    work = args.work if args.search_images == 50 else args.work.with_name(f"{args.work.name}-{args.search_images}")
    results = RESULTS / f"{stem}.json"
    earlier = json.loads(results.read_text())["rows"] if results.exists() else []
    rows = {r["set"]: r for r in earlier}

    for name in args.sets:
        row = rows.setdefault(name, {"set": name})
        for arm in args.arms:
            with tempfile.TemporaryDirectory(prefix="sam-reuse-cold-cache-") as cold_cache:
                row[arm] = _run_arm(args, name, arm, work, cold_cache)
            print(json.dumps({"set": name, "arm": arm, "held_out_gain": row[arm]["held_out_gain"],
                              "pairs": row[arm]["pairs"]}), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)  # after every arm: a long run keeps what it finished
            _write_results(results, args, list(rows.values()))
            (RESULTS / f"{stem}.md").write_text(_markdown(list(rows.values()), args.search_images))
    comparison = _against_naive(args, list(rows.values()))
    _write_results(results, args, list(rows.values()), comparison)
    text = _markdown(list(rows.values()), args.search_images) + _comparison_markdown(comparison)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
