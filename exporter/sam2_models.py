"""Build SAM 2 / 2.1 image models (no video memory) from Meta's ``sam2`` package, without hydra.

The image path of ``SAM2ImagePredictor`` uses the Hiera trunk, the FPN neck,
the prompt encoder, the mask decoder (with its high-resolution projections
``conv_s0``/``conv_s1``) and ``no_mem_embed``; the memory attention and memory
encoder serve video only and are not built. The hyper-parameters below are
those of ``sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml`` (the 2.0 configs
have the same image path; they differ in memory and object-pointer options),
with Hiera's defaults for what a config leaves out. Instantiating the classes
directly, rather than through ``build_sam2``, keeps hydra's global state out
of the exporter and lets a test build a shrunken config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sam_reuse.base.errors import SamReuseError

# Hiera trunk arguments per size; anything not given is Hiera's default (stages 2,3,16,3, global attention
# blocks 12,16,20, window spec 8,4,14,7, background position-embedding grid 14x14).
HIERA_TRUNKS: dict[str, dict[str, Any]] = {
    "t": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
              window_pos_embed_bkg_spatial_size=(7, 7)),
    "s": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
              window_pos_embed_bkg_spatial_size=(7, 7)),
    "b+": dict(embed_dim=112, num_heads=2),
    "l": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
              window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
    # Test configs, 6 blocks with one global, each keeping what sets its size's code path apart: t/s (one head,
    # windows 14 and 7 on the 64x64 and 32x32 stages: padded), b+ (two heads, a 14x14 background position
    # grid) and l (windows 16 and 8: no padding). Neck and decoder keep their full width (the 256x64x64
    # embedding).
    "test_t": dict(embed_dim=16, num_heads=1, stages=(1, 1, 3, 1), global_att_blocks=(3,),
                   window_pos_embed_bkg_spatial_size=(7, 7)),
    "test_b+": dict(embed_dim=16, num_heads=2, stages=(1, 1, 3, 1), global_att_blocks=(3,)),
    "test_l": dict(embed_dim=16, num_heads=2, stages=(1, 1, 3, 1), global_att_blocks=(3,),
                   window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}
# Flags of SAM2Base that change the image path; the others concern video only.
IMAGE_PATH_FLAGS = dict(image_size=1024, use_high_res_features_in_sam=True, directly_add_no_mem_embed=True,
                        iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
                        use_multimask_token_for_obj_ptr=True)
# What build_sam2(..., apply_postprocessing=True) sets, and so SAM2ImagePredictor.from_pretrained: a single mask
# request returns mask token 0 only when it is stable, else the best of the multimask tokens.
STABILITY = dict(dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05,
                 dynamic_multimask_stability_thresh=0.98)
IMAGE_PATH_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
SAM1_PREFIXES = ("image_encoder.blocks.", "image_encoder.patch_embed.", "image_encoder.layers.", "prompt_encoder.",
                 "mask_decoder.")


def build_sam2_image(size: str):
    """A ``SAM2Base`` with only the image path built, in eval mode, randomly initialised."""
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam2_base import SAM2Base

    trunk = Hiera(**HIERA_TRUNKS[size])
    neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=256, normalize=True, scale=None,
                                                           temperature=10000),
                   d_model=256, backbone_channel_list=trunk.channel_list, fpn_top_down_levels=[2, 3],
                   fpn_interp_model="nearest")
    return SAM2Base(image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=1), memory_attention=None,
                    memory_encoder=None, sam_mask_decoder_extra_args=STABILITY, **IMAGE_PATH_FLAGS).eval()


def image_path_state(state_dict: dict[str, Any], path: str | Path, model_type: str) -> dict[str, Any]:
    """The entries of a SAM 2 checkpoint that the image path uses; a SAM 1 checkpoint is refused by name."""
    if any(key.startswith(SAM1_PREFIXES) for key in state_dict):
        raise SamReuseError(f"{path}: a SAM / MobileSAM checkpoint, not a SAM 2 one (model type {model_type}); "
                            "use --model-type vit_t, vit_b, vit_l or vit_h for it")
    return {key: value for key, value in state_dict.items() if key.startswith(IMAGE_PATH_PREFIXES)}


def image_path_keys(model) -> dict[str, Any]:
    """The built model's image-path parameters and buffers (what a checkpoint must provide)."""
    return {key: value for key, value in model.state_dict().items() if key.startswith(IMAGE_PATH_PREFIXES)}
