"""Reuse inside the encoder: the fast search at an MLP-hidden site, pruned, with real MobileSAM.

Usage:
    python benchmarks/inner_site.py EXPORT_DIR [--site mlp.9] [--sets isic2016 kvasir-seg camo]
        [--work out/inner] [--repeats 9]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output. For each
set: search split = first 50 manifest records, held-out = last 50, the
records' point prompt; `tune(site=...)` with its defaults for inner sites
(least salient 64 channels as targets, most salient 64 as sources, the
smaller inner plan, guarded selection). The map is applied by `prune`, so
the tuned encoder is also measured for latency against the original:
ONNX Runtime CPU, interleaved runs on one image, median of per-repeat ratios.

Writes benchmarks/results/inner_site-<site>.{json,md}. The journal in
--work makes a rerun skip finished search work.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from sam_reuse.base import imaging
from sam_reuse.base.files import write_json
from sam_reuse.base.runtime import ort_session
from sam_reuse.base.timing import interleaved_times, median_ratio
from sam_reuse.calibrate.data import read_manifest
from sam_reuse.calibrate.tune import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def latency_ratio(original: Path, tuned: Path, image_path: Path, repeats: int) -> dict:
    """Median over interleaved repeats of tuned / original encoder time, and each median in ms."""
    image = imaging.preprocess(imaging.load_image_rgb(image_path))
    sessions = {"original": ort_session(original), "tuned": ort_session(tuned)}
    times = interleaved_times({name: lambda s=s: s.run(None, {"image": image}) for name, s in sessions.items()},
                              repeats)
    return {"ratio": median_ratio(times, "tuned", "original"), "repeats": repeats,
            "median_ms": {name: 1000 * statistics.median(t) for name, t in times.items()}}


def _row(name: str, report: dict, latency: dict) -> dict:
    held, search, cost = report.held_out, report.search, report.cost
    return {"set": name, "pairs": report.candidate_pairs,
            "search_miou": [search.baseline_miou, search.tuned_miou],
            "held_out_miou": [held.baseline_miou, held.tuned_miou], "held_out_gain": held.gain.gain,
            "gain_interval_90": list(held.gain.interval),
            "improved_same_worse": [held.gain.improved, held.gain.unchanged, held.gain.worse],
            "verdict": report.verdict, "rewrite": report.tuned_encoder_check["rewrite"],
            "max_abs_diff": report.tuned_encoder_check["max_abs_diff"],
            "search_runs": cost["decoder_evaluations"]["search"], "wall_s": cost["wall_s"],
            "curve": [[p["pairs"], p["search_miou"], p["held_out_miou"]] for p in report.curve],
            "latency": latency}


def _markdown(site: str, rows: list[dict]) -> str:
    lines = [f"Fast search at site `{site}` (inside the encoder), MobileSAM, 50 search / 50 held-out images, "
             "guarded selection, inner-site defaults; maps applied by prune. Latency: ONNX Runtime CPU, "
             "tuned / original encoder, median of interleaved repeats.", "",
             "| set | pairs | search before -> after | held-out before -> after | held-out gain [90% CI] "
             "| better/same/worse | search runs | search time | encoder latency ratio |",
             "|---|---:|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        low, high = r["gain_interval_90"]
        lines.append(
            f"| {r['set']} | {len(r['pairs'])} | {r['search_miou'][0]:.2f} -> {r['search_miou'][1]:.2f} "
            f"| {r['held_out_miou'][0]:.2f} -> {r['held_out_miou'][1]:.2f} "
            f"| {r['held_out_gain']:+.2f} [{low:+.2f}, {high:+.2f}] | {'/'.join(map(str, r['improved_same_worse']))} "
            f"| {r['search_runs']:,} | {r['wall_s']['search'] / 60:.1f} min | {r['latency']['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--site", default="mlp.9")
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--work", type=Path, default=REPO / "out" / "inner")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    rows = []
    for name in args.sets:
        out = args.work / args.site / name
        settings = TuneSettings(site=args.site, search_images=50, holdout_images=50, progress=False,
                                selection="guarded", ship_anyway=True)  # the search's own choice, pruned
        report = tune(args.export / "encoder.onnx", args.export / "decoder.onnx", SHARED / name, out,
                      settings).report
        image = read_manifest(SHARED / name)[-1].image
        rows.append(_row(name, report, latency_ratio(args.export / "encoder.onnx", out / "encoder.tuned.onnx",
                                                     image, args.repeats)))
        print(json.dumps({k: rows[-1][k] for k in ("set", "pairs", "held_out_gain", "gain_interval_90", "latency")}))
        stem = f"inner_site-{args.site}"  # written after every set: a long run leaves its finished sets
        write_json(RESULTS / f"{stem}.json", {"export": str(args.export), "site": args.site,
                                              "machine": f"{platform.machine()}, {platform.python_version()}",
                                              "rows": rows})
        (RESULTS / f"{stem}.md").write_text(_markdown(args.site, rows))


if __name__ == "__main__":
    main()
