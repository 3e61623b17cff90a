"""Train a method's adapters on the search split of a calibration set.

The loss is the one SAM fine-tuning uses: 20 x focal + 1 x dice on the
decoder's 256x256 low-resolution logits, against the mask resized and padded
exactly as the image is. The prompt encoder and mask decoder stay frozen.

Everything before the first adapted block runs once per image without
gradients (the cached prefix), so adapters on the last blocks train on a CPU
in minutes; ``--blocks all`` on a GPU trains the full depth.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sam_reuse.base import imaging
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import ensure_writable_dir, write_json
from sam_reuse.base.records import Sample
from sam_reuse.calibrate.data import load_calibration
from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.sam2_wrappers import Sam2SingleMaskDecoder
from sam_reuse.exporter.wrappers import SingleMaskDecoder, as_output_tuple
from sam_reuse.finetune.adapters import BottleneckAdapter, SparseDeltaLinear
from sam_reuse.finetune.blocks import State, encoder_family, encoder_steps, run_steps, select_blocks, split_steps
from sam_reuse.finetune.checkpoint import FINAL, PARTIAL, load_checkpoint, remove_partial, save_checkpoint
from sam_reuse.finetune.config import PeftConfig, TrainSettings
from sam_reuse.finetune.methods import adapter_parameters, adapter_state, attach, load_adapter_state, trainable_count

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0


@dataclass
class Example:
    """One training image, reduced to what the suffix of the encoder and the decoder need."""

    key: str
    prefix: State  # output of the cached steps
    coords: torch.Tensor  # 1xNx2 in the 1024 frame
    labels: torch.Tensor  # 1xN
    target: torch.Tensor  # 1x1x256x256 in [0, 1]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's fine-tuning loss: 20 x sigmoid focal (alpha 0.25, gamma 2) + 1 x soft dice."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha_t * ce * (1 - p_t) ** 2).mean()
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return FOCAL_WEIGHT * focal + DICE_WEIGHT * dice


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SamReuseError(f"--device {name}: not a torch device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise SamReuseError(f"--device {name}: adapters train on cpu or cuda only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SamReuseError(f"--device {name}: no CUDA device visible to torch")
    return device


def convention_of(sam) -> str:
    """How the model frames images and prompts (``sam_reuse.base.imaging``): SAM 2 stretches, SAM pads."""
    return imaging.SAM2 if encoder_family(sam.image_encoder) == "hiera" else imaging.SAM1


def _image_tensor(sample: Sample, convention: str) -> torch.Tensor:
    return torch.from_numpy(imaging.preprocess(imaging.load_image_rgb(sample.record.image), convention=convention))


@torch.no_grad()
def salient_channels(sam, samples: Sequence[Sample], blocks_spec: str, fraction: float, device: torch.device,
                     progress: bool) -> dict[str, list[int]]:
    """SCT's salience: per block, the channels with the largest mean per-image L2 norm of the block output."""
    blocks = select_blocks(sam.image_encoder, blocks_spec)
    steps, convention = encoder_steps(sam), convention_of(sam)
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    for block in blocks:
        def record(module, inputs, output, name=block.name):
            per_image = output.flatten(1, -2).norm(dim=1)  # B x C: L2 over the tokens
            norms[name] = norms.get(name, 0) + per_image.sum(0).cpu()
        hooks.append(block.module.register_forward_hook(record))
    try:
        for sample in tqdm(samples, desc="salience", disable=not progress, leave=False):
            run_steps(steps, _image_tensor(sample, convention).to(device))
    finally:
        for hook in hooks:
            hook.remove()
    chosen = {}
    for block in blocks:
        count = max(1, int(round(block.dim * fraction)))
        chosen[block.name] = sorted(int(c) for c in torch.argsort(norms[block.name], descending=True)[:count])
    return chosen


@torch.no_grad()
def prepare_examples(sam, samples: Sequence[Sample], first_trained: str, device: torch.device,
                     progress: bool) -> list[Example]:
    prefix_steps, _ = split_steps(encoder_steps(sam), first_trained)
    convention = convention_of(sam)
    examples = []
    for sample in tqdm(samples, desc="cache prefix", disable=not progress, leave=False):
        coords, labels = imaging.prompt_arrays(sample.prompt, sample.hw, convention=convention)
        target, _ = imaging.low_res_target(sample.mask, convention=convention)
        examples.append(Example(
            key=sample.key,
            prefix=run_steps(prefix_steps, _image_tensor(sample, convention).to(device)),
            coords=torch.from_numpy(coords).to(device),
            labels=torch.from_numpy(labels).to(device),
            target=torch.from_numpy(target)[None, None].to(device),
        ))
    return examples


