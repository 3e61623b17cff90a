"""Tables of held-out gain per selection rule over random splits (issue 7), from results/*/results.jsonl."""

from __future__ import annotations

import argparse
import glob
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SETS = ("isic2016", "kvasir-seg", "camo")


def load(pattern: str):
    rows = {}
    for path in sorted(glob.glob(pattern)):
        for line in open(path):
            r = json.loads(line)
            rows[(r["set"], r["seed"], r["n_search"], r["variant"])] = r  # later calls replace duplicates
    return list(rows.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--glob", default=str(HERE / "results" / "*" / "results.jsonl"))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = [r for r in load(args.glob) if r["seed"] >= 0 and r["n_search"] == args.n]
    # per (variant, rule): per set list of (seed, gain, ci_lo, ci_hi, pairs, runs, search_gain)
    table = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        for rule, v in r["rules"].items():
            table[(r["variant"], rule)][r["set"]][r["seed"]] = v
    sets = [s for s in SETS if any(r["set"] == s for r in rows)]
    # common seeds per set: those where every variant/rule ran (use the naive/given seeds as reference)
    seeds = {s: sorted(table[("given", "naive")][s]) for s in sets}
    print(f"search images {args.n}; splits per set: " + ", ".join(f"{s} {len(seeds[s])}" for s in sets))
    header = f"{'variant':7s} {'rule':10s} " + " ".join(f"{s[:9]:>15s}" for s in sets) + \
        f" {'avg (SE)':>14s} {'sig<0':>6s} {'sig>0':>6s} {'pairs':>5s} {'runs':>6s} {'d vs naive (SE)':>16s}"
    print(header)
    out = {}
    for (variant, rule), per_set in sorted(table.items(), key=lambda kv: (kv[0][0] != "given", kv[0])):
        cells, avgs, neg, pos, pairs, runs, dif = [], [], 0, 0, [], [], []
        complete = True
        for s in sets:
            vals = [per_set[s][k] for k in seeds[s] if k in per_set[s]]
            if len(vals) < len(seeds[s]):
                complete = False
            if not vals:
                cells.append(f"{'-':>15s}")
                continue
            g = np.array([v["held_gain"] for v in vals])
            base = np.array([table[("given", "naive")][s][k]["held_gain"] for k in seeds[s] if k in per_set[s]])
            cells.append(f"{g.mean():+6.2f} ({g.std(ddof=1) / np.sqrt(len(g)) if len(g) > 1 else 0:4.2f})")
            avgs.append(g.mean())
            neg += sum(v["held_ci"][1] < 0 for v in vals)
            pos += sum(v["held_ci"][0] > 0 for v in vals)
            pairs += [len(v["pairs"]) for v in vals]
            runs += [v["runs"] for v in vals]
            dif.append(g - base)
        total = sum(len(d) for d in dif)
        set_means = np.array(avgs)
        set_ses = []
        for s, d in zip(sets, dif):
            vals = [per_set[s][k]["held_gain"] for k in seeds[s] if k in per_set[s]]
            set_ses.append(np.std(vals, ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0)
        avg = set_means.mean() if len(set_means) else float("nan")
        avg_se = np.sqrt(np.sum(np.square(set_ses))) / len(set_ses) if set_ses else float("nan")
        d_means = [d.mean() for d in dif]
        d_ses = [d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0 for d in dif]
        d_avg = np.mean(d_means)
        d_se = np.sqrt(np.sum(np.square(d_ses))) / len(d_ses)
        print(f"{variant:7s} {rule:10s} " + " ".join(cells) + f" {avg:+6.2f} ({avg_se:4.2f}) {neg / total:6.2f} "
              f"{pos / total:6.2f} {np.mean(pairs):5.1f} {np.mean(runs):6.0f} {d_avg:+7.2f} ({d_se:4.2f})"
              + ("" if complete else "  (incomplete)"))
        out[f"{variant}/{rule}"] = {"per_set_mean": dict(zip(sets, map(float, set_means))), "avg": float(avg),
                                    "avg_se": float(avg_se), "frac_sig_neg": neg / total, "frac_sig_pos": pos / total,
                                    "pairs": float(np.mean(pairs)), "runs": float(np.mean(runs)),
                                    "diff_vs_naive": float(d_avg), "diff_se": float(d_se), "splits": total}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
