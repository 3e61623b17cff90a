"""Build SAM-family torch models: real checkpoints by path, and tiny seeded test configs.

Model types:

* ``vit_t``: MobileSAM (TinyViT encoder, package ``mobile_sam``);
* ``vit_b``, ``vit_l``, ``vit_h``: SAM (ViT encoder, package ``segment_anything``);
* ``sam2.1_hiera_t|s|b+|l`` and ``sam2_hiera_t|s|b+|l``: SAM 2.1 and SAM 2.0
  image models (Hiera encoder, package ``sam2``; ``exporter.sam2_models``);
* ``test_vit_t``, ``test_vit_b``, ``test_sam2``, ``test_sam2_b+``,
  ``test_sam2_l``: the encoder families (and SAM 2's size-specific code paths),
  shrunk so a full export and parity check takes seconds, randomly initialised
  from a seed.

Every model keeps SAM's interface: 1024x1024 input, a 256x64x64 image
embedding and the standard prompt encoder / mask decoder. SAM 2 models also
hand the decoder two high-resolution feature maps, and frame images their own
way (``sam_reuse.base.imaging``, convention ``sam2``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sam_reuse.base.errors import SamReuseError

PROMPT_EMBED_DIM = 256
EMBEDDING_SIZE = 64


@dataclass(frozen=True)
class ModelSpec:
    """How to construct one model type."""

    family: str  # "tinyvit" (MobileSAM), "vit" (SAM) or "hiera" (SAM 2; encoder = {"size": key of HIERA_TRUNKS})
    encoder: dict[str, Any]
    decoder_mlp_dim: int = 2048
    is_test_config: bool = False
    global_attn_indexes: tuple[int, ...] = field(default_factory=tuple)


MODEL_SPECS: dict[str, ModelSpec] = {
    "vit_t": ModelSpec("tinyvit", dict(embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                                       num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7])),
    "vit_b": ModelSpec("vit", dict(embed_dim=768, depth=12, num_heads=12), global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": ModelSpec("vit", dict(embed_dim=1024, depth=24, num_heads=16), global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": ModelSpec("vit", dict(embed_dim=1280, depth=32, num_heads=16), global_attn_indexes=(7, 15, 23, 31)),
    # TinyViT's last PatchMerging keeps the 64x64 grid only for out_dim 320/448/576.
    "test_vit_t": ModelSpec("tinyvit", dict(embed_dims=[16, 32, 48, 320], depths=[1, 1, 2, 1],
                                            num_heads=[1, 1, 2, 2], window_sizes=[7, 7, 14, 7]),
                            decoder_mlp_dim=128, is_test_config=True),
    "test_vit_b": ModelSpec("vit", dict(embed_dim=48, depth=2, num_heads=2), global_attn_indexes=(1,),
                            decoder_mlp_dim=128, is_test_config=True),
    **{f"sam2{version}_hiera_{size}": ModelSpec("hiera", {"size": size})
       for version in (".1", "") for size in ("t", "s", "b+", "l")},
    "test_sam2": ModelSpec("hiera", {"size": "test_t"}, is_test_config=True),
    "test_sam2_b+": ModelSpec("hiera", {"size": "test_b+"}, is_test_config=True),
    "test_sam2_l": ModelSpec("hiera", {"size": "test_l"}, is_test_config=True),
}
SAM2_FAMILY = "hiera"


def model_types() -> list[str]:
    return list(MODEL_SPECS)


def spec_for(model_type: str) -> ModelSpec:
    try:
        return MODEL_SPECS[model_type]
    except KeyError:
        raise SamReuseError(f"unknown model type '{model_type}'; choose from {', '.join(MODEL_SPECS)}") from None


def _modeling(family: str):
    """The package whose building blocks a family uses (imported lazily: torch-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm deprecation and registry-overwrite noise from mobile_sam
        if family == "tinyvit":
            from mobile_sam import modeling
        else:
            from segment_anything import modeling
    return modeling


def _build_encoder(spec: ModelSpec, modeling) -> Any:
    import torch

    if spec.family == "tinyvit":
        return modeling.TinyViT(img_size=1024, in_chans=3, num_classes=1000, mlp_ratio=4.0, drop_rate=0.0,
                                drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                                local_conv_size=3, layer_lr_decay=0.8, **spec.encoder)
    return modeling.ImageEncoderViT(img_size=1024, patch_size=16, mlp_ratio=4, out_chans=PROMPT_EMBED_DIM,
                                    norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
                                    use_rel_pos=True, window_size=14,
                                    global_attn_indexes=spec.global_attn_indexes, **spec.encoder)


def build_sam(model_type: str, checkpoint: str | Path | None = None, seed: int = 0, random_weights: bool = False):
    """Construct a ``Sam`` module (a ``SAM2Base`` for SAM 2 types) in eval mode.

    Real model types need a checkpoint, unless ``random_weights`` (for
    measuring and testing a full-size architecture); test configs are
    initialised from ``seed`` (and may also load a checkpoint, e.g. one saved
    by a test).
    ``eval()`` is called after the weights are loaded: TinyViT caches its
    attention biases when switched to eval mode, so calling it before loading
    (as ``mobile_sam.build_sam_vit_t`` does) would keep the initial biases.
    """
    import torch

    spec = spec_for(model_type)
    if checkpoint is None and not (spec.is_test_config or random_weights):
        raise SamReuseError(f"model type '{model_type}' needs --checkpoint PATH")
    state_dict = load_state_dict(checkpoint) if checkpoint is not None else None
    if spec.family == SAM2_FAMILY:
        return _build_sam2(spec, model_type, checkpoint, state_dict, seed)
    modeling = _modeling(spec.family)
    torch.manual_seed(seed)
    sam = modeling.Sam(
        image_encoder=_build_encoder(spec, modeling),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM,
                                                   mlp_dim=spec.decoder_mlp_dim, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if spec.is_test_config:
        _randomise_zero_initialised(sam, seed)
    if state_dict is not None:
        _load_into(sam, state_dict, checkpoint, model_type)
    return sam.eval()


def _build_sam2(spec: ModelSpec, model_type: str, checkpoint: str | Path | None, state_dict: dict[str, Any] | None,
                seed: int):
    import torch

    from sam_reuse.exporter.sam2_models import build_sam2_image, image_path_keys, image_path_state

    if state_dict is not None:
        state_dict = image_path_state(state_dict, checkpoint, model_type)  # refuses a SAM 1 checkpoint first
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sam2's deprecation notices
        sam2 = build_sam2_image(spec.encoder["size"])
    if state_dict is None:
        # Several of SAM 2's tensors start at zero (position embeddings, no_mem_embed, biases): a little noise on
        # every one, so that no path of a randomly initialised model is trivially zero in a parity test.
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in sam2.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        return sam2.eval()
    _check_keys(image_path_keys(sam2), state_dict, checkpoint, model_type)
    sam2.load_state_dict(state_dict, strict=False)
    return sam2.eval()


def _randomise_zero_initialised(sam, seed: int) -> None:
    """Give test configs non-trivial relative-position and attention biases.

    They start at zero in both packages, which would leave those code paths
    (and their export) untested by a freshly initialised model.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sam.image_encoder.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w", "attention_biases")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def load_state_dict(checkpoint: str | Path) -> dict[str, Any]:
    """Read a checkpoint's state dict with messages that name the file and the problem."""
    import torch

    path = Path(checkpoint)
    if not path.exists():
        raise SamReuseError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise SamReuseError(f"{path}: checkpoint is not a file")
    try:
        data = path.read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad archives
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise SamReuseError(f"{path}: not a readable PyTorch checkpoint (truncated or wrong type): {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamReuseError(f"{path}: not a state dict of tensors (found {type(state).__name__})")
    return state


def _load_into(sam, state_dict: dict[str, Any], path: str | Path, model_type: str) -> None:
    if any(key.startswith("image_encoder.trunk.") for key in state_dict):
        raise SamReuseError(f"{path}: a SAM 2 checkpoint, not a {model_type} one; use --model-type "
                            "sam2.1_hiera_t, _s, _b+ or _l (or sam2_hiera_* for SAM 2.0)")
    _check_keys(sam.state_dict(), state_dict, path, model_type)
    sam.load_state_dict(state_dict, strict=True)


def _check_keys(own: dict[str, Any], state_dict: dict[str, Any], path: str | Path, model_type: str) -> None:
    """One line naming what differs when a checkpoint is not of ``model_type`` (other size, other family)."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]})")
        raise SamReuseError(f"{path}: not a {model_type} checkpoint: " + ", ".join(parts))


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


