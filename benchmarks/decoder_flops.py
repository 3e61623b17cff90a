"""FLOPs of one decoder run and of one first-order scorer call (forward, backward and M = G X^T), MobileSAM.

Usage:
    python benchmarks/decoder_flops.py

Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the modules the export traces
(``exporter.wrappers.SingleMaskDecoder`` and ``FirstOrderScorer``, real MobileSAM weights from
``export-and-tune fetch-weights``), one prompt of a point and SAM's padding point. The ratio turns the
search's scorer calls into decoder-run equivalents (issue 21 counts a backward pass by its FLOPs). Prints
the two counts and their ratio.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.weights import cached_weight_path
from sam_reuse.exporter.wrappers import FirstOrderScorer, SingleMaskDecoder


def main() -> None:
    sam = build_sam("vit_t", cached_weight_path("mobilesam"))
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    coords, labels = torch.tensor([[[500.0, 400.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]])
    target = (torch.rand(1, 256, 256, generator=generator) > 0.5).float()
    decoder, scorer = SingleMaskDecoder(sam).eval(), FirstOrderScorer(sam).eval()
    for parameter in scorer.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as decoder_count:
        decoder(embedding, coords, labels, torch.zeros(1, 1, 256, 256), torch.zeros(1))
    with FlopCounterMode(display=False) as scorer_count:
        scorer(embedding, coords, labels, target, torch.ones(1, 256, 256))
    run, call = decoder_count.get_total_flops(), scorer_count.get_total_flops()
    print(f"decoder run: {run / 1e9:.3f} GFLOP; first-order scorer call: {call / 1e9:.3f} GFLOP "
          f"= {call / run:.2f} decoder runs")


if __name__ == "__main__":
    main()
