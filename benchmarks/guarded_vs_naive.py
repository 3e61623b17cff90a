"""Naive against guarded selection of the fast search, with real MobileSAM on the three shared domains.

Usage:
    python benchmarks/guarded_vs_naive.py EXPORT_DIR [--sets isic2016 kvasir-seg camo] [--work out/guard]
        [--search-images 50]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output. For each
set: search split = first 50 (--search-images) manifest records, held-out = last 50, the
records' single positive point. The fast strategy runs once with
``selection="naive"`` (the whole greedy path: it trusts any rise of the
search-split mean) on a cold activation cache, so its wall time includes
encoding; then again with ``selection="guarded"`` on the same journal, which
redoes no search work. Both maps are scored on the held-out split.

Writes benchmarks/results/guarded_vs_naive[-N].{json,md} (N: search images when not 50): search-split and
held-out mIoU before/after, the per-image held-out gain distribution, the 90%
paired bootstrap interval of the held-out gain, decoder runs, and the tune
time as a ratio to one encoder pass over the 50 search images.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from calibrate.tune import JOURNAL, TuneSettings, tune
from exporter.files import write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
SELECTIONS = ("naive", "guarded")


def _summary(report: dict) -> dict:
    held, search, cost = report["held_out"], report["search"], report["cost"]
    gains = np.array([p["tuned"] - p["baseline"] for p in held["per_image"]])
    return {
        "pairs": report["reuse_map"]["sites"]["embedding"]["pairs"],
        "search_miou": [search["baseline_miou"], search["tuned_miou"]],
        "held_out_miou": [held["baseline_miou"], held["tuned_miou"]],
        "held_out_gain": held["gain"], "gain_interval_90": held["gain_interval_90"],
        "improved_same_worse": [held["improved"], held["unchanged"], held["worse"]],
        "gain_quantiles_5_25_50_75_95": [float(q) for q in np.percentile(gains, [5, 25, 50, 75, 95])],
        "verdict": held["verdict"],
        "decoder_evaluations": cost["decoder_evaluations"], "wall_s": cost["wall_s"],
        "path_lower_bounds_90": report["strategy_details"]["path_lower_bounds_90"],
        "curve": [[p["pairs"], p["search_miou"], p["held_out_miou"]] for p in report["curve"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--work", type=Path, default=REPO / "out" / "guard")
    parser.add_argument("--search-images", type=int, default=50)
    args = parser.parse_args()
    stem = "guarded_vs_naive" + ("" if args.search_images == 50 else f"-{args.search_images}")
    work = args.work if args.search_images == 50 else args.work.with_name(f"{args.work.name}-{args.search_images}")

    rows = []
    for name in args.sets:
        row: dict = {"set": name}
        with tempfile.TemporaryDirectory(prefix="sam-reuse-cold-cache-") as cold_cache:
            for selection in SELECTIONS:
                out = work / name / selection
                if selection == "guarded":  # same search, read back: only the choice along the path differs
                    out.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(work / name / "naive" / JOURNAL, out / JOURNAL)
                settings = TuneSettings(selection=selection, search_images=args.search_images, holdout_images=50,
                                        cache_dir=cold_cache, progress=False)
                report = tune(args.export / "encoder.onnx", args.export / "decoder.onnx", SHARED / name, out,
                              settings).report
                row[selection] = _summary(report)
        naive_wall = row["naive"]["wall_s"]
        # search + 50 held-out images were encoded, at the same cost per image
        encode_search = naive_wall["encode"] * args.search_images / (args.search_images + 50)
        row["tune_minutes"] = (encode_search + naive_wall["search"]) / 60
        row["tune_over_encode"] = (encode_search + naive_wall["search"]) / encode_search
        rows.append(row)
        print(json.dumps(row), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{stem}.json",
               {"export": str(args.export), "machine": f"{platform.machine()}, {platform.python_version()}",
                "rows": rows})
    lines = [f"Fast search (default plan), MobileSAM, image-embedding site, {args.search_images} search / 50 held-out images, "
             "ONNX Runtime CPU (2 threads). Gains in mIoU points; per-image gain quantiles are 5/25/50/75/95%.", "",
             "| set | selection | pairs | search before -> after | held-out before -> after | held-out gain [90% CI] "
             "| better/same/worse | per-image gain quantiles |",
             "|---|---|---:|---|---|---|---|---|"]
    for r in rows:
        for selection in SELECTIONS:
            s = r[selection]
            lines.append(
                f"| {r['set']} | {selection} | {len(s['pairs'])} | {s['search_miou'][0]:.2f} -> {s['search_miou'][1]:.2f} "
                f"| {s['held_out_miou'][0]:.2f} -> {s['held_out_miou'][1]:.2f} | {s['held_out_gain']:+.2f} "
                f"[{s['gain_interval_90'][0]:+.2f}, {s['gain_interval_90'][1]:+.2f}] "
                f"| {'/'.join(str(v) for v in s['improved_same_worse'])} "
                f"| {', '.join(f'{q:+.1f}' for q in s['gain_quantiles_5_25_50_75_95'])} |")
    for selection in SELECTIONS:
        mean = np.mean([r[selection]["held_out_gain"] for r in rows])
        lines.append(f"\nAverage held-out gain, {selection}: {mean:+.2f}")
    lines += ["", f"| set | search decoder runs | tune time (encode {args.search_images} + search) "
              f"| ratio to encoding {args.search_images} images |",
              "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['naive']['decoder_evaluations']['search']:,} | {r['tune_minutes']:.1f} min "
                     f"| {r['tune_over_encode']:.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
