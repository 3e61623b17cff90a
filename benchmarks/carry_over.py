"""Gains that carry to new images: today's default against the new one, on every split of the four shared sets.

Usage:
    python benchmarks/carry_over.py EXPORT_DIR [--sets isic2016 kvasir-seg camo coco]
        [--splits pc1-low pc1-high fixed random-0 random-1] [--objective mean] [--prompt given]
        [--jobs 2] [--work out/bench35] [--reread]

EXPORT_DIR is an `export-and-tune export --model-type vit_t` output (with its first-order scorer). Each split
(``shift_splits.py``) is tuned once with every default as it ships (first-order search, 3 prompts per image,
the cross-fitted decision), 50 search / 50 held-out images, except ``--objective`` and ``--prompt``. The
search's units are journaled under WORK/runs, in the folders ``do_no_harm.py --evidence points --strategy
first-order`` uses, so searches made there (or by another objective: units do not depend on it) are reused.

Every arm is read off one report, whose curve holds each map's held-out IoUs (on the mask token the new
default shipped; the report's mask_token section holds every token's):

* ``today``: the default until 2026-12-07, the ``validated`` rule on token 0: the curve map with the best
  lower 90% bound on the validation part (even positions) ships when that bound is above 0. Read off the
  report today's own tune wrote in the mean objective's folder when it ran there first (kept as
  report.today.json; on the given prompt a replay from the new report is checked against it where the new
  default kept token 0), else replayed from the new report's curve;
* ``new``: the default as shipped: the mask token, then the map searched on it, each cross-fitted over all
  50 held-out images;
* ``new at 25``: the new rules given the validation part alone (cross-fitted within it), so that the test
  part (odd positions) decided nothing in either arm: the fair comparison of the two rules. Where the
  validation part keeps token 0 but all 50 images shipped another, the rules at 25 would have searched on
  token 0's masks: that search is today's tune of the split (report.today.json), read instead.

Each arm's figure is its shipped model's gain over the original (token 0, no map) on the test part, on each
image's own prompt (0 where it ships the original); ``new``'s test part took part in its decisions, so its
figure leans optimistic, ``new at 25``'s does not. Also per arm: the candidate's gain on all 50 held-out
images with its 90% interval, which the issue's targets are read against.

Writes benchmarks/results/carry_over-<objective>-<prompt>.{json,md}, keeping the rows of splits not rerun.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from do_no_harm import _merged
from shift_splits import SHIFT_SPLITS, pooled_embeddings, write_split

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.metrics import bootstrap_interval, pooled_bootstrap_interval
from sam_reuse.calibrate.report import TuneReport
from sam_reuse.calibrate.shipping import decide_on_held_out, held_out_parts
from sam_reuse.calibrate.tune import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
ARMS = ("today", "new", "new at 25")
SETS = ("isic2016", "kvasir-seg", "camo", "coco")
SPLITS = (*SHIFT_SPLITS, "fixed", "random-0", "random-1")


def _runs(work: Path, name: str, split: str, objective: str, prompt: str) -> Path:
    """The split's tune folder; the mean objective on the given prompt keeps do_no_harm.py's name."""
    suffix = "" if (objective, prompt) == ("mean", "given") else f"-{objective}-{prompt}"
    return work / "runs" / f"{name}-{split}-points-first-order{suffix}"


def _arm(own: list[np.ndarray], candidate: int, shipped: bool, original: np.ndarray | None = None) -> dict:
    """An arm's candidate on every held-out image and what it ships on the test part (own prompt), each against
    ``original`` (the original decoder's IoUs; default: the curve's map 0)."""
    _, test = held_out_parts(len(own[0]))
    original = own[0] if original is None else original
    gains = (own[candidate] - original) * 100
    shipped_gains = ((own[candidate] if shipped else own[0]) - original) * 100
    return {"candidate": candidate, "shipped": bool(shipped), "all_gain": float(gains.mean()),
            "all_interval_90": list(bootstrap_interval(gains)), "test_gain": float(shipped_gains[test].mean()),
            "test_interval_90": list(bootstrap_interval(shipped_gains[test])),
            "test_per_image": shipped_gains[test].tolist()}


def _token_at_25(report: TuneReport, validation: np.ndarray) -> int:
    """The mask token the new rule ships given the validation part alone."""
    token = report.mask_token
    if token is None or token.chosen_by != "the shipping rule":
        return 0 if token is None else token.shipped
    ious = [np.asarray(v)[validation] / 100 for v in token.held_out_per_image]
    return token.candidate if decide_on_held_out([ious[0], ious[token.candidate]], 1).ship_tuned else 0


def summarise(report: TuneReport) -> dict:
    """Every arm of one split, from the report: the held-out IoUs of each map of the curve, searched on the shipped
    mask token's masks, and of the original decoder (token 0)."""
    curve, token = report.curve, report.mask_token
    own = [np.asarray(p["held_out_per_image"]) / 100 for p in curve]
    original = own[0] if token is None else np.asarray(token.held_out_per_image[0]) / 100
    shipped_token = 0 if token is None else token.shipped
    validation, _ = held_out_parts(len(own[0]))
    today = decide_on_held_out(own, 0, "validated")
    at_25 = decide_on_held_out([ious[validation] for ious in own], 0)
    shipping = report.shipping
    arms = {"today": _arm(own, today.candidate, today.ship_tuned) if not shipped_token else None,
            "new": {**_arm(own, shipping.candidate_pairs, shipping.shipped == "tuned", original),
                    "mask_token": shipped_token,
                    "reported_gain": None if shipping.reported is None else shipping.reported.gain,
                    "reported_interval_90": None if shipping.reported is None else list(shipping.reported.interval),
                    "verdict": report.verdict},
            # Computable where the validation part alone ships the same token: the curve was searched on it.
            "new at 25": (_arm(own, at_25.candidate, at_25.ship_tuned, original)
                          if _token_at_25(report, validation) == shipped_token else None)}
    for arm in (arms["new"], arms["new at 25"]):  # a shipped mask token ships a tuned model too
        if arm is not None:
            arm["shipped"] = arm["shipped"] or bool(shipped_token)
    return {"search_gain": curve[report.search.search_choice_pairs]["search_miou"] - curve[0]["search_miou"],
            "held_out_baseline_miou": float(original.mean() * 100), "path_length": len(curve) - 1,
            "arms": arms, "search_decoder_runs": report.cost["decoder_evaluations"]["search"],
            "held_out_decoder_runs": report.cost["decoder_evaluations"]["held_out"]}


