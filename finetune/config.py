"""What a PEFT run is: the method's configuration and the training settings (no torch needed to read them)."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any

from sam_reuse.base.errors import SamReuseError

METHODS = ("lora", "sct", "sfa", "cobot")


@dataclass
class PeftConfig:
    """Which method, where, and its sizes. ``salient_channels`` is filled by SCT's salience pass."""

    method: str
    blocks: str = "last:2"  # "all" or "last:N" attention blocks
    rank: int = 4  # lora / cobot rank (cobot: a multiple of 4)
    alpha: float = 8.0
    linears: tuple[str, ...] = ("qkv", "proj")  # lora / cobot / sfa-internal targets in each block
    sct_fraction: float = 0.125  # share of each block's channels SCT tunes (the SCT paper: 96 of 768)
    sfa_budget: float = 0.005  # share of the target weights SFA's internal adapter may change
    sfa_hidden: int = 16  # bottleneck width of SFA's external adapters
    sfa_external: str = "last:2"  # blocks that get external adapters (within `blocks`)
    seed: int = 0
    salient_channels: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SamReuseError(f"unknown PEFT method '{self.method}'; choose from {', '.join(METHODS)}")
        self.linears = tuple(self.linears)
        if not self.linears or any(name not in ("qkv", "proj") for name in self.linears):
            raise SamReuseError(f"linears must be a subset of qkv, proj; got {self.linears}")
        if self.rank < 1 or (self.method == "cobot" and self.rank % 4):
            raise SamReuseError(f"--rank {self.rank}: must be at least 1 (cobot: a multiple of 4)")
        if not 0 < self.sct_fraction <= 1 or not 0 < self.sfa_budget <= 1:
            raise SamReuseError("sct_fraction and sfa_budget must be in (0, 1]")
        if not math.isfinite(self.alpha):
            raise SamReuseError(f"--alpha {self.alpha}: must be a finite number (it scales the adapter's weights)")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["linears"] = list(self.linears)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PeftConfig":
        return cls(**data)


@dataclass
class TrainSettings:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 4
    weight_decay: float = 0.0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    prompt: str = "given"
    search_images: int | None = None
    holdout_images: int | None = None
    progress: bool = True
