"""The shipping rule: the tuned encoder ships only when images the search never saw say it helps.

A search rates maps on the images it chose them from, and users deploy on the
images that come next, which often differ (other patients, other scenes). On
splits whose halves come from different parts of a domain, the search split
rose while the held-out split fell (benchmarks/README.md, "Do no harm"), so
a search-split figure cannot decide what ships. The rule:

* the held-out split is cut into two interleaved parts, A (even positions)
  and B (odd positions);
* with ``selection="cross-fitted"`` (default), the map of the search's curve
  (each prefix of the greedy path, or the best subset of each size) with the
  highest lower 90% bootstrap bound of per-image gain is chosen on A and
  scored on B, and chosen on B and scored on A: every held-out image gets a
  gain from a map chosen without it. Those out-of-fold gains **decide**: the
  **candidate**, the map with the highest bound on all held-out images,
  ships when their lower 90% bound is above 0, and they are the **reported**
  figure (they chose no map they score; they did decide the gate);
* with ``selection="validated"`` (the default until 2026-12-07), A alone
  chooses the candidate and decides, and B, which took no part in any
  choice, is reported: half the images decide, so a real gain of a few
  points rarely clears the bound (mask flips move single images by 60-95
  points); ``guarded``/``naive`` take the search's own choice and decide on
  A the same way;
* otherwise the original encoder ships and the candidate is kept under a
  name saying it was not shipped (``--ship-anyway`` ships it regardless).

Each held-out image is scored on its own prompt, the one a user deploys with.
Scoring it on two derived prompts as well (as the search's evidence does)
cost a quarter of an encoder pass and did not pay: on 20 splits of the four
shared sets the own-prompt rule shipped the same 14 maps and gained as much
(benchmarks/README.md, "Gains that carry").

Without a held-out split the cross-validated estimate of the search-chosen map
decides, and is the figure reported (it leans optimistic: screening saw every
image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sam_reuse.calibrate.fast import guarded_prefix
from sam_reuse.calibrate.metrics import bootstrap_interval

TUNED_SHIPPED = 0
ORIGINAL_SHIPPED = 3  # exit status of tune/run when the original encoder is the deliverable
SELECTIONS = ("cross-fitted", "validated", "guarded", "naive")
ONE_SIDED_95 = 1.645  # z of a lower 90% two-sided bound


@dataclass(frozen=True)
class Gain:
    """A paired per-image gain (mIoU points) summarised: mean, 90% bootstrap interval, images up/same/down."""

    images: int
    gain: float
    interval: tuple[float, float]
    improved: int
    unchanged: int
    worse: int

    @classmethod
    def of(cls, per_image: np.ndarray) -> Gain:
        per_image = np.asarray(per_image, dtype=np.float64)
        return cls(images=int(per_image.size), gain=float(per_image.mean()) if per_image.size else float("nan"),
                   interval=bootstrap_interval(per_image), improved=int((per_image > 0).sum()),
                   unchanged=int((per_image == 0).sum()), worse=int((per_image < 0).sum()))

    def label(self) -> str:
        """'improvement', 'harmful' or 'no reliable improvement', read off the interval."""
        low, high = self.interval
        return "improvement" if low > 0 else "harmful" if high < 0 else "no reliable improvement"

    @property
    def images_needed(self) -> int | None:
        """About how many images a gain of this size and spread needs for its lower 90% bound to clear 0.

        The interval's half width shrinks as one over the square root of the images; None for no gain.
        """
        low, high = self.interval
        if not self.gain > 0 or not self.images:
            return None
        return max(1, math.ceil(self.images * ((high - low) / 2 / self.gain) ** 2))

    def describe(self) -> str:
        low, high = self.interval
        return (f"{self.gain:+.2f} mIoU, 90% CI [{low:+.2f}, {high:+.2f}] "
                f"({self.improved} better / {self.worse} worse of {self.images})")

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "gain": self.gain, "gain_interval_90": list(self.interval),
                "improved": self.improved, "unchanged": self.unchanged, "worse": self.worse, "label": self.label()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Gain:
        return cls(images=data["images"], gain=data["gain"], interval=tuple(data["gain_interval_90"]),
                   improved=data["improved"], unchanged=data["unchanged"], worse=data["worse"])


@dataclass(frozen=True)
class Decision:
    """What ships and why; ``candidate`` indexes the search's curve (0: the original, no candidate)."""

    ship_tuned: bool
    candidate: int
    basis: str  # what decided, in the user's words
    decided: Gain | None  # the candidate's gain on what decided (None: no candidate)
    reported: Gain | None  # the figure to quote: on images whose map was chosen without them (None: none)
    forced: bool = False
    empty_reason: str = ""
    lower_bounds: list[float] = field(default_factory=list)  # per curve map 1..L, on what decided

    @property
    def exit_status(self) -> int:
        return TUNED_SHIPPED if self.ship_tuned else ORIGINAL_SHIPPED

    @property
    def verdict(self) -> str:
        """One line a user can act on: what the evidence says, and what ships."""
        if self.decided is None:
            return f"{self.empty_reason}: the original encoder ships"
        head = f"{self.decided.label()}: {self.basis} {self.decided.describe()}"
        if self.ship_tuned:
            return head + ("; the tuned encoder ships anyway (--ship-anyway)" if self.forced
                           else "; the tuned encoder ships")
        needed = self.decided.images_needed
        if needed is not None:
            head += f" (a gain of this size and spread needs about {needed} images to show)"
        return head + "; the original encoder ships"