def _recorded_today(work: Path, name: str, split: str, prompt: str) -> TuneReport | None:
    """The tune today's default (the validated rule, mean objective) made of this split, if one ran first in the
    mean objective's folder: kept as report.today.json there before the new default's tune replaces
    report.json."""
    folder = _runs(work, name, split, "mean", prompt)
    kept, report = folder / "report.today.json", folder / "report.json"
    if not kept.exists() and report.exists() and TuneReport.load(report).settings["selection"] == "validated":
        shutil.copyfile(report, kept)
    return TuneReport.load(kept) if kept.exists() else None


def run_split(export: Path, work: Path, name: str, split: str, objective: str, prompt: str, reread: bool) -> dict:
    """Tune one split (resuming, or seeded by, a journal of the same search units) and summarise it."""
    runs = _runs(work, name, split, objective, prompt)
    recorded = _recorded_today(work, name, split, prompt)
    if not reread:
        data = work / "data" / f"{name}-{split}"
        if not (data / "manifest.jsonl").is_file():
            features = pooled_embeddings(export / "encoder.onnx", SHARED / name) if split in SHIFT_SPLITS else None
            write_split(SHARED / name, split, data, features)
        seed = _runs(work, name, split, "mean", prompt) / "search.jsonl"
        if not (runs / "search.jsonl").exists() and seed.exists():
            runs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(seed, runs / "search.jsonl")  # units do not depend on the objective
        settings = TuneSettings(search_images=50, holdout_images=50, objective=objective, prompt=prompt,
                                progress=False, overlays=0)
        tune(export / "encoder.onnx", export / "decoder.onnx", data, runs, settings)
    row = {"set": name, "split": split, **summarise(TuneReport.load(runs / "report.json"))}
    if recorded is not None:
        replayed = row["arms"]["today"]
        own = [np.asarray(p["held_out_per_image"]) / 100 for p in recorded.curve]
        row["arms"]["today"] = _arm(own, recorded.shipping.candidate_pairs, recorded.shipping.shipped == "tuned")
        if (objective, prompt) == ("mean", "given") and replayed is not None:  # the same search must agree
            row["today_as_recorded"] = all(replayed[k] == row["arms"]["today"][k] for k in ("candidate", "shipped"))
    if row["arms"]["new at 25"] is None and recorded is not None:
        # The validation part alone keeps token 0, where all 50 images shipped another: the new rules at 25
        # would have searched on token 0's masks, which today's tune of the split did (the same search).
        own = [np.asarray(p["held_out_per_image"]) / 100 for p in recorded.curve]
        validation, _ = held_out_parts(len(own[0]))
        at_25 = decide_on_held_out([ious[validation] for ious in own], 0)
        row["arms"]["new at 25"] = {**_arm(own, at_25.candidate, at_25.ship_tuned), "on_todays_search": True}
    if row["arms"]["today"] is None:
        raise SystemExit(f"{name} {split}: the new default ships another mask token, so today's arm cannot be "
                         f"replayed from its curve; run today's default there first (report.today.json)")
    return row


