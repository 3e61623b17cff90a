"""Score any reuse at the embedding site on cached embeddings, batched, on ONNX Runtime.

The decoder is turned into a probe (``graphops.probe.with_index_input``, with
no mask prompt: ``without_mask_prompt``): a
Gather on its ``image_embeddings`` input whose indices are a runtime input,
so one session evaluates every candidate map and the identity index is the
unmodified model; index value ``channels`` reads an all-zero channel, so a
second session, made when an index first asks for it, scores channel
ablation (the zero channel is a copy of every embedding, which reuse alone
does not pay for). Any subset of the images can be
scored (the fast search races candidates on a few images first). Images
are batched (one map per batch); images whose prompts have different
lengths go in different batches, because padding a prompt would change
SAM's output.

Reuse inside the encoder is scored the same way, with the embeddings of
each candidate computed by a ``calibrate.suffix.SuffixEmbedder`` (the
encoder's suffix after the site) and fed to the decoder unchanged.

Each mask is scored the way ``SamPredictor.predict(multimask_output=False)``
is: mask token 0, low-resolution logits upscaled to the image's own size
(``sam_reuse.base.imaging.Upscaling``, only on the mask's border),
thresholded at 0, IoU against the ground truth. A SAM 2 decoder also
reads the encoder's high-resolution features (``features``, cached per image
like the embeddings and left alone by reuse at the embedding), and its prompts
and masks follow ``SAM2ImagePredictor`` (``convention``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from sam_reuse.base.contract import EMBEDDING, decoder_feeds, high_res_maps
from sam_reuse.base.imaging import (
    SAM1,
    MaskTarget,
    Upscaling,
    groups_by_point_count,
    prompt_arrays,
)
from sam_reuse.base.records import Sample
from sam_reuse.base.runtime import ort_session
from sam_reuse.graphops.probe import index_input_name, with_index_input, without_mask_prompt

DEFAULT_BATCH = 8


class Embedder(Protocol):
    """The encoder outputs the decoder reads (the embedding first, then the evaluator's ``features`` in order)
    for a gather index at a site before the embedding (``calibrate.suffix.SuffixEmbedder``)."""

    channels: int

    def outputs(self, index: np.ndarray, rows: Sequence[int]) -> dict[str, np.ndarray]: ...


class MaskEvaluator:
    """Per-image IoU of the decoder's single mask for a gather index at a site.

    The site is the image embedding (``embeddings`` cached, the index applied
    in the decoder) or, with ``embedder``, a tensor inside the encoder (the
    index applied there; ``embeddings`` are those of the unmodified model).
    """

    def __init__(self, decoder: str | Path | onnx.ModelProto, samples: Sequence[Sample], embeddings: np.ndarray,
                 batch_size: int = DEFAULT_BATCH, embedder: Embedder | None = None,
                 features: dict[str, Sequence[np.ndarray]] | None = None, convention: str = SAM1):
        if len(samples) != len(embeddings):
            raise ValueError(f"{len(samples)} samples but {len(embeddings)} embeddings")
        self.features = features or {}  # decoder input name -> one array per sample (SAM 2's high-res features)
        if any(len(values) != len(samples) for values in self.features.values()):
            raise ValueError("every feature needs one array per sample")
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        model = decoder if isinstance(decoder, onnx.ModelProto) else onnx.load(str(decoder))
        self.embedder = embedder
        self.embedding_channels = int(embeddings.shape[1])
        self.channels = embedder.channels if embedder is not None else self.embedding_channels
        self._decoder = without_mask_prompt(model)
        self._sessions: dict[bool, ort.InferenceSession] = {}  # with the zero channel or not -> its probe
        self._inputs = {i.name for i in self._session(zero_channel=False).get_inputs()}
        self.samples = list(samples)
        self.embeddings = embeddings
        self.convention = convention
        self.prompts = [prompt_arrays(s.prompt, s.hw, convention=convention) for s in self.samples]
        self.batch_size = batch_size
        self._batches: dict[tuple[int, ...], list[list[int]]] = {}
        self._upscaling: dict[tuple[int, int], Upscaling] = {}
        self._targets: dict[int, MaskTarget] = {}  # sample index -> its mask, counted per upscaling cell
        self.evaluations = 0  # decoder runs, one per image per evaluated index

    def with_decoder(self, decoder: onnx.ModelProto, samples: Sequence[Sample] | None = None,
                     at_site: bool = True) -> MaskEvaluator:
        """The same images and embeddings scored through another decoder (another mask token).

        ``samples``: other prompts on the same images, k per image in the order of this evaluator's rows (as
        ``calibrate.evidence.evidence_samples`` makes them); ``at_site=False``: at the embedding, whatever this
        evaluator's site (the unmodified model needs no encoder suffix).
        """
        copies = 1 if samples is None else len(samples) // len(self.samples)
        if samples is not None and (copies < 1 or len(samples) != copies * len(self.samples)):
            raise ValueError(f"{len(samples)} samples are not a whole number of prompts per image")
        if copies > 1 and at_site and self.embedder is not None:
            raise ValueError("more prompts per image are scored at the embedding only (at_site=False)")
        embeddings = self.embeddings if copies == 1 else np.repeat(self.embeddings, copies, axis=0)
        features = {name: [v for v in values for _ in range(copies)] for name, values in self.features.items()}
        return MaskEvaluator(decoder, self.samples if samples is None else samples, embeddings, self.batch_size,
                             self.embedder if at_site else None, features, self.convention)

    @property
    def zero(self) -> int:
        """The index value that reads an all-zero channel."""
        return self.channels

    def _session(self, zero_channel: bool) -> ort.InferenceSession:
        if zero_channel not in self._sessions:
            probe = with_index_input(self._decoder, EMBEDDING, axis=1, channels=self.embedding_channels,
                                     zero_channel=zero_channel)
            self._sessions[zero_channel] = ort_session(probe.SerializeToString())
        return self._sessions[zero_channel]

    def identity(self) -> np.ndarray:
        return np.arange(self.channels, dtype=np.int64)

    def _rows(self, rows: Sequence[int] | None) -> list[int]:
        return list(range(len(self.samples))) if rows is None else [int(r) for r in rows]

    def batches(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Batches (lists of sample indices) covering ``rows``, one prompt length per batch."""
        rows = self._rows(rows)
        key = tuple(rows)
        if key not in self._batches:
            local = groups_by_point_count([self.prompts[r] for r in rows], self.batch_size)
            self._batches[key] = [[rows[i] for i in batch] for batch in local]
        return self._batches[key]

    def low_res_logits(self, index: np.ndarray | None = None, rows: Sequence[int] | None = None
                       ) -> list[np.ndarray]:
        """256x256 mask logits for ``index`` (None: the unmodified model), one per row of ``rows`` (None: all)."""
        rows = self._rows(rows)
        logits = dict(self._decoded(index, rows))
        return [logits[r][0] for r in rows]

    def token_ious(self) -> np.ndarray:
        """IoU (float64) of every mask the decoder returns (columns: one per mask token, when it returns every
        token, ``graphops.mask_token.with_every_token``) on every row, for the unmodified model."""
        rows = self._rows(None)
        logits = dict(self._decoded(None, rows))
        return np.array([[self._upscaling_of(r).iou(token, self._target_of(r)) for token in logits[r]] for r in rows])

    def _decoded(self, index: np.ndarray | None, rows: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(row, its masks' logits: tokens x 256 x 256) for ``index`` on ``rows``, batch by batch."""
        index = self.identity() if index is None else np.asarray(index, dtype=np.int64)
        session = self._session(zero_channel=self.embedder is None and bool((index == self.zero).any()))
        for batch in self.batches(rows):
            if self.embedder is None:
                embeddings, decoder_index = self._embeddings_of(batch), index
                features = {name: np.stack([values[i] for i in batch]) for name, values in self.features.items()}
            else:
                embeddings, *values = self.embedder.outputs(index, batch).values()
                features = dict(zip(self.features, values))
                decoder_index = np.arange(self.embedding_channels, dtype=np.int64)
            feeds = decoder_feeds(embeddings, np.concatenate([self.prompts[i][0] for i in batch]),
                                  np.concatenate([self.prompts[i][1] for i in batch]),
                                  high_res=high_res_maps(features))
            feeds[index_input_name(EMBEDDING)] = decoder_index
            masks = session.run(["low_res_masks"], {k: v for k, v in feeds.items() if k in self._inputs})[0]
            self.evaluations += len(batch)
            yield from zip(batch, masks)

    def _embeddings_of(self, batch: list[int]) -> np.ndarray:
        """The batch's cached embeddings: a view when its rows are consecutive (batches usually are), so the
        decoder reads them without a copy of 4 MB per image."""
        first, last = batch[0], batch[-1]
        rows = slice(first, last + 1) if batch == list(range(first, last + 1)) else batch
        return np.ascontiguousarray(self.embeddings[rows])

    def _upscaling_of(self, sample_index: int) -> Upscaling:
        hw = self.samples[sample_index].hw
        if hw not in self._upscaling:
            self._upscaling[hw] = Upscaling(hw, convention=self.convention)
        return self._upscaling[hw]

    def _target_of(self, sample_index: int) -> MaskTarget:
        if sample_index not in self._targets:
            self._targets[sample_index] = self._upscaling_of(sample_index).target(self.samples[sample_index].mask)
        return self._targets[sample_index]

    def predicted_mask(self, logits: np.ndarray, sample_index: int) -> np.ndarray:
        """Binary mask at the image's resolution, as SamPredictor would return it."""
        return self._upscaling_of(sample_index).mask(logits)

    def ious_of(self, logits: list[np.ndarray], rows: Sequence[int] | None = None) -> np.ndarray:
        """IoU (float64) of ``low_res_logits(index, rows)`` output, one per row."""
        return np.array([self._upscaling_of(r).iou(l, self._target_of(r)) for l, r in zip(logits, self._rows(rows))])

    def ious(self, index: np.ndarray | None = None, rows: Sequence[int] | None = None) -> np.ndarray:
        """IoU (float64) for ``index`` on ``rows`` (None: every sample)."""
        return self.ious_of(self.low_res_logits(index, rows), rows)
