"""Pair search at one site: shared pieces, and the reference method's exhaustive strategy.

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
The default strategy is ``calibrate.fast``. Both measure through a
``Scorer``, which writes every finished unit of work to a ``Journal``, so a
killed search resumes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from sam_reuse.calibrate.journal import Journal
from sam_reuse.calibrate.salience import salience_order
from sam_reuse.graphops.reuse_map import reuse_index

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
        if low > high:
            raise ValueError(f"'{spec}': range {low}-{high} runs backwards (write {high}-{low})")
        if high >= channels:
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


@dataclass
class SearchResult:
    """Everything the search measured on the search split (per-image IoUs, 0..1)."""

    baseline: np.ndarray
    pair_scores: list[tuple[Pair, float]]  # (pair, mIoU change), best first
    candidates: list[Pair]
    subsets: list[tuple[tuple[Pair, ...], np.ndarray]] = field(default_factory=list)
    best: tuple[Pair, ...] = ()
    evaluations: int = 0  # decoder runs done by this process
    reused: int = 0  # units of work read back from the journal instead of evaluated
    curve: list[tuple[Pair, ...]] = field(default_factory=list)  # the map of each size 0, 1, ... the report plots
    details: dict[str, Any] = field(default_factory=dict)  # strategy-specific facts for report.json

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


# (gather index, image rows[, which of each image's prompts]) -> IoU per row, the mean over those prompts
Evaluate = Callable[..., np.ndarray]
# Parts of each image's prompts a unit of work may cover instead of all: the first (the image's own prompt), or the
# others (spread points, altered copies). The whole is their mean weighted by prompts (``Scorer.whole``).
PARTS = {"first": slice(0, 1), "others": slice(1, None)}


def map_key(pairs: Sequence[Pair]) -> str:
    """Journal key of a reuse map: ``t<-s;t<-s`` in the given order, ``none`` when empty."""
    return ";".join(f"{t}<-{s}" for t, s in pairs) or "none"


class Scorer:
    """Per-image search-split IoUs of maps, each measured once.

    A unit of work is one map on a range of image rows, with every prompt of those images or one ``PARTS``
    of them; it is read back from the journal when a previous run finished it, else evaluated and recorded.
    ``evaluations`` counts decoder runs done here (one per prompt and map), ``reused`` the units an earlier
    run left in the journal.
    """

    def __init__(self, evaluate: Evaluate, channels: int, images: int, journal: Journal, bar: tqdm,
                 per_image: int = 1):
        self.evaluate, self.channels, self.images, self.per_image = evaluate, channels, images, per_image
        self.journal, self.bar = journal, bar
        self.evaluations = 0
        self._measured: set[tuple[str, str]] = set()
        self._read_back: set[tuple[str, str]] = set()

    @property
    def reused(self) -> int:
        return len(self._read_back)

    def measure(self, kind: str, key: str, index: np.ndarray, rows: range | None = None, part: str | None = None
                ) -> np.ndarray:
        """IoUs of the map ``(kind, key)`` (gather ``index``) on ``rows`` (None: every image), over ``part`` of
        each image's prompts (None: all)."""
        rows = range(self.images) if rows is None else rows
        if not len(rows):
            return np.empty(0, dtype=np.float64)
        unit = (key if len(rows) == self.images else f"{key}@{rows.start}:{rows.stop}") + (f"#{part}" if part else "")
        runs = len(rows) * (self.per_image if part is None else len(range(self.per_image)[PARTS[part]]))
        entry = self.journal.get(kind, unit)
        if entry is None:
            ious = self.evaluate(index, rows) if part is None else self.evaluate(index, rows, PARTS[part])
            entry = self.journal.add(kind, unit, ious=[float(v) for v in ious])
            self.evaluations += runs
            self._measured.add((kind, unit))
            self.bar.update(runs)
        elif (kind, unit) not in self._measured and (kind, unit) not in self._read_back:
            self._read_back.add((kind, unit))
            self.bar.update(runs)
        return np.asarray(entry["ious"], dtype=np.float64)

    def whole(self, first: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Per-image IoUs over every prompt from those over the ``first`` and the ``others`` part."""
        return (first + (self.per_image - 1) * others) / self.per_image

    def pairs(self, pairs: Sequence[Pair], rows: range | None = None, kind: str = "subset") -> np.ndarray:
        return self.measure(kind, map_key(pairs), reuse_index(self.channels, pairs), rows)


def exhaustive(evaluate: Evaluate, channels: int, pairs: Sequence[Pair], top_n: int, journal: Journal,
               images: int, progress: bool = True, per_image: int = 1) -> SearchResult:
    """Run the exhaustive strategy; ``evaluate(index, rows)`` returns per-image IoUs on the search split (the
    mean over ``per_image`` prompts each)."""
    if top_n < 1:
        raise ValueError("top N must be at least 1")
    n_subsets = planned_subsets(pairs, top_n)
    with tqdm(total=(1 + len(pairs) + n_subsets) * images * per_image, desc="exhaustive search", unit="run",
              disable=not progress, dynamic_ncols=True) as bar:
        scorer = Scorer(evaluate, channels, images, journal, bar, per_image)
        baseline = scorer.pairs((), kind="baseline")
        scored = []
        for pair in pairs:
            delta = scorer.pairs([pair], kind="pair").mean() - baseline.mean()
            scored.append((pair, float(delta)))
            bar.set_postfix(best=f"{max(d for _, d in scored) * 100:+.2f}")
        candidates = top_distinct_targets(scored, top_n)
        bar.total = (1 + len(pairs) + 2 ** len(candidates) - 1) * images * per_image
        subsets = []
        for size in range(1, len(candidates) + 1):
            for subset in itertools.combinations(candidates, size):
                subsets.append((subset, scorer.pairs(subset)))
    best: tuple[Pair, ...] = ()
    best_miou = baseline.mean()
    for subset, ious in subsets:  # strict '>': ties keep the smaller, earlier subset
        if ious.mean() > best_miou:
            best, best_miou = subset, ious.mean()
    result = SearchResult(baseline=baseline, pair_scores=sorted(scored, key=lambda item: (-item[1], item[0])),
                          candidates=candidates, subsets=subsets, best=best,
                          evaluations=scorer.evaluations, reused=scorer.reused)
    result.curve = [result.best_of_size(size) for size in range(len(candidates) + 1)]
    return result