def _fmt(gain: float, interval: list[float]) -> str:
    return f"{gain:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]"


def _shipped(arm: dict | None) -> str:
    if arm is None:
        return "-"
    token = f"token {arm['mask_token']} + " if arm.get("mask_token") else ""
    return f"{token}{arm['candidate']}, {'yes' if arm['shipped'] else 'no'}, {arm['test_gain']:+.2f}"


def _paired(rows: list[dict], arm: str, against: str = "today") -> tuple[float, tuple[float, float]]:
    """Mean over splits of the per-split mean difference on the test part, with its pooled 90% interval (NaN where
    no split has the arm)."""
    rows = [r for r in rows if r["arms"][arm] is not None]
    if not rows:
        return float("nan"), (float("nan"), float("nan"))
    differences = [np.asarray(r["arms"][arm]["test_per_image"]) - np.asarray(r["arms"][against]["test_per_image"])
                   for r in rows]
    return float(np.mean([d.mean() for d in differences])), pooled_bootstrap_interval(differences)


def targets(rows: list[dict], arm: str) -> dict:
    """The issue's targets for one arm over the splits that have it."""
    rows = [r for r in rows if r["arms"][arm] is not None]
    shipped = [r["arms"][arm]["shipped"] for r in rows]
    candidate_up = [r["arms"][arm]["all_interval_90"][0] > 0 for r in rows]
    candidate_down = [r["arms"][arm]["all_interval_90"][1] < 0 for r in rows]
    return {"splits": len(rows), "shipped": int(sum(shipped)),
            "harmful_on_test": sum(s and r["arms"][arm]["test_interval_90"][1] < 0 for s, r in zip(shipped, rows)),
            "candidate_up": int(sum(candidate_up)),
            "shipped_where_up": sum(s and u for s, u in zip(shipped, candidate_up)),
            "shipped_where_down": sum(s and d for s, d in zip(shipped, candidate_down)),
            "mean_test_gain": float(np.mean([r["arms"][arm]["test_gain"] for r in rows]))}


