"""Score reuse inside the encoder: cache what crosses a cut at the site, rerun only the rest.

A candidate map at an MLP-hidden site of block k changes nothing before that
site, so the encoder is cut there (``graphops.probe.cut``): the prefix runs
once per image and the tensors that cross the cut (the site and the block's
residual input) are cached on disk like embeddings are. Each candidate then
runs only the suffix, whose site input is gathered by a runtime index
(``with_index_input``; index value ``channels`` reads an all-zero channel),
and the decoder on the embedding it produces. The later the block, the
shorter the suffix: MobileSAM's last block leaves the MLP's second linear
layer, the neck and the decoder, about 2.5 decoder runs per candidate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from sam_reuse.base.contract import EMBEDDING
from sam_reuse.base.records import Sample
from sam_reuse.base.runtime import ort_session
from sam_reuse.calibrate.activations import encode_tensors
from sam_reuse.graphops.probe import cut, index_input_name, with_index_input
from sam_reuse.graphops.sites import Site


class SuffixEmbedder:
    """Image embeddings for any gather index at one encoder site, from cached prefix activations."""

    def __init__(self, encoder: onnx.ModelProto, site: Site, samples: Sequence[Sample],
                 cache_dir: str | None = None, progress: bool = True, desc: str = "encode"):
        _, suffix, self.frontier = cut(encoder, site.tensor)
        self.site = site
        self.channels = site.channels
        self._images = [sample.image_sha256 for sample in samples]  # rows of one image share its activations
        # The original embedding comes from the same encoder pass: it is the baseline the decoder sees.
        self.activations = encode_tensors(encoder, samples, self.frontier + [EMBEDDING], cache_dir,
                                          progress, desc)
        probe = with_index_input(suffix, site.tensor, site.axis, site.channels, zero_channel=True)
        self.session = ort_session(probe.SerializeToString())
        self._index_name = index_input_name(site.tensor)

    def original_embeddings(self) -> np.ndarray:
        """Embeddings of the unmodified encoder, stacked on axis 0."""
        return np.stack(self.activations[EMBEDDING])

    def site_activations(self) -> list[np.ndarray]:
        """The site tensor of each image (batch axis dropped), for salience."""
        return self.activations[self.site.tensor]

    def embeddings(self, index: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """Image embeddings of ``rows`` with the site gathered by ``index``, stacked on axis 0."""
        index = np.asarray(index, dtype=np.int64)
        computed: dict[str, np.ndarray] = {}
        for row in rows:  # one image per run: exported encoders have a fixed batch of 1
            if self._images[row] not in computed:  # several prompts of one image: run its suffix once
                feeds = {name: np.asarray(self.activations[name][row])[None] for name in self.frontier}
                feeds[self._index_name] = index
                computed[self._images[row]] = self.session.run([EMBEDDING], feeds)[0][0]
        return np.stack([computed[self._images[row]] for row in rows])
