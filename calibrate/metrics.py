"""Paired uncertainty of a gain: bootstrap intervals of per-image differences (mask IoU: ``sam_reuse.base.imaging``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _resampled_means(differences: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    return differences[rng.integers(0, differences.size, size=(resamples, differences.size))].mean(axis=1)


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_interval(differences: np.ndarray, confidence: float = 0.9, resamples: int = 4000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired per-image differences (seeded: reproducible)."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size == 0:
        return float("nan"), float("nan")
    return _percentile_interval(_resampled_means(differences, resamples, np.random.default_rng(seed)), confidence)


def pooled_bootstrap_interval(groups: Sequence[np.ndarray], confidence: float = 0.9, resamples: int = 4000,
                              seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the average over groups of each group's mean difference.

    For independent sets (datasets): images are resampled within each group, so every group keeps its
    weight. With one group this is ``bootstrap_interval``.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    return _percentile_interval(np.mean([_resampled_means(g, resamples, rng) for g in groups], axis=0), confidence)