def markdown(rows: list[dict], objective: str, prompt: str) -> str:
    lines = [f"# Gains that carry: today's default against the new one (objective: {objective}, prompt: {prompt})",
             "", "MobileSAM, 50 search / 50 held-out images, first-order search, 3 prompts per search image. Test "
             "part = the 25 odd-position held-out images, each on its own prompt; an arm that ships the original "
             "scores 0 there. Candidate = the map the arm would ship, on all 50 held-out images. Gains in mIoU "
             "points, 90% paired bootstrap intervals.", "",
             "| set | split | search gain | today: pairs, ships, test | new: pairs, ships, test, reported "
             "| new at 25: pairs, ships, test | candidate on all 50 (today / new) | new - today on test | "
             "new at 25 - today on test |", "|---|---|---:|---|---|---|---|---|---|"]
    for r in rows:
        arms = r["arms"]
        new = arms["new"]
        reported = "-" if new["reported_gain"] is None else _fmt(new["reported_gain"], new["reported_interval_90"])
        lines.append(
            f"| {r['set']} | {r['split']} | {r['search_gain']:+.2f} | {_shipped(arms['today'])} | "
            f"{_shipped(new)}, {reported} | {_shipped(arms['new at 25'])} | "
            f"{_fmt(arms['today']['all_gain'], arms['today']['all_interval_90'])} / "
            f"{_fmt(new['all_gain'], new['all_interval_90'])} | "
            f"{_fmt(*_paired([r], 'new'))} | {_fmt(*_paired([r], 'new at 25'))} |")
    checked = [r["today_as_recorded"] for r in rows if "today_as_recorded" in r]
    if checked:
        lines += ["", f"Today's arm replayed from the curve matches what today's default's own tune decided "
                  f"(candidate and shipped) on {sum(checked)} of the {len(checked)} splits where that tune ran first."]
    lines += ["", "| splits | arm | shipped | harmful on test | candidate's all-50 interval above 0 | shipped there "
              "| shipped where below 0 | mean test gain | vs today on test [90% CI, pooled] |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    groups = [("all", rows), *[(name, [r for r in rows if r["set"] == name]) for name in SETS],
              ("shift", [r for r in rows if r["split"] in SHIFT_SPLITS])]
    for label, picked in groups:
        if not picked:
            continue
        for arm in ARMS:
            t = targets(picked, arm)
            versus = "-" if arm == "today" else _fmt(*_paired(picked, arm))
            lines.append(f"| {label} ({t['splits']}) | {arm} | {t['shipped']} | {t['harmful_on_test']} | "
                         f"{t['candidate_up']} | {t['shipped_where_up']} | {t['shipped_where_down']} | "
                         f"{t['mean_test_gain']:+.2f} | {versus} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--splits", nargs="+", default=list(SPLITS))
    parser.add_argument("--objective", default="mean")
    parser.add_argument("--prompt", default="given", choices=["given", "point", "box"])
    parser.add_argument("--jobs", type=int, default=2, help="splits tuned at once, one ONNX Runtime thread each")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench35")
    parser.add_argument("--reread", action="store_true", help="summarise the reports already in WORK/runs")
    args = parser.parse_args()

    jobs = [(name, split) for split in args.splits for name in args.sets]
    os.environ["SAM_REUSE_THREADS"] = "1" if args.jobs > 1 else os.environ.get("SAM_REUSE_THREADS", "2")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(run_split, *zip(*[(args.export, args.work, n, s, args.objective, args.prompt,
                                                args.reread) for n, s in jobs])))
    stem = f"carry_over-{args.objective}-{args.prompt}"
    rows = _merged(RESULTS / f"{stem}.json", rows)
    rows.sort(key=lambda r: (SPLITS.index(r["split"]) if r["split"] in SPLITS else len(SPLITS), r["split"],
                             SETS.index(r["set"]) if r["set"] in SETS else len(SETS)))
    write_json(RESULTS / f"{stem}.json", {"export": str(args.export), "machine": platform.node(),
                                         "objective": args.objective, "prompt": args.prompt, "rows": rows})
    text = markdown(rows, args.objective, args.prompt)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
