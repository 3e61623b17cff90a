"""`export-and-tune verify`: polygraphy passes exact rewrites and fails loudly on a wrong one."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from sam_reuse.cli import main
from sam_reuse.graphops.graph import fingerprint
from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse
from sam_reuse.graphops.rewrites import apply_reuse_map
from sam_reuse.graphops.sites import sites_of
from tests.conftest import SAMPLES


def _map(encoder, mlp_pairs) -> ReuseMap:
    sites = sites_of(encoder)
    mlp = sites["mlp.0"]
    return ReuseMap(fingerprint(str(encoder)), {
        "embedding": SiteReuse("image_embeddings", 1, 256, ((1, 2), (3, 4))),
        "mlp.0": SiteReuse(mlp.tensor, mlp.axis, mlp.channels, tuple(mlp_pairs)),
    })


def test_verify_passes_exact_rewrites_and_fails_wrong_ones(tiny_exports, tmp_path, capsys):
    encoder = tiny_exports["test_vit_t"].encoder
    tuned, applied = apply_reuse_map(encoder, _map(encoder, [(0, 5), (7, 2)]))
    assert applied == {"embedding": "gather", "mlp.0": "prune"}
    onnx.save(tuned, str(tmp_path / "tuned.onnx"))
    base = ["verify", str(tmp_path / "tuned.onnx"), "--reference", str(encoder), "--data", str(SAMPLES),
            "--images", "1"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "verify passed" in out and "image_embeddings: max |tuned - reference|" in out

    # The model does one thing, the map it is checked against says another.
    wrong = tmp_path / "wrong_map.json"
    _map(encoder, [(0, 6), (7, 2)]).save(wrong)
    assert main(base + ["--reuse-map", str(wrong)]) == 1
    assert "verify FAILED" in capsys.readouterr().err

    # A corrupted weight in the rewritten graph (noise, not a scale: LayerNorm would undo a scale).
    broken = onnx.load(str(tmp_path / "tuned.onnx"))
    weight = max(broken.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).normal(0, values.std() * 0.5, values.shape).astype(values.dtype)
    weight.CopyFrom(numpy_helper.from_array(values + noise, weight.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    assert main(["verify", str(tmp_path / "broken.onnx")] + base[2:]) == 1


def test_verify_needs_a_map(tiny_exports, capsys):
    encoder = tiny_exports["test_vit_t"].encoder
    assert main(["verify", str(encoder), "--reference", str(encoder), "--images", "1"]) == 2
    assert "no reuse map in the model's metadata; pass --reuse-map" in capsys.readouterr().err
