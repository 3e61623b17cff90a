"""The data every stage passes around: prompts, calibration records as listed, and records as loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """Point and/or box prompt in original-image pixel coordinates.

    ``points`` is Nx2 (x, y), ``labels`` N values (1 foreground, 0 background);
    ``box`` is (x0, y0, x1, y1).
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None


@dataclass(frozen=True)
class Record:
    """One calibration example as listed; paths are absolute, nothing is read yet."""

    key: str
    image: Path
    mask: Path
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None

    @property
    def prompt(self) -> Prompt:
        return Prompt(points=self.points, labels=self.labels, box=self.box)


@dataclass(frozen=True)
class Sample:
    """A usable record: its binary mask, the prompt to decode with and the image's content hash."""

    record: Record
    mask: np.ndarray
    prompt: Prompt
    image_sha256: str

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def hw(self) -> tuple[int, int]:
        return self.mask.shape
