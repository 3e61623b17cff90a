"""The fast search against the exhaustive one on a problem small enough for exhaustive, real MobileSAM.

Usage:
    python benchmarks/fast_vs_exhaustive.py EXPORT_DIR [--sets isic2016 kvasir-seg camo]
        [--channels 0-23] [--search-images 16] [--top-pairs 6] [--work out/fast-vs-exhaustive]

Both strategies see the same channels (targets = sources = --channels, a
fixed range rather than a data-chosen one), the same first --search-images
records, and are scored on the same last 50 held-out records. Exhaustive:
every ordered pair, then all 2^N - 1 subsets of the best N. Fast (default
plan, guarded selection): zero each channel, pair the 12 best targets and
sources, walk the greedy path. Rewrites benchmarks/results/fast_vs_exhaustive.{json,md}
after each set.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.tune import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
STRATEGIES = ("exhaustive", "fast")


def _write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "fast_vs_exhaustive.json",
               {"settings": {k: str(v) for k, v in vars(args).items()},
                "machine": f"{platform.machine()}, {platform.python_version()}", "rows": rows})
    lines = [f"Channels {args.channels} (targets = sources), {args.search_images} search / 50 held-out images, "
             f"exhaustive top N = {args.top_pairs}; fast: default plan, guarded selection.", "",
             "| set | strategy | pairs | search gain | held-out gain [90% CI] | search decoder runs |",
             "|---|---|---|---:|---|---:|"]
    for r in rows:
        for strategy in STRATEGIES:
            s = r[strategy]
            lines.append(f"| {r['set']} | {strategy} | {', '.join(f'{t}<-{u}' for t, u in s['pairs']) or 'none'} "
                         f"| {s['search_gain']:+.2f} | {s['held_out_gain']:+.2f} "
                         f"[{s['gain_interval_90'][0]:+.2f}, {s['gain_interval_90'][1]:+.2f}] | {s['decoder_runs']:,} |")
    for strategy in STRATEGIES:
        lines.append(f"\nAverage held-out gain, {strategy}: {np.mean([r[strategy]['held_out_gain'] for r in rows]):+.2f}")
    (RESULTS / "fast_vs_exhaustive.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--channels", default="0-23")
    parser.add_argument("--search-images", type=int, default=16)
    parser.add_argument("--top-pairs", type=int, default=6)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "fast-vs-exhaustive")
    args = parser.parse_args()

    rows = []
    for name in args.sets:
        row: dict = {"set": name}
        for strategy in STRATEGIES:
            settings = TuneSettings(strategy=strategy, targets=args.channels, sources=args.channels,
                                    top_n=args.top_pairs if strategy == "exhaustive" else 10,
                                    search_images=args.search_images, holdout_images=50, overlays=0, progress=False,
                                    selection="guarded", ship_anyway=True)  # the search's own choice
            report = tune(args.export / "encoder.onnx", args.export / "decoder.onnx", SHARED / name,
                          args.work / name / strategy, settings).report
            held, search = report.held_out, report.search
            row[strategy] = {"pairs": report.candidate_pairs,
                             "search_gain": search.tuned_miou - search.baseline_miou,
                             "held_out_gain": held.gain.gain, "gain_interval_90": list(held.gain.interval),
                             "decoder_runs": report.cost["decoder_evaluations"]["search"],
                             "search_s": report.cost["wall_s"]["search"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(rows, args)
    print((RESULTS / "fast_vs_exhaustive.md").read_text())


if __name__ == "__main__":
    main()
