"""Salient channels (seed: SCT): rank a site's channels by the L2 norm of their activations.

SCT keeps the channels with the largest activation norms over the task's
images as the ones worth tuning. Here the ranking restricts the pair space:
salient channels are candidate sources, the least salient candidate targets.
"""

from __future__ import annotations

import numpy as np


def channel_salience(activations: np.ndarray, axis: int) -> np.ndarray:
    """Per channel: the L2 norm over each image's positions, averaged over images.

    ``activations`` has one image per row of axis 0 (``encode``'s layout, the
    same as the model's batched tensor), ``axis`` is the channel axis as in
    the reuse map (1 for the embedding, -1 for token features).
    """
    norms = []
    for image in activations:  # one image at a time: the stack may be a large memory map
        channels_last = np.moveaxis(np.asarray(image, dtype=np.float64), axis - 1 if axis > 0 else axis, -1)
        norms.append(np.sqrt((channels_last.reshape(-1, channels_last.shape[-1]) ** 2).sum(axis=0)))
    return np.mean(norms, axis=0)


def salience_order(salience: np.ndarray) -> np.ndarray:
    """Channel indices from most to least salient; ties by channel index (deterministic)."""
    return np.lexsort((np.arange(len(salience)), -salience))
