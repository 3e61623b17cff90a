"""Pair search at one site: the reference method's exhaustive strategy, resumable.

``exhaustive`` (Long et al., faithful to the public release):

1. score every ordered pair (target <- source) in the pair space by the change
   of search-split mIoU against the unmodified model;
2. keep the N best pairs with distinct targets (ties: lower target, then
   lower source);
3. evaluate every non-empty subset of those N pairs (2^N - 1 maps);
4. keep the subset with the highest search-split mIoU (ties: fewer pairs,
   then enumeration order). One deliberate difference: when no subset beats
   the unmodified model on the search split, the map is empty.

The pair space defaults to all C x (C - 1) pairs (65,280 for SAM's embedding:
about 27 hours of decoder runs at 50 images on a 2-core CPU); restrict it
with ``parse_channels`` specs such as ``unsalient:16`` / ``salient:16``.
Every finished evaluation goes to a ``Journal``, so a killed search resumes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from calibrate.journal import Journal
from calibrate.salience import salience_order
from graphops.reuse_map import reuse_index

Pair = tuple[int, int]
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_channels(spec: str, channels: int, salience: np.ndarray | None = None) -> list[int]:
    """Channel list from ``all``, ``salient:K``, ``unsalient:K`` or ``3,7,10-15`` (sorted, unique)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(channels))
    kind, _, count = spec.partition(":")
    if kind in ("salient", "unsalient"):
        if salience is None:
            raise ValueError(f"'{spec}' needs channel salience")
        if not count.isdigit() or not 1 <= int(count) <= channels:
            raise ValueError(f"'{spec}': expected {kind}:K with 1 <= K <= {channels}")
        order = salience_order(salience)
        chosen = order[: int(count)] if kind == "salient" else order[::-1][: int(count)]
        return sorted(int(c) for c in chosen)
    picked: set[int] = set()
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(f"'{spec}': not 'all', 'salient:K', 'unsalient:K' or a list like 3,7,10-15")
        low, high = int(match[1]), int(match[2] or match[1])
        if not low <= high < channels:
            raise ValueError(f"'{spec}': channels must lie in 0..{channels - 1}")
        picked.update(range(low, high + 1))
    return sorted(picked)


def pair_space(targets: Sequence[int], sources: Sequence[int]) -> list[Pair]:
    """Every ordered pair (target, source) with target != source, in a fixed order."""
    return [(t, s) for t in sorted(set(targets)) for s in sorted(set(sources)) if t != s]


def planned_subsets(pairs: Sequence[Pair], top_n: int) -> int:
    """How many subsets the exhaustive strategy will try at most: 2^min(N, distinct targets) - 1."""
    return 2 ** min(top_n, len({t for t, _ in pairs})) - 1


def top_distinct_targets(scored: Sequence[tuple[Pair, float]], count: int) -> list[Pair]:
    """The ``count`` best pairs, at most one per target."""
    ranked = sorted(scored, key=lambda item: (-item[1], item[0]))
    chosen: list[Pair] = []
    used: set[int] = set()
    for pair, _ in ranked:
        if pair[0] not in used:
            chosen.append(pair)
            used.add(pair[0])
        if len(chosen) == count:
            break
    return chosen


def _key(pairs: Sequence[Pair]) -> str:
    return ";".join(f"{t}<-{s}" for t, s in pairs) or "none"


@dataclass
class SearchResult:
    """Everything the search measured on the search split (per-image IoUs, 0..1)."""

    baseline: np.ndarray
    pair_scores: list[tuple[Pair, float]]  # (pair, mIoU change), best first
    candidates: list[Pair]
    subsets: list[tuple[tuple[Pair, ...], np.ndarray]] = field(default_factory=list)
    best: tuple[Pair, ...] = ()
    evaluations: int = 0  # decoder runs done by this process
    reused: int = 0  # maps read back from the journal instead of evaluated

    def best_of_size(self, size: int) -> tuple[Pair, ...] | None:
        """Best subset with exactly ``size`` pairs (size 0: the empty map)."""
        if size == 0:
            return ()
        sized = [(pairs, ious.mean()) for pairs, ious in self.subsets if len(pairs) == size]
        return max(sized, key=lambda item: item[1])[0] if sized else None

    def ious_of(self, pairs: tuple[Pair, ...]) -> np.ndarray:
        if not pairs:
            return self.baseline
        return next(ious for p, ious in self.subsets if p == pairs)


Evaluate = Callable[[np.ndarray], np.ndarray]


def exhaustive(evaluate: Evaluate, channels: int, pairs: Sequence[Pair], top_n: int, journal: Journal,
               images: int, progress: bool = True) -> SearchResult:
    """Run the exhaustive strategy; ``evaluate(index)`` returns per-image IoUs on the search split."""
    if top_n < 1:
        raise ValueError("top N must be at least 1")
    n_subsets = planned_subsets(pairs, top_n)
    done = [0, 0]  # evaluated, reused

    def measured(kind: str, key: str, index: np.ndarray) -> np.ndarray:
        entry = journal.get(kind, key)
        if entry is None:
            entry = journal.add(kind, key, ious=[float(v) for v in evaluate(index)])
            done[0] += 1
        else:
            done[1] += 1
        bar.update(1)
        return np.asarray(entry["ious"], dtype=np.float64)

    with tqdm(total=1 + len(pairs) + n_subsets, desc="exhaustive search", unit="map", disable=not progress,
              dynamic_ncols=True) as bar:
        baseline = measured("baseline", "none", reuse_index(channels, ()))
        scored = []
        for pair in pairs:
            delta = measured("pair", _key([pair]), reuse_index(channels, [pair])).mean() - baseline.mean()
            scored.append((pair, float(delta)))
            bar.set_postfix(best=f"{max(d for _, d in scored) * 100:+.2f}")
        candidates = top_distinct_targets(scored, top_n)
        bar.total = 1 + len(pairs) + 2 ** len(candidates) - 1
        subsets = []
        for size in range(1, len(candidates) + 1):
            for subset in itertools.combinations(candidates, size):
                subsets.append((subset, measured("subset", _key(subset), reuse_index(channels, subset))))
    best: tuple[Pair, ...] = ()
    best_miou = baseline.mean()
    for subset, ious in subsets:  # strict '>': ties keep the smaller, earlier subset
        if ious.mean() > best_miou:
            best, best_miou = subset, ious.mean()
    return SearchResult(baseline=baseline, pair_scores=sorted(scored, key=lambda item: (-item[1], item[0])),
                        candidates=candidates, subsets=subsets, best=best,
                        evaluations=done[0] * images, reused=done[1])
