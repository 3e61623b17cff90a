"""torch modules that define exactly what the SAM 2 ONNX graphs compute (the image path of SAM2ImagePredictor).

``Sam2ImageEncoder`` is ``set_image`` after preprocessing: Hiera, the FPN
neck (its 32x32 level dropped), ``no_mem_embed`` added to the 64x64 embedding,
and the decoder's ``conv_s0``/``conv_s1`` applied to the two finer levels, so
that the decoder gets ``image_embeddings`` and the two ``high_res_feats`` as
``SAM2ImagePredictor`` keeps them. ``Sam2SingleMaskDecoder`` is
``predict(multimask_output=False)`` without its control flow: the prompt
encoder, the mask decoder, and the choice SAM 2 makes for a single mask (mask
token 0 when it is stable, else the multimask token with the best predicted
IoU), pairing embedding b with prompt b like SAM's ``SingleMaskDecoder``.
``Sam2PromptsDecoder`` is the app decoder: one image, K prompts per call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sam_reuse.exporter.wrappers import PromptEmbedding, two_way_transformer


class Sam2ImageEncoder(nn.Module):
    def __init__(self, sam2, image_size: int = 1024) -> None:
        super().__init__()
        self.image_encoder = sam2.image_encoder
        self.conv_s0 = sam2.sam_mask_decoder.conv_s0
        self.conv_s1 = sam2.sam_mask_decoder.conv_s1
        self.no_mem_embed = sam2.no_mem_embed
        trunk = self.image_encoder.trunk
        # Python ints: Hiera takes the position embedding's size from traced shapes, which exports as a
        # shape-driven bicubic Resize and a Tile with If nodes; at a fixed 1024 input the sizes are known.
        self.grid = image_size // trunk.patch_embed.proj.stride[0]
        self.repeats = self.grid // trunk.window_spec[0]

    def _position_embedding(self) -> torch.Tensor:
        """``Hiera._get_pos_embed`` at the fixed grid: the same ops on constants, folded by ONNX Runtime."""
        trunk = self.image_encoder.trunk
        grid = F.interpolate(trunk.pos_embed, size=(self.grid, self.grid), mode="bicubic")
        return (grid + trunk.pos_embed_window.repeat(1, 1, self.repeats, self.repeats)).permute(0, 2, 3, 1)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Hiera's patch embedding plus its position embedding: the input of the first block (BxHxWxC)."""
        return self.image_encoder.trunk.patch_embed(image) + self._position_embedding()

    def features(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The outputs from Hiera's four stage outputs (BxCxHxW): neck, ``no_mem_embed`` and ``conv_s0/s1``."""
        features, _ = self.image_encoder.neck(levels)  # the sine position encodings feed video only
        finest, finer, embedding = features[: -self.image_encoder.scalp]
        return embedding + self.no_mem_embed.reshape(1, -1, 1, 1), self.conv_s0(finest), self.conv_s1(finer)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        trunk = self.image_encoder.trunk
        x = self.embed(image)
        levels = []
        for index, block in enumerate(trunk.blocks):
            x = block(x)
            if index in trunk.stage_ends:
                levels.append(x.permute(0, 3, 1, 2))
        return self.features(levels)


class Sam2SingleMaskDecoder(PromptEmbedding):
    """Coordinates are in the 1024x1024 stretched frame; the caller appends the padding point (0, 0, -1), which
    SAM 2 always has (``sam_reuse.base.imaging.prompt_arrays`` with convention ``sam2``)."""

    def __init__(self, sam2) -> None:
        super().__init__()
        self.prompt_encoder = sam2.sam_prompt_encoder
        self.mask_decoder = sam2.sam_mask_decoder
        self.image_size = float(sam2.image_size)
        self.embedding_hw = tuple(sam2.sam_prompt_encoder.image_embedding_size)
        self.channels = sam2.sam_prompt_embed_dim
        decoder = self.mask_decoder
        self.stability_delta = float(decoder.dynamic_multimask_stability_delta)
        self.stability_threshold = float(decoder.dynamic_multimask_stability_thresh)
        self.by_stability = bool(decoder.dynamic_multimask_via_stability)

    def all_masks(self, image_embeddings: torch.Tensor, high_res_feats_0: torch.Tensor,
                  high_res_feats_1: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                  mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder.predict_masks``: the logits of all 4 mask tokens (Bx4x256x256) and their IoUs (Bx4)."""
        decoder = self.mask_decoder
        batch = image_embeddings.shape[0]
        sparse = self._embed_points(point_coords, point_labels)
        # tokens: object score, IoU, the 4 mask tokens, then the prompt
        output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight,
                                   decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        source = image_embeddings + self._embed_masks(mask_input, has_mask_input)
        position = self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
        height, width = self.embedding_hw
        # SAM 2's TwoWayTransformer is SAM's, in the reassociated order SAM's export uses (exporter/wrappers.py)
        hidden, source = two_way_transformer(decoder.transformer, source.flatten(2).transpose(1, 2), position, tokens)
        mask_tokens = hidden[:, 2:2 + decoder.num_mask_tokens, :]
        source = source.transpose(1, 2).reshape(batch, self.channels, height, width)
        up1, norm1, act1, up2, act2 = decoder.output_upscaling
        upscaled = act2(up2(act1(norm1(up1(source) + high_res_feats_1))) + high_res_feats_0)
        hyper = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens[:, i, :])
                             for i in range(decoder.num_mask_tokens)], dim=1)
        masks = (hyper @ upscaled.flatten(2)).reshape(batch, decoder.num_mask_tokens, 4 * height, 4 * width)
        return masks, decoder.iou_prediction_head(hidden[:, 1, :])

    def forward(self, image_embeddings: torch.Tensor, high_res_feats_0: torch.Tensor,
                high_res_feats_1: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.single_mask(*self.all_masks(image_embeddings, high_res_feats_0, high_res_feats_1, point_coords,
                                                point_labels, mask_input, has_mask_input))

    def single_mask(self, masks: torch.Tensor, ious: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's single mask from all four (Bx1x256x256 and its IoU, Bx1)."""
        single, single_iou = masks[:, 0:1], ious[:, 0:1]
        if not self.by_stability:
            return single, single_iou
        # MaskDecoder._dynamic_multimask_via_stability without control flow. Stability = area above +delta over
        # area above -delta, as means rather than pixel counts (the same ratio; 65,536 overflows fp16).
        best = torch.argmax(ious[:, 1:], dim=1, keepdim=True)
        best_mask = torch.gather(masks[:, 1:], 1, best[:, :, None, None].expand(-1, -1, *single.shape[-2:]))
        best_iou = torch.gather(ious[:, 1:], 1, best)
        inner = (single > self.stability_delta).float().mean(dim=(-2, -1))
        outer = (single > -self.stability_delta).float().mean(dim=(-2, -1))
        stability = torch.where(outer > 0, inner / outer.clamp(min=1e-12), torch.ones_like(outer))
        stable = stability >= self.stability_threshold
        return torch.where(stable[:, :, None, None], single, best_mask), torch.where(stable, single_iou, best_iou)


class Sam2PromptsDecoder(Sam2SingleMaskDecoder):
    """The decoder for apps on SAM 2: one image's three encoder outputs (batch 1) and K prompts -> K results.

    ``multimask``: the three masks of mask tokens 1-3 and their IoUs per prompt, what
    ``SAM2ImagePredictor.predict(multimask_output=True)`` returns; otherwise SAM 2's single mask (the
    stability choice included).
    """

    def __init__(self, sam2, multimask: bool = False) -> None:
        super().__init__(sam2)
        self.multimask = multimask

    def forward(self, image_embeddings: torch.Tensor, high_res_feats_0: torch.Tensor,
                high_res_feats_1: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = point_coords.shape[0]
        shared = [feature.expand(count, -1, -1, -1) for feature in (image_embeddings, high_res_feats_0,
                                                                      high_res_feats_1)]
        masks, ious = self.all_masks(*shared, point_coords, point_labels, mask_input, has_mask_input)
        return (masks[:, 1:], ious[:, 1:]) if self.multimask else self.single_mask(masks, ious)
