"""torch modules that define exactly what the ONNX graphs compute.

``ImageEncoder`` is the encoder as SAM runs it (preprocessed 1024x1024 input,
256x64x64 embedding). ``SingleMaskDecoder`` is the prompt encoder plus mask
decoder with the control flow removed, pairing each image embedding with one
prompt (batch b of the embeddings goes with batch b of the prompts, so a
search can decode many images at once) and returning only mask token 0, the
mask ``SamPredictor.predict(multimask_output=False)`` returns. It has no
``orig_im_size`` input and no OneHot: upscaling lives in
``sam_reuse.base.imaging.upscale_logits``. ``PromptsDecoder`` is the decoder
for apps: one embedding, K prompts, single mask or SAM's multimask output.
``FirstOrderScorer`` is the search's gradient pass (the first-order effect of
every channel reuse at once).
"""

from __future__ import annotations

import torch
from torch import nn


class ImageEncoder(nn.Module):
    def __init__(self, sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        for module in self.image_encoder.modules():
            if type(module).__name__ == "PatchMerging":
                module.register_forward_pre_hook(_tokens_to_grid)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


def _tokens_to_grid(module: nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """Give TinyViT's PatchMerging a BxCxHxW input so it skips its own reshape.

    That reshape takes the batch size from ``len(x)``, which tracing freezes
    to the example's batch of 1; this one keeps it symbolic. Same values.
    """
    (x,) = inputs
    if x.ndim != 3:
        return inputs
    height, width = module.input_resolution
    return (x.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2),)


class PromptEmbedding(nn.Module):
    """The prompt encoder's point and mask embeddings written without boolean indexing or control flow (shared by
    SAM's and SAM 2's decoders; subclasses set ``prompt_encoder`` and ``image_size``)."""

    prompt_encoder: nn.Module
    image_size: float

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        embedding = pe.pe_layer._pe_encoding((coords + 0.5) / self.image_size)
        labels = labels.unsqueeze(-1)
        embedding = embedding * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i, point_embedding in enumerate(pe.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == i)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask * self.prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask) * no_mask


class SingleMaskDecoder(PromptEmbedding):
    def __init__(self, sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_size = float(sam.image_encoder.img_size)
        # Python ints, not traced shapes: the exported graph gets static sizes.
        self.embedding_hw = tuple(sam.prompt_encoder.image_embedding_size)
        self.channels = sam.prompt_encoder.embed_dim

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode(image_embeddings, point_coords, point_labels, mask_input, has_mask_input, slice(0, 1))

    def _decode(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, outputs: slice
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and predicted IoUs of the mask tokens ``outputs`` (0: single mask; 1-3: SAM's multimask)."""
        decoder = self.mask_decoder
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        batch = image_embeddings.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        src = image_embeddings + dense
        pos_src = self.prompt_encoder.get_dense_pe().expand(batch, -1, -1, -1)
        height, width = self.embedding_hw

        hs, src = decoder.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 + outputs.start:1 + outputs.stop, :]

        src = src.transpose(1, 2).reshape(batch, self.channels, height, width)
        upscaled = self._upscale(src)
        hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, j, :])
                                for j, i in enumerate(range(outputs.start, outputs.stop))], dim=1)
        count = outputs.stop - outputs.start
        masks = (hyper_in @ upscaled.flatten(2)).reshape(batch, count, 4 * height, 4 * width)
        iou_pred = decoder.iou_prediction_head(iou_token_out)[:, outputs]
        return masks, iou_pred


    def _upscale(self, src: torch.Tensor) -> torch.Tensor:
        """The decoder's output upscaling: two stride-2 transposed convolutions, 64x64 -> 256x256."""
        return self.mask_decoder.output_upscaling(src)


class PromptsDecoder(SingleMaskDecoder):
    """The decoder for apps: one image embedding (1x256x64x64) and K prompts -> K masks in one call.

    Prompt k is ``point_coords[k]`` / ``point_labels[k]`` (labels as SAM's: 1 foreground, 0 background, -1
    padding, 2 and 3 a box's corners) with ``mask_input[k]``. ``multimask``: SAM's three masks and their
    predicted IoUs per prompt (mask tokens 1-3, what ``SamPredictor.predict(multimask_output=True)``
    returns); otherwise the single mask (token 0).
    """

    def __init__(self, sam, multimask: bool = False) -> None:
        super().__init__(sam)
        self.outputs = slice(1, 4) if multimask else slice(0, 1)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = image_embeddings.expand(point_coords.shape[0], -1, -1, -1)
        return self._decode(shared, point_coords, point_labels, mask_input, has_mask_input, self.outputs)


def _stride_two_transposed(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution as one einsum: every input pixel writes its own 2x2 block."""
    batch, _, height, width = x.shape
    blocks = torch.einsum("bchw,codk->bohdwk", x, conv.weight)
    return blocks.reshape(batch, conv.weight.shape[1], 2 * height, 2 * width) + conv.bias.reshape(1, -1, 1, 1)


class FirstOrderScorer(SingleMaskDecoder):
    """What the first-order search needs from one search prompt, in one forward and one backward pass.

    Inputs: one embedding X (1x256x64x64), one prompt (1xNx2, 1xN), and the ground truth in the
    low-resolution frame: ``target`` (1x256x256, the share of each low-res pixel inside the object, 0 on the
    padding) and ``valid`` (1 where the pixel lies on the image). Outputs ``soft_iou`` (the sigmoid of the
    single mask's logits against ``target``) and ``channel_products`` M = G X^T (1x256x256), G = d soft_iou /
    d X: to first order, replacing channel t by channel s changes soft_iou by M[t, s] - M[t, t], and zeroing
    channel t by -M[t, t] (``calibrate.first_order``).

    Output upscaling's transposed convolutions are written as einsums (the same values): the ONNX exporter
    has no gradient of ConvTranspose.
    """

    def _upscale(self, src: torch.Tensor) -> torch.Tensor:
        first, norm, activation, second, last_activation = self.mask_decoder.output_upscaling
        return last_activation(_stride_two_transposed(second, activation(norm(_stride_two_transposed(first, src)))))

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = image_embeddings.detach().requires_grad_(True)
        no_mask = torch.zeros(1, 1, *target.shape[-2:]), torch.zeros(1)
        with torch.enable_grad():
            masks, _ = self._decode(embedding, point_coords, point_labels, *no_mask, slice(0, 1))
            probability = torch.sigmoid(masks[:, 0]) * valid
            overlap = (probability * target).sum()
            soft_iou = overlap / (probability.sum() + target.sum() - overlap)
            (gradient,) = torch.autograd.grad(soft_iou, embedding)
        flat = image_embeddings.reshape(1, self.channels, -1)
        products = gradient.reshape(1, self.channels, -1) @ flat.transpose(1, 2)
        return products, soft_iou.reshape(1)


def example_decoder_inputs(batch: int = 1, num_points: int = 2) -> tuple[torch.Tensor, ...]:
    """Dummy inputs with the decoder's shapes, used for tracing."""
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 256, 64, 64, generator=generator),
        torch.randint(0, 1024, (batch, num_points, 2), generator=generator).float(),
        torch.ones(batch, num_points),
        torch.zeros(batch, 1, 256, 256),
        torch.zeros(batch),
    )
