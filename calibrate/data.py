"""Labelled calibration data: records, the mask rule, prompts, splits and bad files.

Two layouts are read:

* a folder with ``manifest.jsonl``, one JSON object per line with ``image``
  and ``mask`` paths relative to the folder and optional ``points`` (list of
  [x, y]), ``labels`` and ``box`` ([x0, y0, x1, y1]): the layout of
  ``../shared/data/*`` and ``samples/data/*``;
* a folder of images and a folder of masks paired by file stem (``--masks``,
  or subfolders ``images/`` and ``masks/``), ordered by stem.

Mask rule (``MASK_RULE``): a pixel is foreground when its largest channel
value is above 127, after converting palette images to RGB. Masks whose
maximum is 1 (0/1 masks) are foreground where the value is 1. The shared sets
carry a thin border of values 1..5 around objects left by resizing; this rule
treats that border as background. Empty masks are excluded and reported.

Split: by position in the manifest (or stem order), *before* unusable records
are dropped, so a bad file never moves an image from one split to the other.
Default: the first half is the search split, the second half held out.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import sha256_file
from sam_reuse.base.imaging import open_image, resized_shape
from sam_reuse.base.records import Prompt, Record, Sample

MANIFEST = "manifest.jsonl"
FOREGROUND_THRESHOLD = 127
MASK_RULE = "foreground = largest channel value > 127 (masks with maximum 1: value 1); resize borders (1..5) are background"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PROMPT_MODES = ("given", "point", "box")
MAX_ID_BYTES = 200  # a record id names its overlay, overlay-<id>.png: file names hold at most 255 bytes
POINT_LABELS = (0.0, 1.0)  # a manifest point is background (0) or foreground (1); a box has its own field
DEFAULT_MIN_IMAGES = 2


class SkippedRecordsWarning(UserWarning):
    """Some calibration records were unusable and left out (one warning lists them all)."""


@dataclass
class CalibrationSet:
    """The search and held-out splits of a dataset, plus what was left out and why."""

    search: list[Sample]
    held_out: list[Sample]
    skipped: dict[str, str] = field(default_factory=dict)  # record key -> reason
    source: str = ""
    prompt_mode: str = "given"


def _plain_name(value: object, what: str) -> str:
    """A record id used in file names (overlays): a non-empty string (or integer) naming no folder."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"{what} {value!r} is not a plain file name")
    if len(value.encode()) > MAX_ID_BYTES:  # found only when its overlay is written, after the whole search
        raise ValueError(f"{what} of {len(value.encode())} bytes is too long for a file name (at most {MAX_ID_BYTES})")
    return value


def _relative_file(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"'{what}' must be a path string, not {value!r}")
    return value


