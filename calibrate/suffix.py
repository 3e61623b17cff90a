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

A SAM 2 encoder also hands the decoder its high-resolution features
(``features``): the suffix computes them too when the site lies before them,
and passes the cached ones through when it does not.
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
                 cache_dir: str | None = None, progress: bool = True, desc: str = "encode",
                 features: Sequence[str] = ()):
        _, suffix, self.frontier = cut(encoder, site.tensor)
        self.site = site
        self.channels = site.channels
        self.outputs_read = [EMBEDDING, *features]  # what the decoder reads from the encoder
        self._images = [sample.image_sha256 for sample in samples]  # rows of one image share its activations
        # The original outputs come from the same encoder pass: they are the baseline the decoder sees.
        tensors = list(dict.fromkeys(self.frontier + self.outputs_read))
        self.activations = encode_tensors(encoder, samples, tensors, cache_dir, progress, desc)
        probe = with_index_input(suffix, site.tensor, site.axis, site.channels, zero_channel=True)
        self.session = ort_session(probe.SerializeToString())
        self._index_name = index_input_name(site.tensor)

    def original_embeddings(self) -> np.ndarray:
        """Embeddings of the unmodified encoder, stacked on axis 0."""
        return np.stack(self.activations[EMBEDDING])

    def original_features(self) -> dict[str, list[np.ndarray]]:
        """The unmodified encoder's other outputs the decoder reads, one array per row."""
        return {name: self.activations[name] for name in self.outputs_read[1:]}

    def site_activations(self) -> list[np.ndarray]:
        """The site tensor of each image (batch axis dropped), for salience."""
        return self.activations[self.site.tensor]

    def embeddings(self, index: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """Image embeddings of ``rows`` with the site gathered by ``index``, stacked on axis 0."""
        return self.outputs(index, rows)[EMBEDDING]

    def outputs(self, index: np.ndarray, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """What the decoder reads (the embedding, and SAM 2's features) for ``rows`` with the site gathered by
        ``index``, each stacked on axis 0."""
        index = np.asarray(index, dtype=np.int64)
        computed: dict[str, list[np.ndarray]] = {}
        for row in rows:  # one image per run: exported encoders have a fixed batch of 1
            if self._images[row] not in computed:  # several prompts of one image: run its suffix once
                feeds = {name: np.asarray(self.activations[name][row])[None] for name in self.frontier}
                feeds[self._index_name] = index
                computed[self._images[row]] = [v[0] for v in self.session.run(self.outputs_read, feeds)]
        return {name: np.stack([computed[self._images[row]][k] for row in rows])
                for k, name in enumerate(self.outputs_read)}
