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

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from tqdm import tqdm

from calibrate.data import Sample
from exporter.files import atomic_path, cache_root
from exporter.imaging import load_image_rgb, preprocess
from exporter.runtime import ort_session
from graphops.graph import fingerprint
from graphops.probe import expose

PREPROCESS_VERSION = "sam-1024-v1"  # bump when exporter.imaging.preprocess changes


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


class ActivationCache:
    """``root/<model fingerprint>/<tensor>/<image sha256>.npy``."""

    def __init__(self, model_fingerprint: str, tensor: str, root: str | Path | None = None):
        base = Path(root) if root is not None else cache_root() / "activations"
        self.folder = base / model_fingerprint[:24] / f"{_safe(tensor)}-{PREPROCESS_VERSION}"

    def path(self, image_sha256: str) -> Path:
        return self.folder / f"{image_sha256}.npy"

    def get(self, image_sha256: str) -> np.ndarray | None:
        path = self.path(image_sha256)
        if not path.is_file():
            return None
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            return None  # unreadable entry: recompute and overwrite it

    def put(self, image_sha256: str, value: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(image_sha256)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(value, dtype=np.float32))


def encode(encoder: str | Path | onnx.ModelProto, samples: Sequence[Sample], tensor: str = "image_embeddings",
           cache_dir: str | Path | None = None, progress: bool = True, desc: str = "encode") -> np.ndarray:
    """Activations of ``tensor`` for each sample, stacked on a new first axis (batch 1 each)."""
    model = encoder if isinstance(encoder, onnx.ModelProto) else onnx.load(str(encoder))
    outputs = [o.name for o in model.graph.output]
    cache = ActivationCache(fingerprint(model), tensor, cache_dir)
    session = None
    values = []
    for sample in tqdm(samples, desc=desc, unit="img", disable=not progress, leave=False):
        value = cache.get(sample.image_sha256)
        if value is None:
            if session is None:
                session = ort_session((model if tensor in outputs else expose(model, [tensor])).SerializeToString())
            image = preprocess(load_image_rgb(sample.record.image))
            value = session.run([tensor], {session.get_inputs()[0].name: image})[0][0]
            cache.put(sample.image_sha256, value)
        values.append(value)
    return np.stack(values) if values else np.zeros((0,), dtype=np.float32)
