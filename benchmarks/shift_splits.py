"""Splits of a 100-record set whose search and held-out halves come from different parts of the domain.

A user calibrates on the images they have and deploys on the next ones,
which are rarely drawn from the same pool. The shared sets carry no
sub-category labels, so the shift is made from the images themselves: each
image's embedding (MobileSAM's image encoder, averaged over the 64 x 64
grid) is projected on the first principal component of the set's
embeddings, and the set is cut at the median. ``pc1-low`` searches on the
50 images below the median and holds out the 50 above it; ``pc1-high`` the
other way round. Along that axis the two halves differ most in what the
encoder sees (lesion colour and size, scene type, lighting).

Also: ``fixed`` (first 50 manifest records / last 50, the data README's
split) and ``random-<seed>`` (a seeded random 50 / 50 cut).

Each split is written as a folder holding only ``manifest.jsonl``, whose
records point at the original files by absolute path: search records
first, held-out records after, each half in manifest order, so ``tune
--search-images 50 --holdout-images 50`` reads it as intended.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from sam_reuse.base.files import atomic_path
from sam_reuse.calibrate.activations import encode
from sam_reuse.calibrate.data import MANIFEST, load_calibration, read_records

SHIFT_SPLITS = ("pc1-low", "pc1-high")


def pooled_embeddings(encoder: Path, folder: Path, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """The mean image embedding (one value per channel) of every usable record, by record key."""
    everything = load_calibration(folder, search_images=len(read_records(folder)), holdout_images=0).search
    embeddings = encode(encoder, everything, cache_dir=cache_dir, progress=False)
    pooled = embeddings.reshape(len(everything), embeddings.shape[1], -1).mean(axis=2)
    return {sample.key: row for sample, row in zip(everything, pooled)}


def first_component_scores(features: np.ndarray) -> np.ndarray:
    """Scores on the first principal component of standardised features, signed so the result is unique."""
    centred = features - features.mean(axis=0)
    centred = centred / np.maximum(centred.std(axis=0), 1e-12)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    direction = components[0]
    direction = direction * np.sign(direction[np.argmax(np.abs(direction))])
    return centred @ direction


def split_order(split: str, keys: list[str], features: np.ndarray | None) -> tuple[list[int], list[int]]:
    """(search rows, held-out rows) of ``split``, each in manifest order."""
    rows = np.arange(len(keys))
    half = len(keys) // 2
    if split == "fixed":
        return list(rows[:half]), list(rows[half:2 * half])
    random_seed = re.fullmatch(r"random-(\d+)", split)
    if random_seed:
        chosen = np.random.default_rng(int(random_seed.group(1))).permutation(rows)
        return sorted(chosen[:half].tolist()), sorted(chosen[half:2 * half].tolist())
    if split in SHIFT_SPLITS:
        if features is None:
            raise ValueError(f"split '{split}' needs the records' embeddings")
        order = np.lexsort((rows, first_component_scores(features)))  # ties by manifest position
        low, high = sorted(order[:half].tolist()), sorted(order[half:2 * half].tolist())
        return (low, high) if split == "pc1-low" else (high, low)
    raise ValueError(f"unknown split '{split}' (fixed, random-<seed>, {', '.join(SHIFT_SPLITS)})")


def write_split(source: Path, split: str, folder: Path, features: dict[str, np.ndarray] | None = None
                ) -> tuple[int, int]:
    """Write ``folder/manifest.jsonl`` for ``split`` of ``source``; returns (search, held-out) sizes.

    ``features`` (by record key, every record) are needed by the shift splits only.
    """
    lines = [line for line in (source / MANIFEST).read_text().splitlines() if line.strip()]
    entries = []
    for line in lines:
        entry = json.loads(line)
        entry.setdefault("id", Path(entry["image"]).stem)
        entry["image"], entry["mask"] = str((source / entry["image"]).resolve()), str((source / entry["mask"]).resolve())
        entries.append(entry)
    keys = [e["id"] for e in entries]
    if features is not None and set(keys) - set(features):
        raise ValueError(f"{source}: no features for records {sorted(set(keys) - set(features))[:5]}")
    matrix = None if features is None else np.stack([features[k] for k in keys])
    search, held_out = split_order(split, keys, matrix)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / MANIFEST) as path:
        path.write_text("".join(json.dumps(entries[i]) + "\n" for i in search + held_out))
    return len(search), len(held_out)
