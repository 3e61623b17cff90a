"""torch modules that define exactly what the ONNX graphs compute.

``ImageEncoder`` is the encoder as SAM runs it (preprocessed 1024x1024 input,
256x64x64 embedding). ``SingleMaskDecoder`` is the prompt encoder plus mask
decoder with the control flow removed, pairing each image embedding with one
prompt (batch b of the embeddings goes with batch b of the prompts, so a
search can decode many images at once) and returning only mask token 0, the
mask ``SamPredictor.predict(multimask_output=False)`` returns. It has no
``orig_im_size`` input and no OneHot: upscaling lives in
``sam_reuse.base.imaging.upscale_logits``. Its attention and output upscaling
compute SAM's values in a cheaper order (``two_way_transformer``). ``PromptsDecoder`` is the decoder
for apps: one embedding, K prompts, single mask or SAM's multimask output.
``FirstOrderScorer`` is the search's gradient pass (the first-order effect of
every channel reuse at once).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


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
        image_pe = self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
        queries, keys = two_way_transformer(decoder.transformer, src.flatten(2).transpose(1, 2), image_pe, tokens)
        iou_token_out = queries[:, 0, :]
        # Every token's hypernetwork output (a few hundred thousand multiply-adds each), then ``outputs``: the
        # token is a Slice of the graph that a rewrite can move (graphops.mask_token), not a choice baked in.
        hyper_in = torch.stack([mlp(queries[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=1)[:, outputs]
        masks = _upscaled_masks(decoder.output_upscaling, keys, hyper_in, self.embedding_hw)
        iou_pred = decoder.iou_prediction_head(iou_token_out)[:, outputs]
        return masks, iou_pred


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


class FirstOrderScorer(SingleMaskDecoder):
    """What the first-order search needs from one search prompt, in one forward and one backward pass.

    Inputs: one embedding X (1x256x64x64), one prompt (1xNx2, 1xN), and the ground truth in the
    low-resolution frame: ``target`` (1x256x256, the share of each low-res pixel inside the object, 0 on the
    padding) and ``valid`` (1 where the pixel lies on the image). Outputs ``soft_iou`` (the sigmoid of the
    single mask's logits against ``target``) and ``channel_products`` M = G X^T (1x256x256), G = d soft_iou /
    d X: to first order, replacing channel t by channel s changes soft_iou by M[t, s] - M[t, t], and zeroing
    channel t by -M[t, t] (``calibrate.first_order``).
    """

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


# The decoder's 4096 image tokens dominate its cost. SAM's attention projects all of them (k, v or q, out
# projections of 256 x 128) to meet a handful of prompt tokens; reassociating the products lets them meet small
# per-prompt matrices instead, and the transposed convolutions of the output upscaling (kernel 2, stride 2: every
# input pixel writes its own 2x2 block) become per-token linears on the token layout, with no NCHW transposes of
# 256 channels. The values are SAM's up to float rounding (benchmarks/README.md: 1.4x faster per prompt on ONNX
# Runtime CPU); ``tests/test_export.py`` checks the modules against SAM's own.

def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """B x N x C -> B x heads x N x C/heads."""
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, heads, channels // heads).transpose(1, 2)


def _per_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's weight (internal x D) -> heads x internal/heads x D."""
    return weight.reshape(heads, weight.shape[0] // heads, weight.shape[1])


def _tokens_attend_to_image(attention: nn.Module, queries: torch.Tensor, image_keys: torch.Tensor,
                            image_values: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention(q=queries, k=image_keys, v=image_values)`` with few queries and many image tokens.

    Per head, scores = q_h (K W_k,h^T + b_k,h)^T = (q_h W_k,h) K^T + q_h b_k,h^T, whose last term is the same
    for every image token of a query, which softmax ignores; and softmax(scores) (V W_v,h^T + b_v,h) =
    (P_h V) W_v,h^T + b_v,h, as each row of P sums to 1. The image tokens meet heads x queries rows instead of a
    256 x 128 projection.
    """
    heads = attention.num_heads
    batch, count = queries.shape[:2]
    scale = (attention.internal_dim // heads) ** -0.5
    q = _split_heads(attention.q_proj(queries), heads)  # B h n c
    projected = (q @ _per_head(attention.k_proj.weight, heads)) * scale  # B h n D
    scores = (projected.reshape(batch, heads * count, -1) @ image_keys.transpose(1, 2))
    weights = torch.softmax(scores.reshape(batch, heads, count, -1), dim=-1)
    mixed = (weights.reshape(batch, heads * count, -1) @ image_values).reshape(batch, heads, count, -1)
    values = mixed @ _per_head(attention.v_proj.weight, heads).transpose(1, 2)  # B h n c
    values = values + attention.v_proj.bias.reshape(heads, 1, -1)
    return attention.out_proj(values.transpose(1, 2).reshape(batch, count, -1))


def _image_attends_to_tokens(attention: nn.Module, image_queries: torch.Tensor, keys: torch.Tensor,
                             values: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention(q=image_queries, k=keys, v=values)`` with many image queries and few keys.

    Per head, scores = (X W_q,h^T + b_q,h) k_h^T = X (W_q,h^T k_h^T) + b_q,h k_h^T, and the output projection
    distributes over the heads: out = sum_h P_h (v_h W_o,h^T) + b_o. The image tokens meet a D x (heads x keys)
    and a (heads x keys) x D matrix instead of two 256 x 128 projections.
    """
    heads = attention.num_heads
    batch, count = keys.shape[:2]
    scale = (attention.internal_dim // heads) ** -0.5
    k = _split_heads(attention.k_proj(keys), heads) * scale  # B h n c
    query_weight = _per_head(attention.q_proj.weight, heads)  # h c D
    into_keys = (k @ query_weight).reshape(batch, heads * count, -1)  # B (h n) D
    key_bias = (k @ attention.q_proj.bias.reshape(heads, -1, 1)).reshape(batch, 1, heads * count)
    scores = (image_queries @ into_keys.transpose(1, 2) + key_bias).reshape(batch, -1, heads, count)
    weights = torch.softmax(scores, dim=-1).reshape(batch, -1, heads * count)
    v = _split_heads(attention.v_proj(values), heads)  # B h n c
    out_weight = attention.out_proj.weight.reshape(-1, heads, v.shape[-1]).permute(1, 2, 0)  # h c D
    # each head's weights sum to 1 over its keys, so a row of `weights` sums to `heads`: the output bias rides
    # in the small matrix instead of a pass over the image tokens
    return weights @ ((v @ out_weight).reshape(batch, heads * count, -1) + attention.out_proj.bias / heads)


def two_way_transformer(transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayTransformer`` (SAM 2's has the same layers) on image tokens (B x HW x D) with the cross
    attentions reassociated."""
    queries, keys = tokens, image
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            with_pe = queries + tokens
            queries = queries + layer.self_attn(q=with_pe, k=with_pe, v=queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + _tokens_attend_to_image(layer.cross_attn_token_to_image, queries + tokens,
                                                                keys + image_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _image_attends_to_tokens(layer.cross_attn_image_to_token, keys + image_pe,
                                                           queries + tokens, queries))
    queries = transformer.norm_final_attn(queries + _tokens_attend_to_image(
        transformer.final_attn_token_to_image, queries + tokens, keys + image_pe, keys))
    return queries, keys


def _as_linear(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution's weight (in x out x 2 x 2) as in x (2 * 2 * out), ordered by
    the output pixel's (row, column) within its 2x2 block, then channel."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)


def _per_token_linear(tokens: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """``conv`` (kernel 2, stride 2) on B x N x in tokens -> (B * N) x (2 * 2 * out), as one 2-D product with
    its bias (ONNX Runtime runs a 2-D MatMul and Add as one Gemm, the bias written with the product)."""
    return tokens.reshape(-1, tokens.shape[-1]) @ _as_linear(conv) + conv.bias.repeat(4)


def _upscaled_masks(upscaling: nn.Sequential, image: torch.Tensor, hyper_in: torch.Tensor,
                    embedding_hw: tuple[int, int]) -> torch.Tensor:
    """SAM's output upscaling (two transposed convolutions with a LayerNorm2d and GELUs) and the masks
    ``hyper_in @ upscaled``, computed on tokens: B x HW x D image tokens, B x K x C hypernetwork outputs ->
    B x K x 4H x 4W logits."""
    first, norm, activation, second, last_activation = upscaling
    height, width = embedding_hw
    batch, count = hyper_in.shape[:2]
    blocks = _per_token_linear(image, first).reshape(batch, height * width * 4, -1)
    blocks = activation(functional.layer_norm(blocks, (norm.weight.shape[0],), norm.weight, norm.bias, norm.eps))
    pixels = last_activation(_per_token_linear(blocks, second).reshape(batch, height * width * 16, -1))
    masks = (pixels @ hyper_in.transpose(1, 2)).transpose(1, 2)  # B x K x (i, j, a, b, c, d)
    # pixel (i, j) of the embedding, (a, b) of the first block, (c, d) of the second: row 4i + 2a + c,
    # column 4j + 2b + d
    masks = masks.reshape(-1, height, width, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return masks.reshape(batch, count, 4 * height, 4 * width)


def as_output_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """An encoder's outputs as a tuple: SAM's encoder returns the embedding alone, SAM 2's also two high-res maps."""
    return outputs if isinstance(outputs, tuple) else (outputs,)


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
