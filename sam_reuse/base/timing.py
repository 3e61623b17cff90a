"""The one timing loop of every benchmark and of ``run --quantize``'s latency ratio: callables timed
interleaved, round by round, after a warm-up round.

Interleaving puts every candidate under the same background load of a shared machine, so ratios between
them are fair even when absolute times drift; medians damp the outliers.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` rounds, each round calling every callable once."""
    for run in runs.values():  # warm-up: first-call allocations and lazy initialisation are not timed
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time over ``reference``'s in the same round."""
    return statistics.median(t / r for t, r in zip(times[name], times[reference]))
