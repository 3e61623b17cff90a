"""Racing the greedy path's steps, replayed on finished searches: does the raced path take the same pairs?

Usage:
    python benchmarks/greedy_race.py RUN_DIR [RUN_DIR ...] [--keep 1 2 3 4]

Each RUN_DIR is a finished first-order tune (report.json and its journal search.jsonl), searched with the
greedy path unraced: the journal holds every map the path tried, on every search image. The search is rerun
with ``FastPlan.greedy_keep`` = K, with a stand-in decoder that reads each map's IoUs from that journal (no
model runs), so the replay makes exactly the decisions a raced search would make on the same measurements,
as far as they reach: a raced path that leaves the old one asks for a map the journal lacks, and is counted as
departed at that step. Writes, for each K, how many runs keep the same path and the same chosen (guarded)
map, and the search's runs against the unraced search's: benchmarks/results/greedy_race.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.fast import FastPlan, fast
from sam_reuse.calibrate.journal import Journal
from sam_reuse.calibrate.search import map_key

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
CHANNELS = 256
GREEDY_UNRACED = 256  # keep every map of a step: the search as it ran


class Departed(Exception):
    """The raced search asked for a map the unraced one never scored."""


def journal_ious(path: Path) -> tuple[dict[str, np.ndarray], int]:
    """Every map's IoUs on the search images the journal has them for (NaN elsewhere), and the image count."""
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip()]
    images = len(next(e for e in lines if e["kind"] == "baseline")["ious"])
    ious: dict[str, np.ndarray] = {}
    for entry in lines:
        key, _, rows = entry["key"].partition("@")
        start = int(rows.split(":")[0]) if rows else 0
        known = ious.setdefault(key, np.full(images, np.nan))
        known[start:start + len(entry["ious"])] = entry["ious"]
    return ious, images


def replay(run: Path, keep: int) -> dict:
    report = json.loads((run / "report.json").read_text())
    details = report["strategy_details"]
    ious, images = journal_ious(run / "search.jsonl")
    config = json.loads((run / "search.jsonl").read_text().splitlines()[0])["config"]
    per_image = len(config["images"]) // images  # prompt rows per search image

    def evaluate(index: np.ndarray, rows) -> np.ndarray:
        pairs = sorted((int(t), int(s)) for t, s in enumerate(index) if s != t)
        key = map_key(pairs)
        known = ious.get(key, np.full(images, np.nan))[list(rows)]
        if np.isnan(known).any():
            raise Departed(key)
        return known

    plan = FastPlan(**{**details["plan"], "greedy_keep": keep})
    shortlist = [tuple(p) for p in details["shortlist"]]
    with tempfile.TemporaryDirectory() as folder:
        journal = Journal(Path(folder) / "search.jsonl", {"replay": str(run)})
        try:
            result = fast(evaluate, CHANNELS, range(CHANNELS), range(CHANNELS), journal, images, plan,
                          progress=False, shortlist=shortlist)
        except Departed:
            return {"run": run.name, "same_path": False, "same_choice": False, "runs": None}
    old_path = [tuple(p) for p in details["path"]]
    old_choice = tuple(sorted(old_path[:details["guarded_pairs"]]))
    return {"run": run.name, "same_path": [tuple(p) for p in result.details["path"]] == old_path,
            "same_choice": result.best == old_choice, "runs": result.evaluations * per_image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--keep", nargs="+", type=int, default=[1, 2, 3, 4])
    args = parser.parse_args()
    runs = [r for r in args.runs if (r / "report.json").is_file()
            and json.loads((r / "report.json").read_text())["settings"]["strategy"] == "first-order"]
    unraced = {run.name: replay(run, GREEDY_UNRACED) for run in runs}
    if not all(r["same_path"] for r in unraced.values()):  # the stand-in must reproduce every search first
        raise SystemExit(f"unraced replay differs: {[n for n, r in unraced.items() if not r['same_path']]}")
    rows = {keep: [replay(run, keep) for run in runs] for keep in args.keep}
    lines = ["# Racing the greedy path, replayed on finished first-order searches", "",
             "| keep | searches | same path | same chosen map | search runs / unraced (median, same path) |",
             "|---:|---:|---:|---:|---:|"]
    for keep, results in rows.items():
        ratios = [r["runs"] / unraced[r["run"]]["runs"] for r in results if r["same_path"]]
        lines.append(f"| {keep} | {len(results)} | {sum(r['same_path'] for r in results)} | "
                     f"{sum(r['same_choice'] for r in results)} | "
                     f"{np.median(ratios) if ratios else float('nan'):.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "greedy_race.json", {"unraced": unraced, **{str(k): v for k, v in rows.items()}})
    (RESULTS / "greedy_race.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
