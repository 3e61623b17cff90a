"""Local CPU check: torch evaluator (tev.Engine) against the project's MaskEvaluator on a few images and maps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tev  # noqa: E402
from calibrate.activations import encode  # noqa: E402
from calibrate.data import load_sample, read_manifest  # noqa: E402
from calibrate.evaluator import MaskEvaluator  # noqa: E402
from graphops.reuse_map import reuse_index  # noqa: E402

torch.set_num_threads(1)
N = 4
records = read_manifest(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "isic2016")[:N]
samples = [load_sample(r) for r in records]
ort_emb = encode("out/demo/encoder.onnx", samples, progress=False)
ev = MaskEvaluator("out/demo/decoder.onnx", samples, ort_emb)
maps = {"identity": np.arange(256), "zero 5,77": reuse_index(256, [(5, 256), (77, 256)]),
        "pairs": reuse_index(256, [(3, 100), (50, 7), (200, 31)])}
ref = {k: ev.ious(m) for k, m in maps.items()}

meta, masks, paths = tev.load_set(tev.HERE.parents[2] / "out" / "selection_rules" / "data" / "isic2016")
assert all(np.array_equal(masks[i], samples[i].mask) for i in range(N))
results = {}
for label, weights in (("fp16 weights", tev.HERE.parents[2] / "out" / "selection_rules" / "pkg" / "mobile_sam_fp16.pt"),
                       ("fp32 weights", Path.home() / ".cache/sam-reuse/weights/mobile_sam.pt")):
    sam = tev.build_sam(weights, "cpu")
    eng = tev.Engine(sam, "cpu", max_batch=4)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:N]]
    t_emb = eng.encode(images, batch=1)
    print(label, "torch vs ORT embedding: max abs diff %.2e (embedding scale %.2f)"
          % ((t_emb - torch.from_numpy(ort_emb)).abs().max(), t_emb.abs().max()))
    for emb_label, emb in (("ORT emb", torch.from_numpy(np.ascontiguousarray(ort_emb))), ("torch emb", t_emb)):
        eng = tev.Engine(sam, "cpu", max_batch=4)
        eng.set_embeddings(emb, torch.from_numpy(masks[:N]))
        for i in range(N):
            eng.add_view(i, i, point=tuple(meta[i]["point"]))
        eng.finalize_views()
        for k, m in maps.items():
            got = eng.ious(np.arange(N), np.tile(m, (N, 1)))
            print(f"  {emb_label:9s} {k:10s} ref {np.round(ref[k], 4)} torch {np.round(got, 4)} "
                  f"max|diff| {np.abs(got - ref[k]).max():.1e}")
