"""Simulated shift: score every candidate on altered copies of each search image as well as the image itself.

Users calibrate on the images they have and deploy on the images that come
next: other cameras, other light, other orientations. A pair that helps only
the search images as they are (one colour cast, one sharpness) fits them and
not the domain. With ``augment=k`` each search image is also scored on the
first ``k`` of the fixed alterations below, and its figure in the search is
the mean over the image and its copies, so a pair must help under a colour
cast, lower contrast, blur and a mirror image too. Held-out images are never
altered: they judge what ships.

The alterations are fixed (no random draw), so a search is reproducible and
the altered images' encodings are cached like any other. Each altered image
is written once as a PNG under the cache folder, named by the source image's
sha256 and the alteration, and encoded from there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from sam_reuse.base.files import atomic_path, cache_root, sha256_file
from sam_reuse.base.imaging import load_image_rgb
from sam_reuse.base.records import Prompt, Sample

AUGMENT_VERSION = "v1"  # bump when an alteration changes: altered images are cached under it


def _tint(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return image * np.asarray(gains, dtype=np.float32)


def _mirror_flat_warm(image: np.ndarray) -> np.ndarray:
    """Mirrored left-right, contrast lowered by a quarter around the image mean, a warm cast."""
    image = image[:, ::-1]
    flat = image.mean() + 0.75 * (image - image.mean())
    return _tint(flat, (1.08, 1.0, 0.92))


def _blur_dark_cool(image: np.ndarray) -> np.ndarray:
    """Blurred (sigma: 1/512 of the long side), midtones darkened (gamma 1.25), a cool cast."""
    radius = max(image.shape[:2]) / 512
    blurred = np.asarray(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    darker = 255.0 * (blurred / 255.0) ** 1.25
    return _tint(darker, (0.92, 1.0, 1.08))


# name -> (pixels -> pixels, mirrored?); applied in this order, the first ``augment`` of them.
ALTERATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], bool]] = {
    "mirror-flat-warm": (_mirror_flat_warm, True),
    "blur-dark-cool": (_blur_dark_cool, False),
}


def _mirrored_prompt(prompt: Prompt, width: int) -> Prompt:
    """The prompt of the left-right mirror image (pixel centres: x -> width - 1 - x)."""
    points = None if prompt.points is None else np.column_stack([width - 1 - prompt.points[:, 0],
                                                                 prompt.points[:, 1]]).astype(np.float32)
    box = None
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        box = np.array([width - 1 - x1, y0, width - 1 - x0, y1], dtype=np.float32)
    return Prompt(points=points, labels=prompt.labels, box=box)


def _altered(sample: Sample, name: str, folder: Path) -> Sample:
    alter, mirrored = ALTERATIONS[name]
    path = folder / f"{sample.image_sha256}-{name}.png"
    if not path.is_file():
        pixels = alter(load_image_rgb(sample.record.image).astype(np.float32))
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(tmp, format="PNG")
    width = sample.hw[1]
    return replace(sample, record=replace(sample.record, key=f"{sample.key}~{name}", image=path),
                   mask=sample.mask[:, ::-1].copy() if mirrored else sample.mask,
                   prompt=_mirrored_prompt(sample.prompt, width) if mirrored else sample.prompt,
                   image_sha256=sha256_file(path))


def with_altered_copies(samples: Sequence[Sample], augment: int, cache_dir: str | Path | None = None
                        ) -> list[Sample]:
    """Each sample followed by its first ``augment`` altered copies, in order (``augment=0``: the samples)."""
    if not 0 <= augment <= len(ALTERATIONS):
        raise ValueError(f"augment must be between 0 and {len(ALTERATIONS)}, not {augment}")
    folder = (Path(cache_dir) if cache_dir is not None else cache_root()) / "altered" / AUGMENT_VERSION
    names = list(ALTERATIONS)[:augment]
    return [copy for sample in samples for copy in (sample, *(_altered(sample, n, folder) for n in names))]
