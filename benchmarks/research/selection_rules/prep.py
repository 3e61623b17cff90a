"""Issue 7 research: pack data and weights for the lent GPU (run locally, once).

out/selection_rules/data/<set>/ (ignored by git; the data terms forbid copies in the project): the original JPEG images (unchanged bytes), masks.npz (masks binarised by the
project's rule, bit-packed), meta.json (keys, given point, mask box, two extra interior points).
out/selection_rules/pkg/mobile_sam_fp16.pt: MobileSAM state dict stored as float16 (converted back to float32 on the device).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from calibrate.data import bounding_box, load_mask, read_manifest
from calibrate.evidence import spread_points

REPO = Path(__file__).resolve().parents[3]
ROOT = REPO / "out" / "selection_rules"  # what the GPU machine is given (run's carry)
SETS = ("isic2016", "kvasir-seg", "camo")


def pack_set(name: str) -> None:
    folder = REPO.parent / "shared" / "data" / name
    out = ROOT / "data" / name
    out.mkdir(parents=True, exist_ok=True)
    records = read_manifest(folder)
    masks, meta = [], []
    for rec in records:
        mask = load_mask(rec.mask)
        assert mask.shape == (1024, 1024) and mask.any(), rec.key
        shutil.copyfile(rec.image, out / rec.image.name)
        pt = [float(v) for v in rec.points[0]]
        assert rec.points.shape == (1, 2) and float(rec.labels[0]) == 1.0
        meta.append({"key": rec.key, "image": rec.image.name, "point": pt, "box": list(bounding_box(mask)),
                     "extra": [list(p) for p in spread_points(mask, [(pt[0], pt[1])], 2)]})
        masks.append(np.packbits(mask, axis=-1))
    np.savez_compressed(out / "masks.npz", masks=np.stack(masks))
    (out / "meta.json").write_text(json.dumps(meta))
    print(name, len(meta), flush=True)


def pack_weights() -> None:
    import torch
    state = torch.load(Path.home() / ".cache/sam-reuse/weights/mobile_sam.pt", map_location="cpu")
    # big tensors float16, small ones (norms, biases, attention biases) float32; the unused classifier head dropped
    half = {k: (v.half() if v.is_floating_point() and v.numel() >= 20000 else v) for k, v in state.items()
            if not k.startswith(("image_encoder.head.", "image_encoder.norm_head."))}
    (ROOT / "pkg").mkdir(parents=True, exist_ok=True)
    torch.save(half, ROOT / "pkg" / "mobile_sam_fp16.pt")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if arg == "weights":
            pack_weights()
        else:
            pack_set(arg)