def read_manifest(folder: str | Path) -> list[Record]:
    """Records of ``folder/manifest.jsonl`` in file order."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise SamReuseError(f"{manifest}: manifest not found")
    try:
        text = manifest.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SamReuseError(f"{manifest}: not UTF-8 text ({exc})") from None
    records, seen = [], {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise TypeError(f"a JSON {type(entry).__name__}, not an object")
            image, mask = _relative_file(entry["image"], "image"), _relative_file(entry["mask"], "mask")
            points = np.asarray(entry["points"], dtype=np.float32).reshape(-1, 2) if entry.get("points") else None
            labels = None
            if points is not None:
                labels = np.asarray(entry.get("labels") or [1] * len(points), dtype=np.float32).reshape(-1)
                if len(labels) != len(points):
                    raise ValueError(f"{len(points)} points but {len(labels)} labels")
            box = np.asarray(entry["box"], dtype=np.float32).reshape(4) if entry.get("box") else None
            for name, values in (("points", points), ("labels", labels), ("box", box)):
                if values is not None and not np.isfinite(values).all():
                    raise ValueError(f"'{name}' holds a value that is not a finite number")
            if labels is not None and not np.isin(labels, POINT_LABELS).all():
                raise ValueError(f"'labels' must be 1 (foreground) or 0 (background), not {labels.tolist()}")
            if box is not None and not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"'box' must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, not {box.tolist()}")
            key = _plain_name(entry.get("id", Path(image).stem), "id")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
            raise SamReuseError(f"{manifest}:{line_no}: not a record with 'image' and 'mask' ({exc})") from None
        if key in seen:
            raise SamReuseError(f"{manifest}:{line_no}: record id '{key}' already used on line {seen[key]}")
        seen[key] = line_no
        records.append(Record(key=key, image=folder / image, mask=folder / mask, points=points, labels=labels,
                              box=box))
    if not records:
        raise SamReuseError(f"{manifest}: no records")
    return records


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise SamReuseError(f"{folder}: two files with the stem '{path.stem}' ({found[path.stem].name}, {path.name})")
            found[path.stem] = path
    return found


def pair_folders(images: str | Path, masks: str | Path) -> list[Record]:
    """Records pairing ``images/STEM.*`` with ``masks/STEM.*``, in stem order.

    An image without a mask becomes a record whose mask is missing, so it is
    reported with the other bad files instead of silently disappearing.
    """
    images, masks = Path(images), Path(masks)
    for folder in (images, masks):
        if not folder.is_dir():
            raise SamReuseError(f"{folder}: not a directory")
    image_files, mask_files = _images_by_stem(images), _images_by_stem(masks)
    if not image_files:
        raise SamReuseError(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [Record(key=stem, image=path, mask=mask_files.get(stem, masks / f"{stem}.png"))
            for stem, path in sorted(image_files.items())]


def read_records(folder: str | Path, masks: str | Path | None = None) -> list[Record]:
    """Records of a dataset folder in either layout (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SamReuseError(f"{folder}: data folder not found")
    if masks is not None:
        if not Path(masks).is_dir():
            raise SamReuseError(f"--masks {masks}: not a folder (it pairs its masks with {folder}'s images by stem)")
        if Path(masks).resolve() == folder.resolve():
            raise SamReuseError(f"--masks {masks}: the images' own folder (each image would be its own mask)")
        return pair_folders(folder, masks)
    if (folder / MANIFEST).is_file():
        return read_manifest(folder)
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        return pair_folders(folder / "images", folder / "masks")
    raise SamReuseError(f"{folder}: no {MANIFEST}, no images/ + masks/ subfolders, and no --masks folder given")


def binarize_mask(values: np.ndarray) -> np.ndarray:
    """HxW or HxWxC mask values -> boolean HxW by ``MASK_RULE``."""
    if values.ndim == 3:  # the channels one at a time: numpy reduces a short last axis slowly (7x here)
        values = np.maximum.reduce([values[..., channel] for channel in range(values.shape[2])])
    if values.dtype == bool:
        return values
    if values.max(initial=0) == 1:
        return values > 0
    return values > FOREGROUND_THRESHOLD


def load_mask(path: str | Path) -> np.ndarray:
    """Binary HxW mask by ``MASK_RULE``."""
    with open_image(path, "mask") as img:
        try:
            if img.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
                img = img.convert("RGB")
            values = np.asarray(img)
        except OSError as exc:  # truncated data shows up when the pixels are decoded
            raise SamReuseError(f"{path}: cannot read mask ({exc})") from None
    return binarize_mask(values)


def border_distance(mask: np.ndarray) -> np.ndarray:
    """Per pixel: Euclidean distance to the nearest background pixel or beyond the image edge (0 outside)."""
    return distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the foreground pixel farthest from the background and the image edge.

    Deterministic: among equally far pixels (a plateau, e.g. the middle row of
    a rectangle) the one nearest to the plateau's centroid wins, then the
    first in row-major order.
    """
    distance = border_distance(mask)
    rows, cols = np.nonzero(distance == distance.max())
    offset = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
    best = int(np.argmin(offset))  # argmin returns the first minimum: row-major among ties
    return float(cols[best]), float(rows[best])


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the foreground, inclusive pixel coordinates."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])


def choose_prompt(record: Record, mask: np.ndarray, mode: str) -> Prompt:
    """The prompt to decode with: the given one, or one derived from the mask (``PROMPT_MODES``)."""
    if mode not in PROMPT_MODES:
        raise SamReuseError(f"unknown prompt mode '{mode}' (choose from {', '.join(PROMPT_MODES)})")
    if mode == "box":
        return Prompt(box=np.asarray(bounding_box(mask), dtype=np.float32))
    if mode == "given" and (record.points is not None or record.box is not None):
        return record.prompt
    x, y = interior_point(mask)
    return Prompt(points=np.array([[x, y]], dtype=np.float32), labels=np.array([1], dtype=np.float32))


def _image_size_and_hash(path: Path) -> tuple[tuple[int, int], str]:
    with open_image(path) as img:
        try:
            img.load()  # decode fully: a truncated file fails here, not during encoding
        except OSError as exc:
            raise SamReuseError(f"{path}: cannot read image ({exc})") from None
        width, height = img.size
    return (height, width), sha256_file(path)


def _prompt_problem(prompt: Prompt, hw: tuple[int, int]) -> str | None:
    height, width = hw
    coords = [] if prompt.points is None else list(prompt.points)
    if prompt.box is not None:
        coords += [prompt.box[:2], prompt.box[2:]]
    for x, y in coords:
        if not (0 <= x <= width and 0 <= y <= height):
            return f"prompt point ({x:g}, {y:g}) outside the {width}x{height} image"
    return None


def load_sample(record: Record, prompt_mode: str = "given") -> Sample:
    """Read and check one record; raises ``SamReuseError`` saying what is wrong with it."""
    if not record.image.is_file():
        raise SamReuseError(f"{record.image}: image not found")
    hw, digest = _image_size_and_hash(record.image)
    if min(resized_shape(*hw)) < 1:
        raise SamReuseError(f"{record.image}: {hw[1]}x{hw[0]} pixels; a side shrinks to nothing when the longest "
                            "becomes 1024")
    mask = load_mask(record.mask)
    if mask.shape != hw:
        raise SamReuseError(f"{record.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {hw[1]}x{hw[0]}")
    if not mask.any():
        raise SamReuseError(f"{record.mask}: empty mask (no foreground by the mask rule)")
    prompt = choose_prompt(record, mask, prompt_mode)
    problem = _prompt_problem(prompt, hw)
    if problem:
        raise SamReuseError(f"{record.image}: {problem}")
    return Sample(record=record, mask=mask, prompt=prompt, image_sha256=digest)


def split_records(records: list[Record], search_images: int | None = None,
                  holdout_images: int | None = None) -> tuple[list[Record], list[Record]]:
    """(search, held-out) by position: the first ``search_images`` and the last ``holdout_images``.

    Defaults: the first half (rounded down) and everything after it.
    """
    total = len(records)
    for option, size in (("--search-images", search_images), ("--holdout-images", holdout_images)):
        if size is not None and size < 0:
            raise SamReuseError(f"{option} {size}: must not be negative")
        if size is not None and size > total:
            raise SamReuseError(f"{option} {size}: the data has {total} records")
    search = total // 2 if search_images is None else search_images
    held = total - search if holdout_images is None else holdout_images
    if search + held > total:
        raise SamReuseError(f"split asks for {search} search + {held} held-out records, the data has {total}")
    return records[:search], records[total - held:]


def _load_usable(records: list[Record], prompt_mode: str, skipped: dict[str, str]) -> list[Sample]:
    samples = []
    for record in records:
        try:
            samples.append(load_sample(record, prompt_mode))
        except SamReuseError as exc:
            skipped[record.key] = str(exc)
    return samples


def load_calibration(folder: str | Path, masks: str | Path | None = None, prompt: str = "given",
                     search_images: int | None = None, holdout_images: int | None = None,
                     min_images: int = DEFAULT_MIN_IMAGES) -> CalibrationSet:
    """Split a dataset folder and load every usable record; warns once about the unusable ones."""
    if prompt not in PROMPT_MODES:
        raise SamReuseError(f"unknown prompt mode '{prompt}' (choose from {', '.join(PROMPT_MODES)})")
    records = read_records(folder, masks)
    search_records, held_records = split_records(records, search_images, holdout_images)
    skipped: dict[str, str] = {}
    search = _load_usable(search_records, prompt, skipped)
    held_out = _load_usable(held_records, prompt, skipped)
    if skipped:
        listing = "\n".join(f"  {key}: {reason}" for key, reason in skipped.items())
        warnings.warn(SkippedRecordsWarning(f"{folder}: skipped {len(skipped)} unusable record(s):\n{listing}"),
                      stacklevel=2)
    for name, split, wanted in (("search", search, search_records), ("held-out", held_out, held_records)):
        if len(split) < min_images and (wanted or name == "search"):  # no held-out split at all is allowed
            raise SamReuseError(f"{folder}: only {len(split)} usable {name} record(s) of {len(wanted)} "
                                f"(at least {min_images} needed)")
    return CalibrationSet(search=search, held_out=held_out, skipped=skipped, source=str(folder), prompt_mode=prompt)
