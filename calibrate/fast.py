"""The default search: ablation screening, racing, a greedy path, and a guarded choice along it.

Why each stage (measured on real MobileSAM, see benchmarks/README.md):

1. **Screening.** Zeroing one channel at a time ranks channels without
   looking at pairs: a channel whose removal *raises* mIoU is a candidate
   target (useless or harmful for the domain), one whose removal *lowers* it
   most is a candidate source (effective). C maps instead of C x (C - 1).
2. **Racing.** Every screening map and every pair is first scored on the
   first ``race_images`` search images only; just the leaders are scored on
   the rest. Every later decision uses all search images.
3. **Greedy path.** From the best pairs with distinct targets, add at each
   step the pair that raises search-split mIoU most (or another
   ``OBJECTIVES`` entry: ``trimmed`` leaves out the images that flip most
   either way, and ranks the pairs that way too), until none does. The
   whole path is the "naive" map: it trusts any rise of the search-split mean.
   When each image has several prompts (the default evidence), each step
   after the first races its extensions on every image's first prompt (its
   own): only the ``path_keep`` best go on to the other prompts, and the
   step picks among them. On twelve searches (the three shared sets' fixed
   splits, shifted and random ones) this walked the unraced greedy's path in
   ten with 27-42% fewer of its decoder runs; racing every prompt of the
   first ``race_images`` images instead, at the same cost for the same keep,
   in seven (benchmarks/README.md, "Racing the greedy path on each image's
   own prompt").
4. **Guarded choice.** A rise of the mean over 50 images is often carried by
   a few images and does not transfer. Along the path, keep the prefix whose
   per-image gain over the original has the highest lower 90% bootstrap
   bound, and only if that bound is above zero; otherwise the map is empty.

With a ``shortlist`` (the first-order strategy, ``calibrate.first_order``),
stages 1 and the pair space are replaced by the pairs first-order scores
rank best: they are raced like any pairs, then stages 3-4 run as above.

With no held-out split, ``cv_folds`` > 0 estimates how the choice transfers:
stages 3-4 are rerun on each (K-1)/K of the search images (the candidates
re-ranked on those images alone) and the chosen map is scored on the
remaining fold. Screening and racing are not redone per fold (a greedy
step's race is: it ranks on the fold's images), so the estimate is
slightly optimistic; a real held-out split is better.

Every unit of work goes through ``search.Scorer``, so the search resumes
from its journal after a kill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from sam_reuse.calibrate.journal import Journal
from sam_reuse.calibrate.metrics import bootstrap_interval
from sam_reuse.calibrate.search import Evaluate, Pair, Scorer, SearchResult, map_key, pair_space, top_distinct_targets
from sam_reuse.graphops.reuse_map import reuse_index

SELECTIONS = ("guarded", "naive")
TRIMMED_SHARE = 0.1  # the trimmed objective drops this share of images at each end of the per-image changes


def _trimmed_mean(changes: np.ndarray) -> float:
    """Mean of the per-image changes without the ``TRIMMED_SHARE`` largest and smallest (at least one image)."""
    ordered = np.sort(changes)
    cut = int(TRIMMED_SHARE * len(ordered))
    return float(ordered[cut: len(ordered) - cut].mean())


# How a greedy step compares maps on the search split: objective(ious, reference) is the figure to maximise, and
# a step is taken only when it beats objective(reference, reference). "mean": the rise of the search-split mean
# (a few images that flip between part and whole object can carry it); "trimmed": the mean change without the 10%
# largest and smallest per-image changes, so flips at either end do not count and most images must move.
OBJECTIVES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mean": lambda ious, reference: float(ious.mean()),
    "trimmed": lambda ious, reference: _trimmed_mean(ious - reference),
}


@dataclass(frozen=True)
class FastPlan:
    """Sizes of each stage (defaults chosen for 256 channels and about 50 search images)."""

    race_images: int = 16  # images every candidate is scored on before the cut
    screen_keep: int = 24  # channels per role (target, source) scored on every image after the race
    channels_paired: int = 12  # targets and sources that form the pair space (each)
    pair_keep: int = 48  # pairs scored on every image after the race
    top_n: int = 10  # greedy candidates: the best pairs with distinct targets
    max_pairs: int = 10  # longest greedy path
    path_keep: int = 3  # extensions per greedy step scored on every prompt after the first-prompt race

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    def planned_runs(self, channels: int, images: int, shortlist: int | None = None, per_image: int = 1) -> int:
        """Upper bound of decoder runs (prompts x maps) a search with this plan does (``shortlist``: that many
        pairs instead of screening ``channels``; ``per_image`` prompts per image)."""
        race = min(self.race_images, images)
        rest = images - race
        pairs = self.channels_paired * self.channels_paired if shortlist is None else shortlist
        screening = 0 if shortlist is not None else channels * race + min(2 * self.screen_keep, channels) * rest
        # a greedy step scores each extension on every image's first prompt, the kept ones on the others
        extensions = [max(self.top_n - step, 0) for step in range(1, self.max_pairs)]
        greedy = sum(count + min(self.path_keep, count) * (per_image - 1) for count in extensions) * images
        return (images + screening + pairs * race + min(self.pair_keep, pairs) * rest) * per_image + greedy


def guarded_prefix(baseline: np.ndarray, path_ious: Sequence[np.ndarray]) -> tuple[int, list[float]]:
    """Length of the path prefix with the highest positive lower 90% bound of per-image gain (0: none).

    Also returns the bound of each prefix length 1..len(path), in mIoU points.
    """
    bounds = [bootstrap_interval((ious - baseline) * 100)[0] for ious in path_ious]
    best, best_bound = 0, 0.0
    for length, bound in enumerate(bounds, start=1):  # strict '>': ties keep the shorter prefix
        if bound > best_bound:
            best, best_bound = length, bound
    return best, bounds


def _race(scorer: Scorer, kind: str, candidates: dict[str, np.ndarray], baseline: np.ndarray, race: range,
          rest: range, leaders: Callable[[dict[str, float]], list[str]]) -> dict[str, np.ndarray]:
    """Per-image IoUs on every row for the candidates ``leaders`` picks from their race-row mIoU change."""
    early = {key: float(scorer.measure(kind, key, index, race).mean() - baseline[race].mean())
             for key, index in candidates.items()}
    return {key: np.concatenate([scorer.measure(kind, key, candidates[key], race),
                                 scorer.measure(kind, key, candidates[key], rest)]) for key in leaders(early)}


def _top(change: dict[str, float], allowed: Sequence[str], count: int, rising: bool) -> list[str]:
    """The ``count`` allowed keys with the largest rise (or drop); ties go to the earlier key."""
    order = {key: i for i, key in enumerate(allowed)}
    sign = -1.0 if rising else 1.0
    return sorted((k for k in allowed if k in change), key=lambda k: (sign * change[k], order[k]))[:count]


def _screen(scorer: Scorer, targets: Sequence[int], sources: Sequence[int], baseline: np.ndarray,
            race: range, rest: range, plan: FastPlan) -> tuple[list[int], list[int], dict[int, float]]:
    """Zero each channel; return the targets (largest rise), the sources (largest drop) and every rise."""
    zero = scorer.channels  # the index value of the evaluator's all-zero channel
    zeroed = {str(c): reuse_index(scorer.channels, [(c, zero)]) for c in sorted(set(targets) | set(sources))}
    target_keys, source_keys = [str(c) for c in sorted(targets)], [str(c) for c in sorted(sources)]

    def leaders(change: dict[str, float]) -> list[str]:
        return sorted(set(_top(change, target_keys, plan.screen_keep, rising=True))
                      | set(_top(change, source_keys, plan.screen_keep, rising=False)), key=int)

    full = _race(scorer, "zero", zeroed, baseline, race, rest, leaders)
    rise = {key: float(ious.mean() - baseline.mean()) for key, ious in full.items()}
    chosen_targets = [int(k) for k in _top(rise, target_keys, plan.channels_paired, rising=True)]
    chosen_sources = [int(k) for k in _top(rise, source_keys, plan.channels_paired, rising=False)]
    return chosen_targets, chosen_sources, {int(k): v for k, v in rise.items()}


def _scored_extensions(scorer: Scorer, path: list[Pair], extensions: dict[str, Pair], keep: int,
                       rows: np.ndarray) -> dict[Pair, np.ndarray]:
    """Per-image IoUs over every prompt of the extensions (journal key -> pair) a greedy step compares: all of
    them when each image has one prompt; else the ``keep`` with the best mean on ``rows`` over each image's
    first prompt (ties: candidate order)."""
    indices = {key: reuse_index(scorer.channels, sorted(path + [pair])) for key, pair in extensions.items()}
    if scorer.per_image == 1:
        return {pair: scorer.measure("subset", key, indices[key]) for key, pair in extensions.items()}
    first = {key: scorer.measure("subset", key, indices[key], part="first") for key in extensions}
    leaders = sorted(extensions, key=lambda key: -first[key][rows].mean())[:keep]  # sorted is stable
    return {extensions[key]: scorer.whole(first[key], scorer.measure("subset", key, indices[key], part="others"))
            for key in leaders}


def _greedy_path(scorer: Scorer, baseline: np.ndarray, candidates: list[Pair], single: dict[Pair, np.ndarray],
                 plan: FastPlan, rows: np.ndarray | None = None, objective: str = "mean"
                 ) -> tuple[list[Pair], list[tuple[tuple[Pair, ...], np.ndarray]]]:
    """Add the pair that raises ``objective`` on ``rows`` (None: all) most until none does.

    After the first step (single pairs, already scored on every prompt), a step compares the extensions
    ``_scored_extensions`` keeps. Returns the path and every map scored on every prompt, with its IoUs. Maps
    are scored in the same units whatever ``rows`` is, so paths of different folds share their work.
    """
    rows = np.arange(len(baseline)) if rows is None else rows

    score = OBJECTIVES[objective]
    path: list[Pair] = []
    current = baseline
    tried: list[tuple[tuple[Pair, ...], np.ndarray]] = []
    while len(path) < plan.max_pairs:
        used = {t for t, _ in path}
        extensions = {map_key(sorted(path + [p])): p for p in candidates if p[0] not in used}
        if not extensions:
            break
        measured = (_scored_extensions(scorer, path, extensions, plan.path_keep, rows) if path
                    else {p: single[p] for p in extensions.values()})
        trials = [(p, measured[p]) for p in extensions.values() if p in measured]  # in candidate order
        tried += [(tuple(sorted(path + [p])), ious) for p, ious in trials]
        pair, ious = max(trials, key=lambda trial: score(trial[1][rows], current[rows]))  # the first of equals
        if score(ious[rows], current[rows]) <= score(current[rows], current[rows]):
            break
        path.append(pair)
        current = ious
    return path, tried


def _choose(baseline: np.ndarray, path: list[Pair], tried: list[tuple[tuple[Pair, ...], np.ndarray]],
            selection: str, rows: np.ndarray) -> tuple[int, list[float]]:
    """How many pairs of the path to keep, judged on ``rows``; also the lower bounds of each prefix."""
    measured = dict(tried)
    path_ious = [measured[tuple(sorted(path[:k]))][rows] for k in range(1, len(path) + 1)]
    guarded, bounds = guarded_prefix(baseline[rows], path_ious)
    return (guarded if selection == "guarded" else len(path)), bounds


def _ranked_pairs(single: dict[Pair, np.ndarray], baseline: np.ndarray, rows: np.ndarray, objective: str = "mean"
                  ) -> list[tuple[Pair, float]]:
    """Pairs by their change of ``objective`` on ``rows`` over the original, best first (ties: the smaller pair)."""
    score = OBJECTIVES[objective]
    start = score(baseline[rows], baseline[rows])
    return sorted(((p, score(ious[rows], baseline[rows]) - start) for p, ious in single.items()),
                  key=lambda item: (-item[1], item[0]))


def _cross_validate(scorer: Scorer, baseline: np.ndarray, single: dict[Pair, np.ndarray], plan: FastPlan,
                    selection: str, folds: int, objective: str) -> dict:
    """Out-of-fold gain of stages 3-4: choose on K-1 folds (images i % K != k), score on fold k."""
    images = np.arange(len(baseline))
    gains = np.zeros(len(baseline))
    maps = []
    for fold in range(folds):
        train, valid = images[images % folds != fold], images[images % folds == fold]
        candidates = top_distinct_targets(_ranked_pairs(single, baseline, train, objective), plan.top_n)
        path, tried = _greedy_path(scorer, baseline, candidates, single, plan, train, objective)
        keep, _ = _choose(baseline, path, tried, selection, train)
        chosen = dict(tried)[tuple(sorted(path[:keep]))] if keep else baseline
        gains[valid] = (chosen[valid] - baseline[valid]) * 100
        maps.append([list(p) for p in sorted(path[:keep])])
    return {"folds": folds, "gain": float(gains.mean()), "gain_interval_90": list(bootstrap_interval(gains)),
            "improved": int((gains > 0).sum()), "unchanged": int((gains == 0).sum()), "worse": int((gains < 0).sum()),
            "per_image_gain": [float(g) for g in gains], "fold_maps": maps}


def fast(evaluate: Evaluate, channels: int, targets: Sequence[int], sources: Sequence[int], journal: Journal,
         images: int, plan: FastPlan = FastPlan(), selection: str = "guarded", cv_folds: int = 0,
         progress: bool = True, shortlist: Sequence[Pair] | None = None, per_image: int = 1,
         objective: str = "mean") -> SearchResult:
    """Run the fast strategy; ``evaluate(index, rows[, prompts])`` returns per-image IoUs on the search split,
    each the mean over its ``per_image`` prompts (or the ``prompts`` slice of them).

    ``selection="naive"`` keeps the whole greedy path instead of the guarded prefix. ``cv_folds`` > 1
    adds a cross-validated estimate of the gain (``details["cross_validation"]``). ``shortlist``: race these
    pairs instead of screening channels and pairing the best (the first-order strategy). ``objective``
    (``OBJECTIVES``) ranks the pairs and compares a greedy step's maps; it changes no measurement, so searches
    with different objectives share a journal's units.
    """
    if cv_folds == 1 or cv_folds > images:
        raise ValueError(f"cross-validation needs 2 to {images} folds, not {cv_folds}")
    if plan.path_keep < 1:
        raise ValueError(f"a greedy step must keep at least one extension, not {plan.path_keep}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection '{selection}' (choose from {', '.join(SELECTIONS)})")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}' (choose from {', '.join(OBJECTIVES)})")
    race, rest = range(min(plan.race_images, images)), range(min(plan.race_images, images), images)
    screened = len(set(targets) | set(sources))
    planned = plan.planned_runs(screened, images, None if shortlist is None else len(shortlist), per_image)
    with tqdm(total=planned, desc="fast search: screening", unit="run", disable=not progress,
              dynamic_ncols=True) as bar:
        scorer = Scorer(evaluate, channels, images, journal, bar, per_image)
        baseline = scorer.pairs((), kind="baseline")
        if shortlist is None:
            chosen_targets, chosen_sources, rise = _screen(scorer, targets, sources, baseline, race, rest, plan)
            space = pair_space(chosen_targets, chosen_sources)
        else:
            space = list(shortlist)

        bar.set_description("fast search: pairs")
        pairs = {map_key([p]): p for p in space}
        keys = list(pairs)

        def pair_leaders(change: dict[str, float]) -> list[str]:
            return _top(change, keys, plan.pair_keep, rising=True)

        raced = _race(scorer, "pair", {k: reuse_index(channels, [p]) for k, p in pairs.items()}, baseline,
                      race, rest, pair_leaders)
        single = {pairs[k]: ious for k, ious in raced.items()}
        everything = np.arange(images)
        scored = _ranked_pairs(single, baseline, everything, objective)
        candidates = top_distinct_targets(scored, plan.top_n)

        bar.set_description("fast search: greedy")
        path, tried = _greedy_path(scorer, baseline, candidates, single, plan, objective=objective)
        if cv_folds:
            bar.set_description("fast search: cross-validation")
            bar.total += cv_folds * (bar.total - bar.n)  # a rough bound: folds mostly retrace the path
            cross_validation = _cross_validate(scorer, baseline, single, plan, selection, cv_folds, objective)
        bar.total = bar.n  # the path may stop before its longest: end the bar full
    guarded, bounds = _choose(baseline, path, tried, "guarded", everything)
    chosen = guarded if selection == "guarded" else len(path)
    nominated = ({"screening": {"channels": screened, "targets": chosen_targets, "sources": chosen_sources,
                                "rise_when_zeroed": {str(c): r * 100 for c, r in sorted(rise.items())}}}
                 if shortlist is None else {"shortlist": [list(p) for p in shortlist]})
    details = {"plan": plan.to_json(), "selection": selection, "objective": objective, **nominated,
               "path": [list(p) for p in path], "path_lower_bounds_90": bounds,
               "guarded_pairs": guarded, "naive_pairs": len(path)}
    if cv_folds:
        details["cross_validation"] = cross_validation
    return SearchResult(
        baseline=baseline, pair_scores=scored, candidates=candidates, subsets=tried,
        best=tuple(sorted(path[:chosen])), evaluations=scorer.evaluations, reused=scorer.reused,
        curve=[tuple(sorted(path[:k])) for k in range(len(path) + 1)], details=details)