def held_out_parts(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the validation part (even positions) and the test part (odd positions) of a held-out split.

    Interleaved rather than halved, so a drift along the manifest order falls on both parts alike.
    """
    rows = np.arange(count)
    return rows[0::2], rows[1::2]


def best_on(curve_ious: Sequence[np.ndarray], rows: np.ndarray) -> tuple[int, list[float]]:
    """The curve map (1..L) with the highest lower 90% bound of per-image gain on ``rows``, and every map's bound.

    Ties keep the shorter map; 0 only when the curve has no map at all.
    """
    _, bounds = guarded_prefix(curve_ious[0][rows], [ious[rows] for ious in curve_ious[1:]])
    return (1 + int(np.argmax(bounds)) if bounds else 0), bounds


def cross_fitted_gains(curve_ious: Sequence[np.ndarray], parts: Sequence[np.ndarray]) -> np.ndarray:
    """Per image, the gain (points) of the curve map chosen on the other part."""
    gains = np.zeros(len(curve_ious[0]))
    for chooser, scoree in ((parts[0], parts[1]), (parts[1], parts[0])):
        chosen, _ = best_on(curve_ious, chooser)
        gains[scoree] = (curve_ious[chosen][scoree] - curve_ious[0][scoree]) * 100
    return gains


def decide_on_held_out(curve_ious: Sequence[np.ndarray], search_choice: int, selection: str = "cross-fitted",
                       force: bool = False, empty_reason: str = "no pair improved the search split") -> Decision:
    """The rule on a held-out split; ``curve_ious[k]`` are the held-out IoUs of curve map k (0: the original).

    ``search_choice`` is the curve index the search chose on its own split (used by guarded/naive).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection '{selection}' (choose from {', '.join(SELECTIONS)})")
    count = len(curve_ious[0])
    validation, test = held_out_parts(count)
    every = np.arange(count)
    candidate, bounds = best_on(curve_ious, every if selection == "cross-fitted" else validation)
    if selection in ("guarded", "naive"):
        candidate = search_choice
    if candidate == 0:
        return Decision(False, 0, "", None, None, empty_reason=empty_reason, lower_bounds=bounds)
    if selection == "cross-fitted" and len(test):
        gains = cross_fitted_gains(curve_ious, (validation, test))
        decided = Gain.of(gains)
        basis = (f"held-out split, cross-fitted (each of {count} images scored with the map chosen on the other "
                 "half)")
        reported = decided
    else:
        decided = Gain.of((curve_ious[candidate] - curve_ious[0])[validation] * 100)
        basis = f"validation part of the held-out split ({len(validation)} of {count} images)"
        reported = Gain.of((curve_ious[candidate] - curve_ious[0])[test] * 100) if len(test) else None
    return Decision(ship_tuned=force or decided.interval[0] > 0, candidate=candidate, basis=basis, decided=decided,
                    reported=reported, forced=force and decided.interval[0] <= 0, lower_bounds=bounds)


def decide_on_cross_validation(per_image_gain: np.ndarray, search_choice: int, folds: int, force: bool = False,
                               empty_reason: str = "no pair improved the search split") -> Decision:
    """The rule without a held-out split: the out-of-fold gain of the search's own choice decides."""
    if search_choice == 0:
        return Decision(False, 0, "", None, None, empty_reason=empty_reason)
    decided = Gain.of(per_image_gain)
    basis = f"cross-validated estimate ({folds} folds of the search split, no held-out split)"
    return Decision(ship_tuned=force or decided.interval[0] > 0, candidate=search_choice, basis=basis,
                    decided=decided, reported=decided, forced=force and decided.interval[0] <= 0)
