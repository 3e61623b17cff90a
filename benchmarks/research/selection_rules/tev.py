"""Torch MobileSAM evaluator for channel-reuse maps (issue 7 research), equivalent to MaskEvaluator.

Per "view" (an image, possibly flipped, with one prompt): the cached embedding, the prompt's sparse
embedding and the ground-truth mask. ``ious(views, indices)`` decodes each (view, gather index) pair:
emb[:, index] (index 256 = an all-zero channel), mask token 0 (multimask_output=False), low-res logits
256x256, bilinear upsample to 1024 (align_corners=False), > 0, IoU against the mask (empty union: 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "out" / "selection_rules" / "pkg" / "pylib"))  # wheels for the GPU machine

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def build_sam(weights: str | Path, device: str):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam.build_sam import build_sam_vit_t
    sam = build_sam_vit_t(None)
    state = torch.load(weights, map_location="cpu")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = sam.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(('image_encoder.head.', 'image_encoder.norm_head.')) for k in missing), (missing, unexpected)
    return sam.to(device).eval()


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """1024x1024x3 uint8 -> 3x1024x1024 float32, SAM's normalisation (no resize or padding needed)."""
    assert rgb.shape == (1024, 1024, 3), rgb.shape
    return ((rgb.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)


class Engine:
    """Batched decoder runs over views that share one embedding table."""

    def __init__(self, sam, device: str, max_batch: int = 128):
        self.sam, self.device, self.max_batch = sam, device, max_batch
        dec = sam.mask_decoder
        self.dec = dec
        with torch.no_grad():
            self.image_pe = sam.prompt_encoder.get_dense_pe().to(device)  # 1x256x64x64
            self.dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(device)
        self.emb = None  # V x 257 x 64 x 64 (channel 256 all zero), one row per embedded image
        self.sparse = []  # per view: 2 x 256
        self.view_emb = []  # per view: row of self.emb
        self.view_gt = []  # per view: row of self.gt
        self.gt = None
        self.runs = 0

    @torch.no_grad()
    def encode(self, images: list[np.ndarray], batch: int = 8) -> torch.Tensor:
        """Embeddings (N x 256 x 64 x 64, float32, on device) of uint8 RGB images."""
        out = []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.stack([preprocess(im) for im in images[start:start + batch]])).to(self.device)
            out.append(self.sam.image_encoder(x).float())
        return torch.cat(out)

    def set_embeddings(self, emb: torch.Tensor, masks: torch.Tensor) -> None:
        zero = torch.zeros((emb.shape[0], 1, *emb.shape[2:]), device=emb.device, dtype=emb.dtype)
        self.emb = torch.cat([emb, zero], dim=1).contiguous()
        self.gt = masks.to(self.device)

    @torch.no_grad()
    def add_view(self, emb_row: int, gt_row: int, point: tuple[float, float] | None = None,
                 box: tuple[float, float, float, float] | None = None) -> int:
        """A view: embedding row, mask row and one prompt (a positive point, padded as SAM does, or a box)."""
        pe = self.sam.prompt_encoder
        if box is not None:
            sparse, _ = pe(points=None, boxes=torch.tensor([box], dtype=torch.float32, device=self.device), masks=None)
        else:
            coords = torch.tensor([[point]], dtype=torch.float32, device=self.device)
            labels = torch.ones((1, 1), dtype=torch.float32, device=self.device)
            sparse, _ = pe(points=(coords, labels), boxes=None, masks=None)
        assert sparse.shape == (1, 2, 256), sparse.shape
        self.sparse.append(sparse[0])
        self.view_emb.append(emb_row)
        self.view_gt.append(gt_row)
        return len(self.sparse) - 1

    def finalize_views(self) -> None:
        self._sparse = torch.stack(self.sparse)
        self._view_emb = torch.tensor(self.view_emb, device=self.device)
        self._view_gt = torch.tensor(self.view_gt, device=self.device)

    @torch.no_grad()
    def low_res(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """B x 256 x 256 logits of mask token 0 for views (B) and gather indices (B x 256)."""
        dec = self.dec
        src = self.emb[self._view_emb[views][:, None], indices]  # B x 256 x 64 x 64
        sparse = self._sparse[views]
        b = src.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        src = src + self.dense
        pos_src = self.image_pe.expand(b, -1, -1, -1)
        _, _, h, w = src.shape
        hs, src = dec.transformer(src, pos_src, tokens)
        mask_token = hs[:, 1, :]  # mask token 0 = the single-mask output
        src = src.transpose(1, 2).reshape(b, 256, h, w)
        up = dec.output_upscaling(src)
        hyper = dec.output_hypernetworks_mlps[0](mask_token)  # B x 32
        bb, c, hh, ww = up.shape
        return (hyper[:, None, :] @ up.view(bb, c, hh * ww)).view(bb, hh, ww)

    @torch.no_grad()
    def ious(self, views: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """IoU (float64) for each (view, gather index) pair."""
        out = np.empty(len(views), dtype=np.float64)
        for start in range(0, len(views), self.max_batch):
            v = torch.as_tensor(views[start:start + self.max_batch], device=self.device)
            idx = torch.as_tensor(indices[start:start + self.max_batch], device=self.device, dtype=torch.long)
            logits = self.low_res(v, idx)
            up = F.interpolate(logits[:, None], size=(1024, 1024), mode="bilinear", align_corners=False)[:, 0]
            pred = up > 0
            gt = self.gt[self._view_gt[v]]
            inter = (pred & gt).sum(dim=(1, 2)).double()
            union = pred.sum(dim=(1, 2)).double() + gt.sum(dim=(1, 2)).double() - inter
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
            out[start:start + len(v)] = iou.cpu().numpy()
        self.runs += len(views)
        return out


def load_set(folder: str | Path):
    """(meta list, masks N x 1024 x 1024 bool, image paths) of a packed set."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    masks = np.unpackbits(np.load(folder / "masks.npz")["masks"], axis=-1).astype(bool)
    return meta, masks, [folder / m["image"] for m in meta]
