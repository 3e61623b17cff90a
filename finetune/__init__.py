"""The parameter-efficient fine-tuning (PEFT) stage: adapters, training, import, merged export.

Four methods, on both encoder families (SAM ViT and MobileSAM TinyViT):

* ``lora``: low-rank deltas on the attention ``qkv``/``proj`` linears;
* ``sct``: salient channel tuning, a small map on each block's most salient
  output channels, added as a residual;
* ``sfa``: selective feature adapter, sparse weight deltas found by a
  lottery-ticket procedure (internal) plus bottleneck MLPs (external);
* ``cobot``: cross-block orchestration of LoRA-style factors through a
  block-by-block relation matrix and a quaternion projection per block.

Every adapter that is linear in a base weight is merged into that weight
before export (``methods.merge_adapters``), so the engine costs nothing extra;
the others stay as small graph pieces. torch is needed here, as for export.
"""