def _data_fingerprint(samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.image_sha256.encode())
        digest.update(np.packbits(sample.mask).tobytes())
        digest.update(json.dumps(imaging.prompt_arrays(sample.prompt, sample.hw)[0].tolist()).encode())
    return digest.hexdigest()


class Trainer:
    """One training run: the model with adapters, the cached examples, optimizer and history."""

    def __init__(self, sam, config: PeftConfig, settings: TrainSettings, examples: list[Example],
                 first_trained: str) -> None:
        self.sam = sam
        self.config = config
        self.settings = settings
        self.examples = examples
        _, self.suffix = split_steps(encoder_steps(sam), first_trained)
        is_sam2 = convention_of(sam) == imaging.SAM2
        self.decoder = (Sam2SingleMaskDecoder(sam) if is_sam2 else SingleMaskDecoder(sam)).eval()
        self.initial_state = adapter_state(sam)  # what SFA rewinds its external adapters to
        self.history: list[dict[str, Any]] = []
        self.optimizer = self.new_optimizer()

    def new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(adapter_parameters(self.sam).values()), lr=self.settings.lr,
                                 weight_decay=self.settings.weight_decay)

    def lr_at(self, epoch: int) -> float:
        """Cosine decay over the phase the epoch is in (SFA restarts it after pruning)."""
        start, length = (0, self.settings.epochs)
        if self.config.method == "sfa":
            prune = self.prune_epoch
            start, length = (0, prune) if epoch < prune else (prune, self.settings.epochs - prune)
        return self.settings.lr * 0.5 * (1 + math.cos(math.pi * (epoch - start) / max(length, 1)))

    @property
    def prune_epoch(self) -> int:
        return max(1, self.settings.epochs // 2)

    def loss_of(self, example: Example) -> torch.Tensor:
        features = as_output_tuple(run_steps(self.suffix, example.prefix))  # SAM 2: the two high-res maps too
        zeros = torch.zeros(1, 1, imaging.LOW_RES_SIZE, imaging.LOW_RES_SIZE, device=example.target.device)
        logits, _ = self.decoder(*features, example.coords, example.labels, zeros, zeros.new_zeros(1))
        return segmentation_loss(logits, example.target)

    def run_epoch(self, epoch: int) -> float:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
        total = 0.0
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            self.optimizer.zero_grad(set_to_none=True)
            for index in batch:
                loss = self.loss_of(self.examples[index]) / len(batch)
                loss.backward()
                total += loss.item() * len(batch)
            self.optimizer.step()
        return total / len(order)

    def prune_and_rewind(self) -> dict[str, int]:
        """SFA's lottery ticket: keep the largest-magnitude internal deltas under the budget, rewind everything."""
        sparse = [m for m in self.sam.modules() if isinstance(m, SparseDeltaLinear)]
        magnitudes = torch.cat([m.values.detach().abs().flatten() for m in sparse])
        budget = max(1, int(self.config.sfa_budget * magnitudes.numel()))
        threshold = torch.topk(magnitudes, budget, sorted=True).values[-1]
        kept = 0
        for module in sparse:
            winners = torch.nonzero(module.values.detach().abs() >= threshold).flatten()[: budget - kept]
            module.keep(module.positions[winners].sort().values)
            kept += len(winners)
        external = {name: m for name, m in self.sam.named_modules() if isinstance(m, BottleneckAdapter)}
        with torch.no_grad():
            for name, module in external.items():
                for key, value in module.state_dict().items():
                    value.copy_(self.initial_state[f"{name}.{key}"])
        self.optimizer = self.new_optimizer()
        return {"kept": kept, "candidates": int(magnitudes.numel())}

    @torch.no_grad()
    def mean_loss(self) -> float:
        return float(np.mean([float(self.loss_of(example)) for example in self.examples]))


def train(model_type: str, checkpoint: str | Path | None, data: str | Path, out_dir: str | Path,
          config: PeftConfig, settings: TrainSettings | None = None, seed: int = 0) -> dict[str, Any]:
    """Train ``config``'s adapters on the search split of ``data``; writes ``OUT/adapters.pt`` and ``OUT/train.json``.

    Each finished epoch is checkpointed to ``OUT/adapters.partial.pt``; a rerun
    with the same model, data, method and settings resumes from it.
    Returns the training record that ``train.json`` holds.
    """
    settings = settings or TrainSettings()
    for option, value, least in (("--epochs", settings.epochs, 1), ("--batch-size", settings.batch_size, 1)):
        if value < least:
            raise SamReuseError(f"{option} {value}: must be at least {least}")
    if not settings.lr > 0:
        raise SamReuseError(f"--lr {settings.lr:g}: the learning rate must be above 0")
    device = _device(settings.device)
    calibration = load_calibration(data, None, settings.prompt, settings.search_images, settings.holdout_images)
    samples = calibration.search
    torch.manual_seed(config.seed)
    sam = build_sam(model_type, checkpoint, seed=seed).to(device)
    select_blocks(sam.image_encoder, config.blocks)  # a bad --blocks fails here, before the output folder exists
    out_dir = ensure_writable_dir(out_dir)
    identity = {"model_type": model_type, "checkpoint": str(checkpoint) if checkpoint else None, "seed": seed,
                "data": _data_fingerprint(samples), "settings": {k: v for k, v in asdict(settings).items()
                                                               if k not in ("device", "progress")}}
    resumed = load_checkpoint(out_dir / PARTIAL, identity, config)
    if resumed is not None:
        config = PeftConfig.from_json(resumed["config"])
    elif config.method == "sct":
        config.salient_channels = salient_channels(sam, samples, config.blocks, config.sct_fraction, device,
                                                   settings.progress)
    first_trained = select_blocks(sam.image_encoder, config.blocks)[0].name
    attach(sam, config)
    sam.to(device)
    started = time.perf_counter()
    examples = prepare_examples(sam, samples, first_trained, device, settings.progress)
    prefix_seconds = time.perf_counter() - started
    trainer = Trainer(sam, config, settings, examples, first_trained)
    first_epoch, train_seconds, pruning = 0, 0.0, None
    if resumed is not None:
        load_adapter_state(sam, resumed["adapters"])
        trainer.optimizer = trainer.new_optimizer()
        trainer.optimizer.load_state_dict(resumed["optimizer"])
        trainer.history = resumed["history"]
        first_epoch, train_seconds, pruning = resumed["epoch"] + 1, resumed["train_seconds"], resumed["pruning"]
        initial_loss = resumed["initial_loss"]
    else:
        initial_loss = trainer.mean_loss()
    bar = tqdm(range(first_epoch, settings.epochs), desc=f"train {config.method}", disable=not settings.progress,
               initial=first_epoch, total=settings.epochs)
    for epoch in bar:
        epoch_started = time.perf_counter()
        loss = trainer.run_epoch(epoch)
        if config.method == "sfa" and epoch + 1 == trainer.prune_epoch and settings.epochs > 1:
            pruning = trainer.prune_and_rewind()
        train_seconds += time.perf_counter() - epoch_started
        trainer.history.append({"epoch": epoch, "loss": loss, "lr": trainer.lr_at(epoch)})
        bar.set_postfix(loss=f"{loss:.4f}")
        save_checkpoint(out_dir / PARTIAL, identity, config, adapter_state(sam), trainer.optimizer.state_dict(),
                        {"epoch": epoch, "history": trainer.history, "train_seconds": train_seconds,
                         "pruning": pruning, "initial_loss": initial_loss})
    record = {
        "method": config.method,
        "config": config.to_json(),
        **identity,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "images": [e.key for e in examples],
        "trainable_parameters": trainable_count(sam),
        "initial_loss": initial_loss,
        "final_loss": trainer.mean_loss(),
        "history": trainer.history,
        "sfa_pruning": pruning,
        "prefix_seconds": round(prefix_seconds, 2),
        "train_seconds": round(train_seconds, 2),
    }
    save_checkpoint(out_dir / FINAL, identity, config, adapter_state(sam), None, {"record": record})
    write_json(out_dir / "train.json", record)
    remove_partial(out_dir)
    return record
