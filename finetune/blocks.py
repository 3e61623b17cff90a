"""Where adapters go, and the encoder as a sequence of steps.

Every encoder family is a stem, a run of attention blocks and a neck (SAM's
ViT, MobileSAM's TinyViT, SAM 2's Hiera). Writing the forward pass as named
steps lets training cache everything before the first adapted block once per
image (the "prefix") and rerun only the rest, which is what makes CPU
training affordable. A step maps a state to the next: a tensor for the ViTs;
for Hiera, the running tensor with the stage outputs collected so far (its
neck reads all four stages), and at the end the three encoder outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from sam_reuse.base.errors import SamReuseError


@dataclass(frozen=True)
class AttentionBlock:
    """One transformer block of the encoder: its name, module and the linears adapters touch."""

    name: str  # dotted path under sam.image_encoder, e.g. "layers.3.blocks.1" or "blocks.11"
    module: nn.Module
    dim: int

    @property
    def qkv(self) -> nn.Module:
        return self.module.attn.qkv

    @property
    def proj(self) -> nn.Module:
        return self.module.attn.proj


def encoder_family(encoder: nn.Module) -> str:
    if hasattr(encoder, "trunk"):
        return "hiera"
    if hasattr(encoder, "layers"):
        return "tinyvit"
    if hasattr(encoder, "blocks"):
        return "vit"
    raise SamReuseError(f"unsupported image encoder {type(encoder).__name__}: expected TinyViT, ViT or Hiera")


def attention_blocks(encoder: nn.Module) -> list[AttentionBlock]:
    """The encoder's attention blocks in forward order (TinyViT's first stage is convolutional; a Hiera block
    that starts a stage widens its channels, so its size is its output's)."""
    family = encoder_family(encoder)
    if family == "hiera":
        return [AttentionBlock(f"trunk.blocks.{j}", block, block.dim_out)
                for j, block in enumerate(encoder.trunk.blocks)]
    if family == "tinyvit":
        return [AttentionBlock(f"layers.{i}.blocks.{j}", block, layer.dim)
                for i, layer in enumerate(encoder.layers) if i > 0
                for j, block in enumerate(layer.blocks)]
    return [AttentionBlock(f"blocks.{j}", block, block.norm1.normalized_shape[0])
            for j, block in enumerate(encoder.blocks)]


def select_blocks(encoder: nn.Module, spec: str) -> list[AttentionBlock]:
    """``all``, ``last:N`` or a comma-separated list of block names: which attention blocks get adapters."""
    blocks = attention_blocks(encoder)
    if spec == "all":
        return blocks
    if spec.startswith("last:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            count = 0
        if 1 <= count <= len(blocks):
            return blocks[-count:]
    else:
        by_name = {block.name: block for block in blocks}
        names = [name.strip() for name in spec.split(",") if name.strip()]
        if names and all(name in by_name for name in names):
            return [block for block in blocks if block.name in names]
    raise SamReuseError(f"--blocks: expected 'all', 'last:N' with 1 <= N <= {len(blocks)}, or block names "
                        f"like {blocks[-1].name}; got '{spec}'")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


State = Union[torch.Tensor, tuple]
Step = tuple[str, Callable[[State], State]]


def encoder_steps(sam: nn.Module) -> list[Step]:
    """The image encoder's forward pass as (name, function) steps whose composition maps the preprocessed image
    to what the decoder reads: ``sam.image_encoder(x)`` for SAM, ``Sam2ImageEncoder(sam)(x)``'s three outputs
    for SAM 2.

    Block steps are named like ``attention_blocks``; they look the module up
    at call time, so adapters attached later are used.
    """
    encoder = sam.image_encoder

    def block_step(name: str) -> Step:
        return name, lambda x: encoder.get_submodule(name)(x)

    family = encoder_family(encoder)
    if family == "hiera":
        return _hiera_steps(sam)
    if family == "tinyvit":
        steps: list[Step] = [("patch_embed", encoder.patch_embed), ("layers.0", encoder.layers[0])]
        for i, layer in enumerate(encoder.layers):
            if i == 0:
                continue
            steps += [block_step(f"layers.{i}.blocks.{j}") for j in range(len(layer.blocks))]
            if layer.downsample is not None:
                steps.append((f"layers.{i}.downsample", layer.downsample))

        def neck(x: torch.Tensor) -> torch.Tensor:
            batch, tokens, channels = x.shape
            side = int(round(tokens ** 0.5))
            return encoder.neck(x.view(batch, side, side, channels).permute(0, 3, 1, 2))

        return steps + [("neck", neck)]

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = encoder.patch_embed(x)
        return x + encoder.pos_embed if encoder.pos_embed is not None else x

    return ([("patch_embed", embed)] + [block_step(f"blocks.{j}") for j in range(len(encoder.blocks))]
            + [("neck", lambda x: encoder.neck(x.permute(0, 3, 1, 2)))])


def _hiera_steps(sam2: nn.Module) -> list[Step]:
    """SAM 2's exported encoder as steps; the state between blocks is (tokens BxHxWxC, stage outputs so far)."""
    from sam_reuse.exporter.sam2_wrappers import Sam2ImageEncoder

    wrapper = Sam2ImageEncoder(sam2)
    trunk = sam2.image_encoder.trunk

    def block_step(index: int) -> Step:
        name = f"trunk.blocks.{index}"

        def step(state: tuple[torch.Tensor, tuple[torch.Tensor, ...]]) -> tuple:
            x, levels = state
            x = sam2.image_encoder.get_submodule(name)(x)
            return x, levels + ((x.permute(0, 3, 1, 2),) if index in trunk.stage_ends else ())

        return name, step

    return ([("patch_embed", lambda image: (wrapper.embed(image), ()))]
            + [block_step(j) for j in range(len(trunk.blocks))]
            + [("neck", lambda state: wrapper.features(list(state[1])))])


def split_steps(steps: list[Step], first_trained: str) -> tuple[list[Step], list[Step]]:
    """Steps before the first adapted block (run once, cached) and from it on."""
    names = [name for name, _ in steps]
    if first_trained not in names:
        raise SamReuseError(f"no encoder step named '{first_trained}'")
    cut = names.index(first_trained)
    return steps[:cut], steps[cut:]


def run_steps(steps: list[Step], x: State) -> State:
    for _, step in steps:
        x = step(x)
    return x
