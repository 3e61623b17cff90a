"""Which race keeps the greedy path: each image's own prompt on every image, or every prompt on the first images?

Usage:
    python benchmarks/greedy_race.py EXPORT_DIR WORK [--sets isic2016 kvasir-seg camo]

WORK holds one folder per search (``--sets``: their names) of default tunes that ran the greedy path unraced,
so that their journals hold every extension of every greedy step on every search image: either made before
the race (commit 7dadc2b or earlier, e.g. `benchmarks/tune_cost.py --work WORK`; the per-prompt IoUs of
those maps are then computed once with the tune's own evaluator and cached as WORK/SET/greedy_prompt_ious.npz),
or with ``FastPlan.path_keep`` at least ``top_n`` (the journal then holds each map on the first prompts and
on the others). The path is walked again under two races:

* ``own prompt``: every extension scored on each image's first prompt (its own), the ``keep`` best on the
  other prompts (what the default search does, ``keep`` = ``FastPlan.path_keep``);
* ``first images``: every extension scored on all prompts of the first ``race_images`` images, the ``keep``
  best on the other images (the race the pairs run).

Reports whether each walks the unraced path, its greedy decoder runs against the unraced walk, and the
race rank of each step's best extension (by mean over every prompt). The replay stops where a race leaves the
journal, so it cannot say where such a path ends; ``--raced RACED`` names a folder of default (raced) tunes
of the same sets and splits, and the held-out IoUs of their shipped candidates are set against the unraced
ones image by image (paired difference, 90% bootstrap interval). Writes
benchmarks/results/greedy_race.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sam_reuse.base.files import write_json
from sam_reuse.calibrate.fast import FastPlan
from sam_reuse.calibrate.metrics import bootstrap_interval
from sam_reuse.calibrate.search import Pair, map_key, top_distinct_targets
from sam_reuse.calibrate.tune import TuneSettings, _encode, _prepare
from sam_reuse.graphops.reuse_map import reuse_index

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
PLAN = FastPlan()
KEEPS = (1, 2, 3)


def journal_maps(journal: Path) -> dict[tuple[str, str], np.ndarray]:
    lines = journal.read_text().splitlines()[1:]
    return {(e["kind"], e["key"]): np.asarray(e["ious"]) for e in map(json.loads, lines)}


def prompt_ious(export: Path, name: str, work: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """Per-prompt search IoUs (images x prompts) of the maps ``keys``, computed once and cached."""
    cache = work / name / "greedy_prompt_ious.npz"
    if cache.is_file():
        return dict(np.load(cache))
    settings = TuneSettings(search_images=50, holdout_images=50, progress=False,
                            cache_dir=str(work / name / "cache"))
    inputs = _prepare(export / "encoder.onnx", export / "decoder.onnx", SHARED / name, work / name / "scratch",
                      settings)
    scoring = _encode(inputs, settings)
    ious = {}
    for key in keys:
        pairs = [] if key == "none" else [tuple(map(int, p.split("<-"))) for p in key.split(";")]
        ious[key] = scoring.search_eval.ious(reuse_index(256, pairs)).reshape(-1, scoring.per_image)
    np.savez(cache, **ious)
    return ious


def first_and_whole(export: Path, work: Path, name: str, maps: dict) -> tuple[dict, dict, int]:
    """Per map key: per-image IoU on the first prompt, and over every prompt; and the prompts per image."""
    parts = {key[:-len("#first")] for kind, key in maps if kind == "subset" and key.endswith("#first")}
    if parts:  # a search with path_keep >= top_n: both parts of every extension in its journal
        header = json.loads((work / name / "search.jsonl").read_text().splitlines()[0])
        per_image = len(header["config"]["images"]) // len(maps[("baseline", "none")])
        first = {key: maps[("subset", f"{key}#first")] for key in parts}
        whole = {key: (first[key] + (per_image - 1) * maps[("subset", f"{key}#others")]) / per_image
                 for key in parts}
        return first, whole, per_image
    keys = ["none"] + [key for kind, key in maps if kind == "subset"]
    prompts = prompt_ious(export, name, work, keys)
    return ({key: v[:, 0] for key, v in prompts.items()}, {key: v.mean(axis=1) for key, v in prompts.items()},
            prompts["none"].shape[1])


def candidates(maps: dict, images: int) -> tuple[list[Pair], dict[Pair, float]]:
    """The greedy candidates the search took (the best raced pairs scored on every image, distinct targets),
    and their mean IoUs (the first step's, from the journal)."""
    race, baseline = PLAN.race_images, maps[("baseline", "none")]
    full = {}
    for (kind, key), ious in maps.items():
        rest = maps.get(("pair", key.replace(f"@0:{race}", f"@{race}:{images}")))
        if kind == "pair" and key.endswith(f"@0:{race}") and rest is not None:
            target, source = map(int, key.split("@")[0].split("<-"))
            full[(target, source)] = np.concatenate([ious, rest])
    chosen = top_distinct_targets([(p, float(v.mean() - baseline.mean())) for p, v in full.items()], PLAN.top_n)
    return chosen, {p: float(full[p].mean()) for p in chosen}


def walk(first: dict[str, np.ndarray], whole: dict[str, np.ndarray], per_image: int, baseline: np.ndarray,
         pairs: list[Pair], single: dict[Pair, float], race: str | None, keep: int) -> dict:
    """The greedy path with each step's extensions raced (None: unraced), its decoder runs after step 1, and
    the race rank of each step's best extension."""
    images = len(baseline)
    current = baseline.mean()
    path: list[Pair] = []
    runs, ranks = 0, []
    while len(path) < PLAN.max_pairs:
        extensions = [p for p in pairs if p[0] not in {t for t, _ in path}]
        if not extensions:
            break
        keys = {p: map_key(sorted(path + [p])) for p in extensions}
        if path and any(key not in whole for key in keys.values()):
            return {"path": path, "complete": False, "runs": runs, "ranks": ranks}  # left the unraced path
        mean = {p: whole[keys[p]].mean() for p in extensions} if path else single
        if not path or race is None:
            kept = extensions
            runs += len(extensions) * images * per_image if path else 0
        else:
            early = {p: (first[keys[p]].mean() if race == "own prompt" else whole[keys[p]][:PLAN.race_images].mean())
                     for p in extensions}
            order = sorted(extensions, key=lambda p: -early[p])
            kept = order[:keep]
            ranks.append(order.index(max(extensions, key=lambda p: mean[p])) + 1)
            raced_runs = images if race == "own prompt" else PLAN.race_images * per_image
            runs += len(extensions) * raced_runs + len(kept) * (images * per_image - raced_runs)
        best = max(kept, key=lambda p: mean[p])  # max keeps the first of equals: candidate order
        if mean[best] <= current:
            break
        path.append(best)
        current = mean[best]
    return {"path": path, "complete": True, "runs": runs, "ranks": ranks}


def measure(export: Path, work: Path, name: str) -> dict:
    maps = journal_maps(work / name / "search.jsonl")
    baseline = maps[("baseline", "none")]
    first, whole, per_image = first_and_whole(export, work, name, maps)
    pairs, single = candidates(maps, len(baseline))
    unraced = walk(first, whole, per_image, baseline, pairs, single, None, 0)
    row = {"set": name, "path": unraced["path"], "unraced_runs": unraced["runs"], "races": {}}
    for race in ("own prompt", "first images"):
        for keep in KEEPS:
            raced = walk(first, whole, per_image, baseline, pairs, single, race, keep)
            row["races"][f"{race}, keep {keep}"] = {
                "same_path": raced["complete"] and raced["path"] == unraced["path"], "runs": raced["runs"],
                "runs_over_unraced": raced["runs"] / unraced["runs"], "best_extension_ranks": raced["ranks"]}
    return row


def held_out_effect(unraced: Path, raced: Path) -> dict:
    """The raced tune's candidate against the unraced one's on the same held-out images (mIoU points)."""
    reports = [json.loads((folder / "report.json").read_text()) for folder in (unraced, raced)]
    tuned = [{p["key"]: p["tuned"] for p in report["held_out"]["per_image"]} for report in reports]
    differences = np.array([tuned[1][key] - tuned[0][key] for key in tuned[0]])
    return {"same_map": reports[0]["reuse_map"]["sites"] == reports[1]["reuse_map"]["sites"],
            "maps": [report["reuse_map"]["sites"]["embedding"]["pairs"] for report in reports],
            "held_out_gains": [report["held_out"]["gain"] for report in reports],
            "verdicts": [report["verdict"] for report in reports],
            "paired_difference": float(differences.mean()),
            "interval_90": list(bootstrap_interval(differences)),
            "better_worse": [int((differences > 0).sum()), int((differences < 0).sum())]}


def markdown(rows: list[dict]) -> str:
    lines = ["# Racing the greedy path: each image's own prompt, or the first images", "",
             "Greedy decoder runs after the first step, and over the unraced walk's; ranks: where each step's "
             "best extension (mean over every prompt) stood in that step's race, for the steps the raced walk "
             "made.", "",
             "| set | race | keep | same path | greedy runs | over unraced | best extension's race rank |",
             "|---|---|---:|---|---:|---:|---|"]
    for row in rows:
        for label, result in row["races"].items():
            race, keep = label.split(", keep ")
            lines.append(f"| {row['set']} | {race} | {keep} | {'yes' if result['same_path'] else 'no'} | "
                         f"{result['runs']:,} | {result['runs_over_unraced']:.2f} | "
                         f"{', '.join(map(str, result['best_extension_ranks']))} |")
    compared = [row for row in rows if "held_out_effect" in row]
    if compared:
        lines += ["", "## Where the default (raced) tune ends, against the unraced one", "",
                  "Held-out gain of each tune's candidate over the original encoder, and the paired difference "
                  "raced - unraced over the 50 held-out images (90% bootstrap interval; better / worse images).",
                  "", "| set | same map | unraced map | raced map | held-out gain unraced / raced | "
                  "raced - unraced | better / worse |", "|---|---|---|---|---|---|---|"]
        for row in compared:
            effect = row["held_out_effect"]
            low, high = effect["interval_90"]
            lines.append(f"| {row['set']} | {'yes' if effect['same_map'] else 'no'} | {effect['maps'][0]} | "
                         f"{effect['maps'][1]} | {effect['held_out_gains'][0]:+.2f} / "
                         f"{effect['held_out_gains'][1]:+.2f} | {effect['paired_difference']:+.2f} "
                         f"[{low:+.2f}, {high:+.2f}] | {effect['better_worse'][0]} / {effect['better_worse'][1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--sets", nargs="+", default=["isic2016", "kvasir-seg", "camo"])
    parser.add_argument("--raced", type=Path, help="folder of default tunes of the same sets and splits, by set")
    args = parser.parse_args()
    rows = [measure(args.export, args.work, name) for name in args.sets]
    for row in rows:
        if args.raced is not None and (args.raced / row["set"] / "report.json").is_file():
            row["held_out_effect"] = held_out_effect(args.work / row["set"], args.raced / row["set"])
    write_json(RESULTS / "greedy_race.json", {"rows": rows})
    (RESULTS / "greedy_race.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
