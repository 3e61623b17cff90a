"""First-order scores of every channel reuse at the image embedding at once, from the exported scorer.

With G the gradient of one prompt's soft IoU with respect to its image embedding X (256 x 4096), the
scorer (``contract.FIRST_ORDER_SCORER``, ``exporter.wrappers.FirstOrderScorer``) returns M = G X^T. To first
order, replacing channel t by channel s changes that soft IoU by M[t, s] - M[t, t]: one backward pass per
prompt ranks all 65,280 pairs, and the search measures only the best of them exactly. How well this ranking
agrees with measured changes is in benchmarks/README.md ("First-order ranking").

The scorer takes prompts of ``FIRST_ORDER_POINTS`` points (one point and SAM's padding point, or a box):
what the default evidence's spread points always are. Other prompts are left out of the mean, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from sam_reuse.base.contract import FIRST_ORDER_INPUTS, FIRST_ORDER_POINTS
from sam_reuse.base.imaging import low_res_target, prompt_arrays
from sam_reuse.base.records import Sample
from sam_reuse.base.runtime import load_model, ort_session
from sam_reuse.calibrate.search import Pair


@dataclass(frozen=True)
class FirstOrderScores:
    """The mean of M over the prompts scored, and how many prompts were scored and left out."""

    products: np.ndarray  # channels x channels
    prompts: int
    left_out: int

    def pair_changes(self) -> np.ndarray:
        """[t, s]: first-order soft-IoU change of replacing t by s (t = s: -inf, not a pair)."""
        changes = self.products - np.diag(self.products)[:, None]
        np.fill_diagonal(changes, -np.inf)
        return changes

    def best_pairs(self, count: int, targets: Sequence[int], sources: Sequence[int], per_target: int) -> list[Pair]:
        """The ``count`` pairs (allowed targets and sources, at most ``per_target`` sources for one target) with
        the largest first-order change, best first; ties go to the smaller (target, source).

        The cap keeps targets diverse: the greedy path takes at most one pair per target.
        """
        changes = self.pair_changes()
        ranked = sorted((-changes[t, s], int(t), int(s)) for t in targets for s in sources if t != s)
        chosen: list[Pair] = []
        taken: dict[int, int] = {}
        for _, target, source in ranked:
            if taken.get(target, 0) < per_target:
                chosen.append((target, source))
                taken[target] = taken.get(target, 0) + 1
                if len(chosen) == count:
                    break
        return chosen


def first_order_scores(scorer: str | Path, samples: Sequence[Sample], embeddings: np.ndarray,
                       progress: bool = True) -> FirstOrderScores:
    """Mean M = G X^T over ``samples`` (with ``embeddings``, one per sample) whose prompt the scorer takes."""
    session = ort_session(load_model(scorer, "first-order scorer", role="first_order").SerializeToString())
    total, scored = np.zeros((embeddings.shape[1],) * 2), 0
    for sample, embedding in tqdm(list(zip(samples, embeddings)), desc="first-order scores", unit="prompt",
                                  disable=not progress):
        coords, labels = prompt_arrays(sample.prompt, sample.hw)
        if coords.shape[1] != FIRST_ORDER_POINTS:
            continue
        target, valid = low_res_target(sample.mask)
        feeds = dict(zip(FIRST_ORDER_INPUTS, (embedding[None].astype(np.float32), coords, labels, target[None],
                                              valid[None])))
        total += session.run(["channel_products"], feeds)[0][0]
        scored += 1
    return FirstOrderScores(total / max(scored, 1), scored, len(samples) - scored)
