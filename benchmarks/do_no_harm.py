"""Does the shipped model ever make held-out images worse? The shipping rule against the search's own choice.

Usage:
    python benchmarks/do_no_harm.py EXPORT_DIR [--sets isic2016 kvasir-seg camo]
        [--splits pc1-low pc1-high fixed] [--evidence given] [--strategy fast] [--augment 0] [--jobs 2]
        [--work out/shift] [--reread] [--against given-first-order]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output. Each
split (``shift_splits.py``: ``fixed``, ``random-<seed>``, and the shift
splits ``pc1-low``/``pc1-high``, whose halves lie on either side of the
median of the set's first principal component of image embeddings) is tuned
once, 50 search / 50 held-out images, with the fast search or ``--strategy
first-order`` (EXPORT_DIR then needs the first-order scorer, which ``export`` writes by default), scoring each
search image on ``--augment`` altered copies as well (``calibrate.augment``). One search
serves both arms, which differ only in what ships:

* ``search choice, always shipped`` (the default before the shipping rule):
  the guarded prefix of the greedy path, judged on the search split only,
  and always published;
* ``validated, shipping rule`` (the default from 2026-12-03 to 12-07): the prefix with the best
  lower 90% bound on the held-out validation part (even positions), shipped
  only when that bound is above 0, otherwise the original;
* ``validated, always shipped``: the same prefix, shipped whatever the
  bound says (``--ship-anyway``): what the choice of length alone does;
* ``search choice, mean gate`` and ``validated, mean gate``: the search's
  choice or the validated prefix, shipped when the validation part's mean
  gain is above 0. Both rules were formed after seeing the shift and fixed
  splits; the random splits, run after them, are their first fair test.

Both arms are scored on the held-out test part (odd positions), which decided
nothing in either arm, and, for reference, on all 50 held-out images (the
validation part there flatters the new arm). Per split: search gain, held-out
gains with 90% bootstrap intervals, shipped or not, and the paired difference
between the arms. Searches are journaled in WORK/runs, so an interrupted
benchmark resumes.

Writes benchmarks/results/do_no_harm-<evidence>[-first-order][-augment<K>].{json,md}, keeping the rows of splits
not rerun. ``--against STEM`` also compares the shipping-rule arm, paired on the same test images, with the
same arm of results/do_no_harm-STEM.json on the splits both have (appended to the .md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from shift_splits import SHIFT_SPLITS, pooled_embeddings, write_split

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.metrics import bootstrap_interval, pooled_bootstrap_interval
from sam_reuse.calibrate.report import TuneReport
from sam_reuse.calibrate.shipping import held_out_parts
from sam_reuse.calibrate.tune import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
ARMS = ("search choice, always shipped", "validated, shipping rule", "validated, always shipped",
        "search choice, mean gate", "validated, mean gate")


def _interval(values: np.ndarray) -> list[float]:
    return list(bootstrap_interval(values))


def _arm(gains: np.ndarray, shipped: bool, test: np.ndarray) -> dict:
    """Held-out gains of what an arm ships (zero where it ships the original)."""
    gains = gains if shipped else np.zeros_like(gains)
    return {"shipped": bool(shipped), "test_gain": float(gains[test].mean()), "test_interval_90": _interval(gains[test]),
            "all_gain": float(gains.mean()), "all_interval_90": _interval(gains),
            "test_per_image": gains[test].tolist()}


def summarise(report: TuneReport) -> dict:
    """Both arms of one split, read off a tune report (its curve holds every prefix's held-out IoUs)."""
    curve = report.curve
    baseline = np.asarray(curve[0]["held_out_per_image"])
    _, test = held_out_parts(len(baseline))
    search_choice = report.search.search_choice_pairs
    shipping = report.shipping
    old = np.asarray(curve[search_choice]["held_out_per_image"]) - baseline
    new = np.asarray(curve[shipping.candidate_pairs]["held_out_per_image"]) - baseline
    validation, _ = held_out_parts(len(baseline))
    arms = {ARMS[0]: {"pairs": search_choice, **_arm(old, search_choice > 0, test)},
            ARMS[1]: {"pairs": shipping.candidate_pairs, **_arm(new, shipping.shipped == "tuned", test),
                      "verdict": report.verdict},
            ARMS[2]: {"pairs": shipping.candidate_pairs, **_arm(new, shipping.candidate_pairs > 0, test)},
            ARMS[3]: {"pairs": search_choice, **_arm(old, search_choice > 0 and old[validation].mean() > 0, test)},
            ARMS[4]: {"pairs": shipping.candidate_pairs,
                      **_arm(new, shipping.candidate_pairs > 0 and new[validation].mean() > 0, test)}}
    difference = np.asarray(arms[ARMS[1]]["test_per_image"]) - np.asarray(arms[ARMS[0]]["test_per_image"])
    return {"search_gain": curve[search_choice]["search_miou"] - curve[0]["search_miou"],
            "held_out_baseline_miou": float(baseline.mean()), "path_length": len(curve) - 1,
            "held_out_gain_by_pairs": [p["held_out_miou"] - curve[0]["held_out_miou"] for p in curve],
            "arms": arms, "new_minus_old_test": float(difference.mean()),
            "new_minus_old_test_interval_90": _interval(difference),
            "search_decoder_runs": report.cost["decoder_evaluations"]["search"]}


def _stem(evidence: str, strategy: str, augment: int = 0) -> str:
    """Name of one evidence/strategy setting in WORK/runs and results/ (fast keeps the names it had first)."""
    return (evidence if strategy == "fast" else f"{evidence}-{strategy}") + (f"-augment{augment}" if augment else "")


def run_split(export: Path, work: Path, name: str, split: str, evidence: str, strategy: str = "fast",
              augment: int = 0, reread: bool = False) -> dict:
    """Tune one split (resuming its journal) and summarise it; ``reread``: summarise the report it already has."""
    runs = work / "runs" / f"{name}-{split}-{_stem(evidence, strategy, augment)}"
    if reread:
        return {"set": name, "split": split, **summarise(TuneReport.load(runs / "report.json"))}
    source = SHARED / name
    features = pooled_embeddings(export / "encoder.onnx", source) if split in SHIFT_SPLITS else None
    data = work / "data" / f"{name}-{split}"
    write_split(source, split, data, features)
    settings = TuneSettings(strategy=strategy, evidence=evidence, augment=augment, selection="validated",
                            search_images=50, holdout_images=50, progress=False)
    report = tune(export / "encoder.onnx", export / "decoder.onnx", data, runs, settings).report
    return {"set": name, "split": split, **summarise(report)}


def _fmt(gain: float, interval: list[float]) -> str:
    return f"{gain:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]"


def _gated(arm: dict) -> str:
    return f"{'yes' if arm['shipped'] else 'no'}, {arm['test_gain']:+.2f}"


def markdown(rows: list[dict], evidence: str, strategy: str) -> str:
    lines = [f"# Shipping rule against the search's own choice (evidence: {evidence}, strategy: {strategy})", "",
             "Held-out test part = the 25 odd-position held-out images (decided nothing in either arm); "
             "all = the 50 held-out images. Gains in mIoU points, 90% paired bootstrap intervals; an arm that "
             "ships the original scores 0.", "",
             "| set | split | search gain | search choice: pairs, test gain, all gain | validated: pairs, shipped, "
             "test gain, all gain | new - old on test | mean gate (search choice; validated): shipped, test gain |",
             "|---|---|---:|---|---|---|---|"]
    for r in rows:
        old, new = r["arms"][ARMS[0]], r["arms"][ARMS[1]]
        lines.append(f"| {r['set']} | {r['split']} | {r['search_gain']:+.2f} | {old['pairs']}, "
                     f"{_fmt(old['test_gain'], old['test_interval_90'])}, {_fmt(old['all_gain'], old['all_interval_90'])} "
                     f"| {new['pairs']}, {'yes' if new['shipped'] else 'no'}, "
                     f"{_fmt(new['test_gain'], new['test_interval_90'])}, {_fmt(new['all_gain'], new['all_interval_90'])} "
                     f"| {_fmt(r['new_minus_old_test'], r['new_minus_old_test_interval_90'])} "
                     f"| {'; '.join(_gated(r['arms'][arm]) for arm in ARMS[3:])} |")
    lines += ["", "| splits | arm | mean test gain [90% CI, images resampled per split] | mean all gain | "
              "splits significantly negative (test / all) |", "|---|---|---|---:|---|"]
    for label, picked in (("shift", [r for r in rows if r["split"] in SHIFT_SPLITS]),
                          ("other", [r for r in rows if r["split"] not in SHIFT_SPLITS])):
        if not picked:
            continue
        for arm in ARMS:
            tests = [np.asarray(r["arms"][arm]["test_per_image"]) for r in picked]
            low, high = pooled_bootstrap_interval(tests)
            negative_test = sum(r["arms"][arm]["test_interval_90"][1] < 0 for r in picked)
            negative_all = sum(r["arms"][arm]["all_interval_90"][1] < 0 for r in picked)
            lines.append(f"| {label} ({len(picked)}) | {arm} | {np.mean([t.mean() for t in tests]):+.2f} "
                         f"[{low:+.2f}, {high:+.2f}] | {np.mean([r['arms'][arm]['all_gain'] for r in picked]):+.2f} "
                         f"| {negative_test} / {negative_all} |")
    return "\n".join(lines) + "\n"


def comparison(rows: list[dict], other: list[dict], label: str, other_label: str) -> str:
    """The shipping-rule arm of ``rows`` against that of ``other``, paired per test image, on common splits."""
    theirs = {(r["set"], r["split"]): r["arms"][ARMS[1]] for r in other}
    common = [r for r in rows if (r["set"], r["split"]) in theirs]
    lines = [f"## {label} against {other_label} (shipping rule, test part, paired)", "",
             f"| set | split | {label}: shipped, test gain | {other_label}: shipped, test gain | difference |",
             "|---|---|---|---|---|"]
    differences = {}
    for r in common:
        ours, their = r["arms"][ARMS[1]], theirs[(r["set"], r["split"])]
        difference = np.asarray(ours["test_per_image"]) - np.asarray(their["test_per_image"])
        differences[(r["set"], r["split"])] = difference
        lines.append(f"| {r['set']} | {r['split']} | {_gated(ours)} | {_gated(their)} | "
                     f"{_fmt(float(difference.mean()), _interval(difference))} |")
    lines += ["", "| splits | mean test gain (ours / theirs) | mean difference [90% CI, pooled] | "
              "significantly negative on test (ours / theirs) |", "|---|---|---|---|"]
    for name, picked in (("shift", [r for r in common if r["split"] in SHIFT_SPLITS]), ("all", common)):
        if not picked:
            continue
        keys = [(r["set"], r["split"]) for r in picked]
        low, high = pooled_bootstrap_interval([differences[k] for k in keys])
        ours_mean = np.mean([r["arms"][ARMS[1]]["test_gain"] for r in picked])
        theirs_mean = np.mean([theirs[k]["test_gain"] for k in keys])
        negative = (sum(r["arms"][ARMS[1]]["test_interval_90"][1] < 0 for r in picked),
                    sum(theirs[k]["test_interval_90"][1] < 0 for k in keys))
        lines.append(f"| {name} ({len(picked)}) | {ours_mean:+.2f} / {theirs_mean:+.2f} | "
                     f"{np.mean([differences[k].mean() for k in keys]):+.2f} [{low:+.2f}, {high:+.2f}] | "
                     f"{negative[0]} / {negative[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--splits", nargs="+", default=[*SHIFT_SPLITS, "fixed"])
    parser.add_argument("--evidence", default="given", choices=["given", "points"])
    parser.add_argument("--strategy", default="fast", choices=["fast", "first-order"])
    parser.add_argument("--augment", type=int, default=0, help="altered copies scored beside each search image")
    parser.add_argument("--jobs", type=int, default=2, help="splits tuned at once, one ONNX Runtime thread each")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "shift")
    parser.add_argument("--against", help="compare with results/do_no_harm-AGAINST.json (e.g. given-first-order)")
    parser.add_argument("--reread", action="store_true",
                        help="summarise the reports already in WORK/runs again (after adding an arm), tuning nothing")
    args = parser.parse_args()

    jobs = [(name, split) for split in args.splits for name in args.sets]
    # Spawned workers import the library afresh, so they read this thread count (the parent runs no model).
    os.environ["SAM_REUSE_THREADS"] = "1" if args.jobs > 1 else os.environ.get("SAM_REUSE_THREADS", "2")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(run_split, *zip(*[(args.export, args.work, n, s, args.evidence, args.strategy,
                                                args.augment, args.reread) for n, s in jobs])))
    stem = f"do_no_harm-{_stem(args.evidence, args.strategy, args.augment)}"
    rows = _merged(RESULTS / f"{stem}.json", rows)
    write_json(RESULTS / f"{stem}.json", {"export": str(args.export), "machine": platform.node(),
                                         "evidence": args.evidence, "strategy": args.strategy, "augment": args.augment,
                                         "rows": rows})
    text = markdown(rows, args.evidence, args.strategy)
    if args.against:
        other = json.loads((RESULTS / f"do_no_harm-{args.against}.json").read_text())["rows"]
        text += "\n" + comparison(rows, other, stem.removeprefix("do_no_harm-"), args.against)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


def _merged(path: Path, rows: list[dict]) -> list[dict]:
    """This run's rows, plus the rows of an earlier results file for the splits this run did not redo."""
    done = {(r["set"], r["split"]) for r in rows}
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    return [r for r in earlier if (r["set"], r["split"]) not in done] + rows


if __name__ == "__main__":
    main()
