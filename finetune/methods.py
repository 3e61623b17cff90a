"""Attach a method's adapters to a SAM model, count them, merge them.

``PeftConfig`` is the one record of what was attached: it is saved in every
adapter checkpoint, so ``attach(build_sam(...), config)`` rebuilds the exact
module structure before the trained state is loaded.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from sam_reuse.base.errors import SamReuseError
from sam_reuse.finetune.adapters import (
    BottleneckAdapter,
    CobotGroup,
    CobotLinear,
    LoRALinear,
    MergeableLinear,
    OutputAdapter,
    SalientChannelResidual,
    SparseDeltaLinear,
)
from sam_reuse.finetune.blocks import AttentionBlock, select_blocks, set_submodule
from sam_reuse.finetune.config import PeftConfig

COBOT_GROUPS = "cobot_groups"  # where CobotGroup modules live on the image encoder


def _linear(block: AttentionBlock, name: str) -> nn.Linear:
    return block.qkv if name == "qkv" else block.proj


def _replace_linear(encoder: nn.Module, block: AttentionBlock, name: str, module: nn.Module) -> None:
    set_submodule(encoder, f"{block.name}.attn.{name}", module)


def _attach_lora(encoder: nn.Module, blocks: list[AttentionBlock], config: PeftConfig,
                 generator: torch.Generator) -> None:
    for block in blocks:
        for name in config.linears:
            _replace_linear(encoder, block, name, LoRALinear(_linear(block, name), config.rank, config.alpha, generator))


def _attach_cobot(encoder: nn.Module, blocks: list[AttentionBlock], config: PeftConfig,
                  generator: torch.Generator) -> None:
    """One relation matrix per (linear, shape) group: only same-shaped factors can be mixed."""
    groups: dict[str, list[tuple[AttentionBlock, nn.Linear]]] = defaultdict(list)
    for block in blocks:
        for name in config.linears:
            base = _linear(block, name)
            groups[f"{name}_{base.in_features}x{base.out_features}"].append((block, base))
    modules = nn.ModuleDict()
    for key, members in groups.items():
        base = members[0][1]
        group = CobotGroup(len(members), base.in_features, base.out_features, config.rank, config.alpha, generator)
        modules[key] = group
        for index, (block, linear) in enumerate(members):
            _replace_linear(encoder, block, key.split("_")[0], CobotLinear(linear, group, index))
    setattr(encoder, COBOT_GROUPS, modules)


def _attach_sfa(encoder: nn.Module, blocks: list[AttentionBlock], config: PeftConfig,
                generator: torch.Generator) -> None:
    for block in blocks:
        for name in config.linears:
            _replace_linear(encoder, block, name, SparseDeltaLinear(_linear(block, name)))
    external = {b.name for b in select_blocks(encoder, config.sfa_external)} if config.sfa_external else set()
    for block in blocks:
        if block.name in external:
            set_submodule(encoder, block.name,
                          OutputAdapter(block.module, BottleneckAdapter(block.dim, config.sfa_hidden, generator)))


def _attach_sct(encoder: nn.Module, blocks: list[AttentionBlock], config: PeftConfig) -> None:
    missing = [b.name for b in blocks if b.name not in config.salient_channels]
    if missing:
        raise SamReuseError(f"SCT needs salient channels for {', '.join(missing)} (run the salience pass first)")
    for block in blocks:
        channels = torch.tensor(config.salient_channels[block.name], dtype=torch.long)
        set_submodule(encoder, block.name, OutputAdapter(block.module, SalientChannelResidual(block.dim, channels)))


def attach(sam: nn.Module, config: PeftConfig) -> list[AttentionBlock]:
    """Freeze ``sam`` and add ``config``'s adapters to its image encoder in place; returns the adapted blocks.

    The model stays in eval mode: BatchNorm statistics and TinyViT's cached
    attention biases are part of the frozen base.
    """
    encoder = sam.image_encoder
    for param in sam.parameters():
        param.requires_grad_(False)
    blocks = select_blocks(encoder, config.blocks)
    generator = torch.Generator().manual_seed(config.seed)
    if config.method == "lora":
        _attach_lora(encoder, blocks, config, generator)
    elif config.method == "cobot":
        _attach_cobot(encoder, blocks, config, generator)
    elif config.method == "sfa":
        _attach_sfa(encoder, blocks, config, generator)
    else:
        _attach_sct(encoder, blocks, config)
    sam.eval()
    return blocks


def adapter_parameters(sam: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in sam.named_parameters() if p.requires_grad}


def adapter_state(sam: nn.Module) -> dict[str, torch.Tensor]:
    """The trained state: adapter parameters and adapter buffers (SFA positions, SCT channels)."""
    trainable = set(adapter_parameters(sam))
    adapter_modules = [name for name, m in sam.named_modules()
                       if isinstance(m, (MergeableLinear, SalientChannelResidual, BottleneckAdapter, CobotGroup))]
    state = {}
    for name, value in sam.state_dict().items():
        in_adapter = any(name.startswith(prefix + ".") for prefix in adapter_modules)
        is_base = ".base." in name or name.startswith("base.")
        if name in trainable or (in_adapter and not is_base):
            state[name] = value.detach().cpu().clone()
    return state


def load_adapter_state(sam: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a saved adapter state into an ``attach``-ed model (sparse deltas are resized first)."""
    for name, module in sam.named_modules():
        if isinstance(module, SparseDeltaLinear):
            if name + ".positions" not in state:
                raise SamReuseError(f"adapter state does not fit the model: it has no sparse delta for {name}")
            module.resize_for(state, name + ".")
    own = adapter_state(sam)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SamReuseError(f"adapter state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    sam.load_state_dict(state, strict=False)


def trainable_count(sam: nn.Module) -> int:
    """Trained numbers: SFA's sparse deltas count their kept entries only."""
    return sum(p.numel() for p in adapter_parameters(sam).values())


def merge_adapters(sam: nn.Module) -> dict[str, int]:
    """Fold every mergeable adapter into its base weight in place; returns what was merged and what stays.

    After this the encoder holds plain ``nn.Linear`` layers where LoRA, COBOT
    and SFA-internal deltas were; SCT maps and SFA external adapters remain.
    """
    encoder = sam.image_encoder
    merged = [name for name, m in encoder.named_modules() if isinstance(m, MergeableLinear)]
    for name in merged:
        set_submodule(encoder, name, encoder.get_submodule(name).merged())
    if hasattr(encoder, COBOT_GROUPS):
        delattr(encoder, COBOT_GROUPS)
    remaining = [name for name, m in encoder.named_modules()
                 if isinstance(m, (SalientChannelResidual, BottleneckAdapter))]
    return {"merged_linears": len(merged), "graph_adapters": len(remaining)}
