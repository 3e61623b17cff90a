"""Adapter checkpoints: written atomically, bound to what they were trained on, and imported ones.

An adapter checkpoint holds only the adapters (the base model stays where it
is, by path): ``{"format", "identity", "config", "adapters", "optimizer",
...}``. ``identity`` (model, checkpoint, seed, data fingerprint, settings)
decides whether an interrupted run may resume from a partial checkpoint.

Externally trained LoRA uses this key layout, in the same file as the base
weights or alone: for every adapted linear ``image_encoder.<block>.attn.qkv``
(or ``.proj``) the base weight under its usual key plus ``<linear>.lora_A``
(rank x in_features) and ``<linear>.lora_B`` (out_features x rank), and
optionally one scalar ``lora_alpha`` (default: the rank, i.e. scale 1).
Block names are those of ``finetune.blocks.attention_blocks``
(``layers.3.blocks.1`` in MobileSAM, ``blocks.11`` in SAM ViT-B).
Already merged weights need no import: pass them as ``--checkpoint``.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import atomic_path, refuse_overwriting, staged_outputs
from sam_reuse.exporter.models import load_state_dict
from sam_reuse.finetune.config import PeftConfig

FORMAT = "sam-reuse-adapters-1"
FINAL = "adapters.pt"
PARTIAL = "adapters.partial.pt"
BASE = "base.pt"  # the base weights an imported LoRA came with (pass as --checkpoint)
LORA_KEY = re.compile(r"^image_encoder\.(?P<block>.+)\.attn\.(?P<linear>qkv|proj)\.lora_(?P<factor>[AB])$")


def save_checkpoint(path: Path, identity: dict[str, Any], config: PeftConfig, adapters: dict[str, torch.Tensor],
                    optimizer: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "identity": identity, "config": config.to_json(), "adapters": adapters,
               "optimizer": optimizer, **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _read(path: Path) -> dict[str, Any]:
    try:
        # weights_only: tensors and plain containers only, so a crafted file cannot run code when loaded
        payload = torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SamReuseError(f"{path}: adapter checkpoint not found") from None
    except Exception as exc:  # torch raises many types for bad archives
        raise SamReuseError(f"{path}: not a readable adapter checkpoint: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SamReuseError(f"{path}: not a sam-reuse adapter checkpoint (format {FORMAT})")
    return payload


def load_checkpoint(path: Path, identity: dict[str, Any], config: PeftConfig) -> dict[str, Any] | None:
    """A partial checkpoint of exactly this run, or None (absent, or from other settings: start over)."""
    if not Path(path).exists():
        return None
    payload = _read(path)
    saved = PeftConfig.from_json(payload["config"])
    saved.salient_channels = {}
    wanted = PeftConfig.from_json(config.to_json())
    wanted.salient_channels = {}
    if payload["identity"] != identity or saved != wanted:
        return None
    return payload


def read_adapters(path: str | Path) -> tuple[PeftConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, adapter state, training record) of a finished adapter checkpoint."""
    payload = _read(Path(path))
    return PeftConfig.from_json(payload["config"]), payload["adapters"], payload.get("record", {})


def check_base(path: str | Path, model_type: str, checkpoint: str | Path | None, seed: int) -> None:
    """Refuse merging adapters into another base than they were trained on: another model type, or (without a
    checkpoint, a seeded test model) another seed. Imported adapters name no base, so they pass."""
    identity = _read(Path(path)).get("identity", {})
    if "model_type" not in identity:
        return
    if identity["model_type"] != model_type:
        raise SamReuseError(f"{path}: trained on {identity['model_type']}, not {model_type}")
    if checkpoint is None and identity.get("checkpoint") is None and identity.get("seed") != seed:
        raise SamReuseError(f"{path}: trained on {model_type} initialised with seed {identity.get('seed')}, not "
                            f"{seed} (pass --seed {identity.get('seed')})")


def import_lora(source: str | Path, out_dir: str | Path) -> tuple[Path, Path | None]:
    """Convert an external LoRA state dict into ``OUT/adapters.pt`` (+ ``OUT/base.pt`` if base weights came with it).

    Returns (adapter checkpoint, base checkpoint or None). Errors name the
    file and the first key that does not fit the documented layout.
    """
    source, out_dir = Path(source), Path(out_dir)
    for output in (FINAL, BASE):
        refuse_overwriting(out_dir / output, source)
    state = load_state_dict(source)
    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    base = {}
    alpha = None
    for key, value in state.items():
        match = LORA_KEY.match(key)
        if match:
            factors.setdefault((match["block"], match["linear"]), {})[match["factor"]] = value
        elif key == "lora_alpha":
            value = torch.as_tensor(value) if isinstance(value, (int, float)) else value
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not torch.isfinite(value).all():
                raise SamReuseError(f"{source}: 'lora_alpha' must be one finite number, not {str(value)[:80]}")
            alpha = float(value)
        elif ".lora_" in key:
            raise SamReuseError(f"{source}: key '{key}' is not of the form "
                                "image_encoder.<block>.attn.<qkv|proj>.lora_<A|B>")
        else:
            base[key] = value
    if not factors:
        raise SamReuseError(f"{source}: no LoRA factors (keys image_encoder.<block>.attn.<qkv|proj>.lora_A/B)")
    ranks = set()
    for (block, linear), pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise SamReuseError(f"{source}: {block}.attn.{linear} has lora_{next(iter(pair))} but not its partner")
        if pair["A"].ndim != 2 or pair["B"].ndim != 2 or pair["A"].shape[0] != pair["B"].shape[1]:
            raise SamReuseError(f"{source}: {block}.attn.{linear}: lora_A {tuple(pair['A'].shape)} and lora_B "
                                f"{tuple(pair['B'].shape)} are not rank x in and out x rank")
        ranks.add(pair["A"].shape[0])
    linears = sorted({linear for _, linear in factors})
    blocks = sorted({block for block, _ in factors})
    missing = [f"{b}.attn.{lin}" for b in blocks for lin in linears if (b, lin) not in factors]
    if len(ranks) != 1 or missing:
        raise SamReuseError(f"{source}: every adapted block needs the same linears and one rank "
                            f"(ranks {sorted(ranks)}, missing {missing[:3]})")
    rank = ranks.pop()
    config = PeftConfig(method="lora", blocks=",".join(blocks), rank=rank, alpha=alpha if alpha else float(rank),
                        linears=tuple(linears))
    adapters = {f"image_encoder.{b}.attn.{lin}.lora_{f}": factors[(b, lin)][f].float()
                for b, lin in factors for f in ("A", "B")}
    identity = {"imported_from": str(source)}
    with staged_outputs(out_dir, replacing=(BASE,)) as staging:  # adapters and their base appear together
        if base:
            torch.save(base, staging / BASE)
        save_checkpoint(staging / FINAL, identity, config, adapters, None,
                        {"record": {"method": "lora", "imported_from": str(source), "config": config.to_json()}})
    return out_dir / FINAL, out_dir / BASE if base else None


def remove_partial(out_dir: Path) -> None:
    path = Path(out_dir) / PARTIAL
    if path.exists():
        os.remove(path)
