"""Labelled calibration records: image, mask and prompt.

A dataset folder holds ``manifest.jsonl``, one JSON object per line with
``image`` and ``mask`` paths relative to the folder and optional ``points``
(list of [x, y]), ``labels`` and ``box`` ([x0, y0, x1, y1]); this is the
layout of ``../shared/data/*`` and ``samples/data/*``.

Mask rule: a pixel is foreground when its largest channel value is above
127 (after converting palette images to RGB). 0/1 masks are recognised
by their maximum and scaled to 0/255 first. The shared sets carry a thin
border of values 1..5 left by resizing; this rule treats it as background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from exporter.errors import SamReuseError
from exporter.imaging import Prompt

MANIFEST = "manifest.jsonl"
FOREGROUND_THRESHOLD = 127


@dataclass(frozen=True)
class Record:
    """One calibration example; paths are absolute."""

    key: str
    image: Path
    mask: Path
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None

    @property
    def prompt(self) -> Prompt:
        return Prompt(points=self.points, labels=self.labels, box=self.box)


def read_manifest(folder: str | Path) -> list[Record]:
    """Records of ``folder/manifest.jsonl`` in file order."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise SamReuseError(f"{manifest}: manifest not found")
    records = []
    for line_no, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image, mask = entry["image"], entry["mask"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SamReuseError(f"{manifest}:{line_no}: not a record with 'image' and 'mask' ({exc})") from None
        points = np.asarray(entry["points"], dtype=np.float32).reshape(-1, 2) if entry.get("points") else None
        labels = None
        if points is not None:
            labels = np.asarray(entry.get("labels") or [1] * len(points), dtype=np.float32)
        box = np.asarray(entry["box"], dtype=np.float32) if entry.get("box") else None
        records.append(Record(key=str(entry.get("id", Path(image).stem)), image=folder / image, mask=folder / mask,
                              points=points, labels=labels, box=box))
    return records


def load_mask(path: str | Path) -> np.ndarray:
    """Binary HxW mask by the module's documented rule."""
    try:
        with Image.open(path) as img:
            values = np.asarray(img.convert("RGB") if img.mode not in ("L", "1", "I", "I;16") else img)
    except FileNotFoundError:
        raise SamReuseError(f"{path}: mask not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise SamReuseError(f"{path}: cannot read mask ({exc})") from None
    if values.ndim == 3:
        values = values.max(axis=2)
    if values.dtype == bool:
        return values
    if values.max() <= 1:
        return values > 0
    return values > FOREGROUND_THRESHOLD
