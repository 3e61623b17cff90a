"""Held-out effect of the exhaustive search with real MobileSAM on the three shared domains.

Usage:
    python benchmarks/tune_shared.py EXPORT_DIR [--sets isic2016 kvasir-seg camo]
        [--targets unsalient:12] [--sources salient:12] [--top-pairs 6] [--work out/bench]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output. For each
set: search split = first 50 manifest records, held-out = last 50, the
records' single positive point, masks binarised by calibrate.data.MASK_RULE.
Writes benchmarks/results/tune_shared.{json,md}: baseline and tuned held-out
mIoU with a 90% paired bootstrap interval, the chosen pairs, decoder
evaluations and wall time per set (embeddings come from the activation cache
when present: the encode time is reported separately).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.tune import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--targets", default="unsalient:12")
    parser.add_argument("--sources", default="salient:12")
    parser.add_argument("--top-pairs", type=int, default=6)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench")
    args = parser.parse_args()

    rows = []
    for name in args.sets:
        settings = TuneSettings(targets=args.targets, sources=args.sources, top_n=args.top_pairs,
                                search_images=50, holdout_images=50, progress=False,
                                selection="guarded", ship_anyway=True)  # the search's own choice
        started = time.perf_counter()
        report = tune(args.export / "encoder.onnx", args.export / "decoder.onnx", SHARED / name,
                      args.work / name, settings).report
        wall = time.perf_counter() - started
        held, search, cost = report.held_out, report.search, report.cost
        rows.append({
            "set": name, "pairs": report.candidate_pairs,
            "search_miou": [search.baseline_miou, search.tuned_miou],
            "held_out_miou": [held.baseline_miou, held.tuned_miou], "held_out_gain": held.gain.gain,
            "gain_interval_90": list(held.gain.interval),
            "improved_same_worse": [held.gain.improved, held.gain.unchanged, held.gain.worse],
            "verdict": report.verdict, "pairs_scored": search.pairs_scored, "subsets": search.subsets,
            "decoder_evaluations": cost["decoder_evaluations"], "maps_reused": cost["maps_reused_from_journal"],
            "wall_s": {**cost["wall_s"], "benchmark": wall},
        })
        print(json.dumps(rows[-1]), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"export": str(args.export), "targets": args.targets, "sources": args.sources, "top_pairs": args.top_pairs,
            "machine": f"{platform.machine()}, {platform.python_version()}"}
    write_json(RESULTS / "tune_shared.json", {"settings": meta, "rows": rows})
    lines = [f"Exhaustive search, MobileSAM, targets `{args.targets}`, sources `{args.sources}`, top N = {args.top_pairs}, "
             "50 search / 50 held-out images, ONNX Runtime CPU (2 threads).", "",
             "| set | held-out mIoU before -> after | gain [90% CI] | search before -> after | pairs | decoder runs | search time |",
             "|---|---|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['held_out_miou'][0]:.2f} -> {r['held_out_miou'][1]:.2f} | "
                     f"{r['held_out_gain']:+.2f} [{r['gain_interval_90'][0]:+.2f}, {r['gain_interval_90'][1]:+.2f}] | "
                     f"{r['search_miou'][0]:.2f} -> {r['search_miou'][1]:.2f} | "
                     f"{', '.join(f'{t}<-{s}' for t, s in r['pairs']) or 'none'} | "
                     f"{r['decoder_evaluations']['search'] + r['decoder_evaluations']['held_out']:,} | "
                     f"{r['wall_s']['search'] / 60:.1f} min |")
    (RESULTS / "tune_shared.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
