"""The default tune's held-out gain against the fast search's default (guarded, 3 prompts), image by image.

Usage:
    python benchmarks/held_out_vs_fast_default.py EXPORT_DIR TUNES [--sets isic2016 kvasir-seg camo]

Until 2026-12-03 the default was the fast search with guarded selection and spread points (the
``guarded-points`` arm of ``guarded_vs_naive.py``, whose maps ``results/guarded_vs_naive.json`` keeps; 30-50
min per set, so it is not run again). TUNES holds one default tune per set at 50 / 50 (``tune_cost.py
--work TUNES``). Both maps are scored on the same 50 held-out images with that tune's held-out evaluator
(its activation cache), and the paired difference, default - fast, is given with its 90% bootstrap interval
per set and over the three sets (images resampled within each set). Two figures: the candidate the default
tune found (what ``--ship-anyway`` ships), and what it ships (the original where the rule says "no reliable
improvement", a difference of -(fast's gain) there). The fast arm's held-out gain, recomputed here, is checked
against the one recorded then (the decoder export differs only by float rounding). Writes
benchmarks/results/held_out_vs_fast_default.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.metrics import bootstrap_interval, pooled_bootstrap_interval
from sam_reuse.calibrate.tune import TuneSettings, _prepare, _site_evaluator
from sam_reuse.graphops.reuse_map import reuse_index

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
FAST_DEFAULT = "guarded-points"


def held_out_ious(export: Path, name: str, tune_dir: Path, maps: list[list[list[int]]]) -> list[np.ndarray]:
    """Per-image held-out IoUs (in points) of each map, from the tune's activation cache."""
    settings = TuneSettings(search_images=50, holdout_images=50, progress=False, cache_dir=str(tune_dir / "cache"))
    inputs = _prepare(export / "encoder.onnx", export / "decoder.onnx", SHARED / name, tune_dir / "scratch",
                      settings)
    evaluator, _ = _site_evaluator(inputs.encoder_model, inputs.decoder_model, inputs.site,
                                   inputs.calibration.held_out, settings, "encode held-out split")
    return [evaluator.ious(reuse_index(evaluator.channels, [tuple(p) for p in pairs])) * 100 for pairs in maps]


def measure(export: Path, name: str, tune_dir: Path, fast: dict) -> dict:
    report = json.loads((tune_dir / "report.json").read_text())
    held = report["held_out"]["per_image"]
    baseline, candidate = (np.array([p[part] for p in held]) for part in ("baseline", "tuned"))
    ships = report["reuse_map"]["meta"]["shipped"]
    recomputed_baseline, fast_ious = held_out_ious(export, name, tune_dir, [[], fast["pairs"]])
    shipped = candidate if ships else baseline
    return {"set": name, "fast_pairs": fast["pairs"],
            "default_pairs": report["reuse_map"]["sites"]["embedding"]["pairs"], "default_ships": bool(ships),
            "fast_gain": float((fast_ious - baseline).mean()), "fast_gain_recorded": fast["held_out_gain"],
            "baseline_check": float(np.abs(recomputed_baseline - baseline).max()),
            "candidate_gain": float((candidate - baseline).mean()), "shipped_gain": float((shipped - baseline).mean()),
            "candidate_minus_fast": (candidate - fast_ious).tolist(),
            "shipped_minus_fast": (shipped - fast_ious).tolist()}


def summary(differences: list[float]) -> str:
    values = np.array(differences)
    low, high = bootstrap_interval(values)
    return f"{values.mean():+.2f} [{low:+.2f}, {high:+.2f}] ({(values > 0).sum()}/{(values < 0).sum()})"


def markdown(rows: list[dict]) -> str:
    lines = ["# The default tune against the fast search's default (guarded, 3 prompts), same held-out images", "",
             "Held-out gain over the original encoder (50 images); paired difference default - fast with its 90% "
             "bootstrap interval (images better / worse).", "",
             "| set | fast map | fast gain (recorded) | default map | ships | default candidate gain | "
             "candidate - fast | shipped - fast |", "|---|---|---|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['fast_pairs']} | {r['fast_gain']:+.2f} ({r['fast_gain_recorded']:+.2f}) | "
                     f"{r['default_pairs']} | {'yes' if r['default_ships'] else 'no'} | {r['candidate_gain']:+.2f} | "
                     f"{summary(r['candidate_minus_fast'])} | {summary(r['shipped_minus_fast'])} |")
    for part in ("candidate", "shipped"):
        groups = [np.array(r[f"{part}_minus_fast"]) for r in rows]
        low, high = pooled_bootstrap_interval(groups)
        gains = [r[f"{part}_gain"] for r in rows]
        lines.append(f"\n{part}: average gain {np.mean(gains):+.2f} against fast's "
                     f"{np.mean([r['fast_gain'] for r in rows]):+.2f}; average of the per-set differences "
                     f"{np.mean([g.mean() for g in groups]):+.2f} [{low:+.2f}, {high:+.2f}]")
    lines.append(f"\nThe original encoder's held-out IoUs recomputed here against the tunes' reports: max difference "
                 f"{max(r['baseline_check'] for r in rows):.1e} points.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("tunes", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    args = parser.parse_args()
    recorded = {row["set"]: row[FAST_DEFAULT]
                for row in json.loads((RESULTS / "guarded_vs_naive.json").read_text())["rows"]}
    rows = [measure(args.export, name, args.tunes / name, recorded[name]) for name in args.sets]
    write_json(RESULTS / "held_out_vs_fast_default.json", {"export": str(args.export), "rows": rows})
    (RESULTS / "held_out_vs_fast_default.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
