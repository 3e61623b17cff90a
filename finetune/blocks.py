"""Where adapters go, and the encoder as a sequence of steps.

Both encoder families are a stem, a run of attention blocks and a neck.
Writing the forward pass as named steps lets training cache everything
before the first adapted block once per image (the "prefix") and rerun only
the rest, which is what makes CPU training affordable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    if hasattr(encoder, "layers"):
        return "tinyvit"
    if hasattr(encoder, "blocks"):
        return "vit"
    raise SamReuseError(f"unsupported image encoder {type(encoder).__name__}: expected TinyViT or ViT")


def attention_blocks(encoder: nn.Module) -> list[AttentionBlock]:
    """The encoder's attention blocks in forward order (TinyViT's first stage is convolutional)."""
    if encoder_family(encoder) == "tinyvit":
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


Step = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def encoder_steps(encoder: nn.Module) -> list[Step]:
    """The encoder's forward pass as (name, function) steps whose composition equals ``encoder(x)``.

    Block steps are named like ``attention_blocks``; they look the module up
    at call time, so adapters attached later are used.
    """
    def block_step(name: str) -> Step:
        return name, lambda x: encoder.get_submodule(name)(x)

    if encoder_family(encoder) == "tinyvit":
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


def split_steps(steps: list[Step], first_trained: str) -> tuple[list[Step], list[Step]]:
    """Steps before the first adapted block (run once, cached) and from it on."""
    names = [name for name, _ in steps]
    if first_trained not in names:
        raise SamReuseError(f"no encoder step named '{first_trained}'")
    cut = names.index(first_trained)
    return steps[:cut], steps[cut:]


def run_steps(steps: list[Step], x: torch.Tensor) -> torch.Tensor:
    for _, step in steps:
        x = step(x)
    return x
