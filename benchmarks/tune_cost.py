"""What the default tune costs: wall time over one encoder pass, by stage, at the default evidence.

Usage:
    python benchmarks/tune_cost.py EXPORT_DIR [--sets isic2016 kvasir-seg camo] [--work out/tune_cost]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output (with its first-order scorer, which export
writes by default). Each shared set is tuned with every default (strategy, evidence, selection), first 50
records searched and last 50 held out, on a cold activation cache, so encoding is included. Its wall time is
given over one encoder pass of the set's 100 images timed just before it (the same background load), with
the report's stage times (load, encode, search, held-out) over the same pass, the decoder runs of the
search, and the verdict. Writes benchmarks/results/tune_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

from first_order_vs_fast import encoder_pass_s

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.tune import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def measure(export: Path, name: str, work: Path) -> dict:
    data, out = SHARED / name, work / name
    shutil.rmtree(out, ignore_errors=True)
    encode_s = encoder_pass_s(export / "encoder.onnx", data)
    settings = TuneSettings(search_images=50, holdout_images=50, progress=False, cache_dir=str(out / "cache"))
    started = time.perf_counter()
    report = tune(export / "encoder.onnx", export / "decoder.onnx", data, out, settings).report
    wall = time.perf_counter() - started
    return {"set": name, "strategy": report.settings["strategy"], "evidence": report.settings["evidence"],
            "encoder_pass_s": encode_s, "wall_s": wall, "time_over_encoder_pass": wall / encode_s,
            "stages_over_encoder_pass": {stage: s / encode_s for stage, s in report.cost["wall_s"].items()},
            "decoder_runs": report.cost["decoder_evaluations"]["search"], "verdict": report.verdict}


def markdown(rows: list[dict]) -> str:
    stages = list(rows[0]["stages_over_encoder_pass"])
    lines = ["# The default tune's cost, MobileSAM, 50 search / 50 held-out, cold cache", "",
             "Times over one encoder pass of the set's 100 images, timed just before the tune.", "",
             f"| set | strategy | evidence | tune / encoder pass | {' | '.join(stages)} | search decoder runs "
             "| verdict |",
             "|---|---|---|---:|" + "---:|" * len(stages) + "---:|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['strategy']} | {r['evidence']} | {r['time_over_encoder_pass']:.1f} | "
                     + " | ".join(f"{r['stages_over_encoder_pass'][s]:.2f}" for s in stages)
                     + f" | {r['decoder_runs']:,} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--work", type=Path, default=REPO / "out" / "tune_cost")
    args = parser.parse_args()
    rows = [measure(args.export, name, args.work) for name in args.sets]
    write_json(RESULTS / "tune_cost.json", {"export": str(args.export), "machine": platform.node(),
                                            "threads": os.environ.get("SAM_REUSE_THREADS", "default"), "rows": rows})
    (RESULTS / "tune_cost.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
