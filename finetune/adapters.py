"""Adapter modules. Each starts as the identity (its delta is zero), so an
untrained adapter leaves the model's outputs unchanged.

Mergeable adapters (linear in a base weight) expose ``delta_weight()`` and
``merged()``, which returns a plain ``nn.Linear``: the exported graph then has
exactly the original model's operators. The others are residual pieces that
stay in the graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _seeded_kaiming(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's A initialisation (kaiming-uniform, a=sqrt(5)), from an explicit generator for determinism."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class MergeableLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable weight delta."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)

    def merged(self) -> nn.Linear:
        """A plain linear layer with the delta folded into its weight."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear.to(self.base.weight.device)


class LoRALinear(MergeableLinear):
    """``W x + b + (alpha / r) B A x`` with ``B`` zero-initialised (Hu et al., 2021)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__(base)
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(_seeded_kaiming((rank, base.in_features), base.in_features, generator))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The low-rank path costs r*(in+out) per token instead of in*out.
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def quaternion_matrix(components: torch.Tensor) -> torch.Tensor:
    """The r x r real matrix of a quaternion linear map (Hamilton product).

    ``components`` is 4 x n x n (r = 4n): the real part and the i, j, k parts.
    Four n x n blocks parameterise an r x r map, a quarter of a dense one.
    """
    a, b, c, d = components
    return torch.cat([
        torch.cat([a, -b, -c, -d], dim=1),
        torch.cat([b, a, -d, c], dim=1),
        torch.cat([c, d, a, -b], dim=1),
        torch.cat([d, -c, b, a], dim=1),
    ], dim=0)


class CobotGroup(nn.Module):
    """LoRA-style factors of L same-shaped linears (one per block), orchestrated across blocks.

    Block l's delta is ``scale * (sum_j R[l, j] B_j) Q_l A_l``: ``R`` (L x L,
    initialised to the identity) lets blocks share what their up-projections
    learn, and ``Q_l`` (a quaternion map, initialised to the identity) mixes
    the rank-r code inside the block. With R = I and Q = I this is LoRA.
    """

    def __init__(self, count: int, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        if rank % 4:
            raise ValueError(f"cobot rank must be a multiple of 4 (quaternion blocks), got {rank}")
        self.scale = alpha / rank
        self.A = nn.Parameter(_seeded_kaiming((count, rank, in_features), in_features, generator))
        self.B = nn.Parameter(torch.zeros(count, out_features, rank))
        self.relation = nn.Parameter(torch.eye(count))
        quaternion = torch.zeros(count, 4, rank // 4, rank // 4)
        quaternion[:, 0] = torch.eye(rank // 4)
        self.quaternion = nn.Parameter(quaternion)

    def delta_weight(self, index: int) -> torch.Tensor:
        mixed_b = torch.einsum("j,jor->or", self.relation[index], self.B)
        return self.scale * mixed_b @ quaternion_matrix(self.quaternion[index]) @ self.A[index]


class CobotLinear(MergeableLinear):
    """One block's linear whose delta comes from a shared ``CobotGroup``.

    The group is owned (registered) by the encoder, not by this module, so
    its parameters appear once in ``state_dict``.
    """

    def __init__(self, base: nn.Linear, group: CobotGroup, index: int) -> None:
        super().__init__(base)
        object.__setattr__(self, "group", group)  # a reference, not a submodule
        self.index = index

    def delta_weight(self) -> torch.Tensor:
        return self.group.delta_weight(self.index)


class SparseDeltaLinear(MergeableLinear):
    """A weight delta on a chosen subset of entries (SFA's internal adapter).

    ``positions`` holds flat indices into the weight; ``values`` their deltas.
    It starts dense (every position) for the lottery-ticket phase; ``keep``
    then restricts it to the winning positions and rewinds them to zero.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        numel = base.weight.numel()
        self.register_buffer("positions", torch.arange(numel))
        self.values = nn.Parameter(torch.zeros(numel))

    def delta_weight(self) -> torch.Tensor:
        flat = torch.zeros(self.base.weight.numel(), dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.positions,), self.values).view_as(self.base.weight)

    def keep(self, positions: torch.Tensor) -> None:
        """Restrict the delta to ``positions`` (sorted flat indices) and rewind it to zero."""
        self.positions = positions.to(self.positions.device)
        self.values = nn.Parameter(torch.zeros(len(positions), device=self.values.device))

    def resize_for(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Shape the buffers to a saved state before ``load_state_dict`` (the kept set varies)."""
        self.keep(state[prefix + "positions"])


class OutputAdapter(nn.Module):
    """Runs a block, then a residual adapter on its output tokens (last dim = channels)."""

    def __init__(self, block: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.block(x))


class BottleneckAdapter(nn.Module):
    """``x + up(gelu(down(x)))``, ``up`` zero-initialised (SFA's external adapter)."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        with torch.no_grad():
            self.down.weight.copy_(_seeded_kaiming((hidden, dim), dim, generator))
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


class SalientChannelResidual(nn.Module):
    """SCT: ``x[..., S] += x[..., S] @ M^T`` for the salient channel set S, M zero-initialised.

    Written as gather, matmul, and a matmul with a fixed one-hot K x C
    scatter matrix, which exports to plain Gather/MatMul/Add.
    """

    def __init__(self, dim: int, channels: torch.Tensor) -> None:
        super().__init__()
        channels = torch.as_tensor(channels, dtype=torch.long)
        self.register_buffer("channels", channels)
        self.register_buffer("scatter", F.one_hot(channels, dim).float())
        self.mix = nn.Parameter(torch.zeros(len(channels), len(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x.index_select(-1, self.channels) @ self.mix.t()) @ self.scatter
