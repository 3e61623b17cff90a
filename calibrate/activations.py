"""Encode each calibration image once: site activations cached on disk, memory-mapped.

The encoder is the expensive half of SAM (about ten decoder runs per image on
a CPU), and every candidate map reuses the same activations, so each image is
encoded once per model and kept as a ``.npy`` file. The key is the encoder's
graph fingerprint, the site tensor and the image file's sha256, so a cache is
shared across runs, output folders and datasets, and a changed model or
image can never be served a stale entry. Files are written atomically and
read with ``mmap_mode="r"``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from tqdm import tqdm

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import atomic_path, cache_root
from sam_reuse.base.imaging import SAM1, load_image_rgb, preprocess
from sam_reuse.base.records import Sample
from sam_reuse.base.runtime import model_convention, ort_session
from sam_reuse.graphops.graph import fingerprint
from sam_reuse.graphops.probe import expose

PREPROCESS_VERSION = "sam-1024-v1"  # bump when sam_reuse.base.imaging.preprocess changes


class CacheNotWrittenWarning(UserWarning):
    """The activation cache could not be written (full or read-only storage); the run goes on without it."""


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


class ActivationCache:
    """``root/<model fingerprint>/<tensor>-<preprocessing>/<image sha256>.npy`` (the preprocessing names a
    convention other than SAM's, whose folders keep the names they had before SAM 2)."""

    def __init__(self, model_fingerprint: str, tensor: str, root: str | Path | None = None, convention: str = SAM1):
        base = Path(root) if root is not None else cache_root() / "activations"
        preprocessing = PREPROCESS_VERSION + ("" if convention == SAM1 else f"-{convention}")
        self.folder = base / model_fingerprint[:24] / f"{_safe(tensor)}-{preprocessing}"
        self.failed = False  # a write the storage refused: no more tries

    def path(self, image_sha256: str) -> Path:
        return self.folder / f"{image_sha256}.npy"

    def get(self, image_sha256: str) -> np.ndarray | None:
        path = self.path(image_sha256)
        if not path.is_file():
            return None
        try:
            value = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            return None  # unreadable entry: recompute and overwrite it
        # A damaged entry that still loads (the encoder never writes NaN or inf: the export refuses such models).
        return value if value.dtype == np.float32 and np.isfinite(value).all() else None

    def put(self, image_sha256: str, value: np.ndarray) -> None:
        """Store an entry; where the storage refuses (full, read-only) the run goes on uncached, said once."""
        if self.failed:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path(image_sha256)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(value, dtype=np.float32))
        except (OSError, SamReuseError) as exc:
            self.failed = True
            warnings.warn(f"{self.folder}: the activation cache cannot be written ({exc}); going on without it, "
                          "every image is encoded again next time", CacheNotWrittenWarning, stacklevel=2)


def encode_tensors(encoder: str | Path | onnx.ModelProto, samples: Sequence[Sample], tensors: Sequence[str],
                   cache_dir: str | Path | None = None, progress: bool = True, desc: str = "encode"
                   ) -> dict[str, list[np.ndarray]]:
    """Activations of each of ``tensors`` for each sample (batch axis dropped), one encoder pass per image.

    Values stay per image (memory maps of the cache files): an MLP site of a
    late encoder block is about 20 MB per image, too much to stack for free.
    """
    model = encoder if isinstance(encoder, onnx.ModelProto) else onnx.load(str(encoder))
    outputs = [o.name for o in model.graph.output]
    model_fp, convention = fingerprint(model), model_convention(model)
    caches = {name: ActivationCache(model_fp, name, cache_dir, convention) for name in tensors}
    session = None
    values: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for sample in tqdm(samples, desc=desc, unit="img", disable=not progress, leave=False):
        found = {name: cache.get(sample.image_sha256) for name, cache in caches.items()}
        missing = [name for name, value in found.items() if value is None]
        if missing:
            if session is None:
                hidden = [name for name in tensors if name not in outputs]
                session = ort_session((expose(model, hidden) if hidden else model).SerializeToString())
            image = preprocess(load_image_rgb(sample.record.image), convention=convention)
            computed = session.run(missing, {session.get_inputs()[0].name: image})
            for name, value in zip(missing, computed):
                caches[name].put(sample.image_sha256, value[0])
                found[name] = value[0]
        for name in tensors:
            values[name].append(found[name])
    return values


def encode(encoder: str | Path | onnx.ModelProto, samples: Sequence[Sample], tensor: str = "image_embeddings",
           cache_dir: str | Path | None = None, progress: bool = True, desc: str = "encode") -> np.ndarray:
    """Activations of ``tensor`` for each sample, stacked on a new first axis (batch 1 each)."""
    values = encode_tensors(encoder, samples, [tensor], cache_dir, progress, desc)[tensor]
    return np.stack(values) if values else np.zeros((0,), dtype=np.float32)
