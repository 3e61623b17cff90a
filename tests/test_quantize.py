"""INT8 encoders: weight MatMuls quantized, the rest float as the sidecar lists; close to fp32; refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import sha256_file
from sam_reuse.base.runtime import ort_session
from sam_reuse.cli import main
from sam_reuse.exporter.quantize import float_nodes, quantize_encoder, quantized_nodes
from sam_reuse.exporter.verify import encoder_inputs


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_int8(tiny_exports, sample_records, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    encoder = folder / "encoder.onnx"
    encoder.write_bytes(tiny_exports["test_vit_t"].encoder.read_bytes())
    sidecar = quantize_encoder(encoder, sample_records[:4], progress=False, compare_on=sample_records[12:14])
    return encoder, folder / "encoder.int8.onnx", sidecar


def test_weight_matmuls_are_int8_and_the_listed_nodes_stay_float(tiny_int8):
    encoder, int8, sidecar = tiny_int8
    original, quantized = onnx.load(str(encoder)), onnx.load(str(int8))
    assert sidecar == json.loads((int8.parent / "encoder.int8.onnx.json").read_text())
    assert sidecar["format"] == "sam-reuse/int8@1" and sidecar["source_onnx"] == "encoder.onnx"
    assert sidecar["source_onnx_sha256"] == sha256_file(encoder)
    assert sidecar["calibration_images"] == ["10", "11", "12", "13"]
    assert sidecar["quantized_nodes"] == quantized_nodes(original) and len(sidecar["quantized_nodes"]) > 0
    assert sidecar["float_nodes"] == float_nodes(original)
    producers = {o: n for n in quantized.graph.node for o in n.output}
    by_name = {n.name: n for n in quantized.graph.node}

    def dequantized_inputs(name: str) -> int:
        return sum(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                   for i in by_name[name].input)

    assert all(dequantized_inputs(name) == 2 for name in sidecar["quantized_nodes"])  # weight and activation
    assert all(dequantized_inputs(name) == 0 for names in sidecar["float_nodes"].values() for name in names)


def test_int8_embedding_stays_close_to_fp32(tiny_int8, sample_records):
    """Cosine above 0.99 on images the calibration never saw; the sidecar's polygraphy figures are the worst
    image's mean and max |diff|, as numpy computes them."""
    encoder, int8, sidecar = tiny_int8
    fp32, quantized = ort_session(encoder), ort_session(int8)
    differences = []
    for feed in encoder_inputs(sample_records[12:15]):
        expected, got = fp32.run(None, feed)[0], quantized.run(None, feed)[0]
        assert _cosine(expected, got) > 0.99
        differences.append(np.abs(got - expected))
    compared = sidecar["polygraphy"]
    assert compared["images"] == 2 and compared["passes_when"] == "mean |diff| <= 0.05"
    figures = compared["outputs"]["image_embeddings"]
    assert figures["mean_abs_diff"] == pytest.approx(max(d.mean() for d in differences[:2]), rel=1e-4)
    assert figures["max_abs_diff"] == pytest.approx(max(d.max() for d in differences[:2]), rel=1e-4)
    assert compared["passed"] == (figures["mean_abs_diff"] <= 0.05)


def test_quantize_refuses_a_decoder_a_quantized_model_and_no_images(tiny_exports, tiny_int8, sample_records,
                                                                    tmp_path):
    _, int8, _ = tiny_int8
    with pytest.raises(SamReuseError, match="decoder.onnx: not a SAM encoder"):
        quantize_encoder(tiny_exports["test_vit_t"].decoder, sample_records[:2], tmp_path / "x.onnx")
    with pytest.raises(SamReuseError, match="encoder.int8.onnx: already quantized .*DequantizeLinear"):
        quantize_encoder(int8, sample_records[:2], tmp_path / "x.onnx")
    with pytest.raises(SamReuseError, match="no calibration images"):
        quantize_encoder(tiny_exports["test_vit_t"].encoder, [], tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_real_mobilesam_int8_keeps_held_out_miou_within_half_a_point(mobilesam_export, tmp_path, capsys):
    """The bundled isic2016 images: calibrated on the first 8, scored on the last 8 (held out)."""
    encoder = tmp_path / "encoder.onnx"
    encoder.symlink_to(mobilesam_export.encoder)
    assert main(["quantize", str(encoder), "--decoder", str(mobilesam_export.decoder), "--no-progress",
                 "--search-images", "8", "--holdout-images", "8", "--cache-dir", str(tmp_path / "cache")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fp32, int8 = (float(line.split(f"{name} ")[1].split(",")[0].split(" ")[0]) for name in ("fp32", "int8"))
    assert line.startswith("held-out split (8 images)") and abs(int8 - fp32) <= 0.5, line
    sidecar = json.loads((tmp_path / "encoder.int8.onnx.json").read_text())
    assert sidecar["polygraphy"]["images"] == 4 and sidecar["polygraphy"]["passed"], sidecar["polygraphy"]
    assert sidecar["held_out"] == {"images": 8, "fp32_miou": pytest.approx(fp32, abs=0.005),
                                   "int8_miou": pytest.approx(int8, abs=0.005)}


def test_an_encoder_saved_with_external_data_quantizes_to_one_with_external_data(tiny_exports, sample_records,
                                                                                  tmp_path):
    """Models over 2 GB (SAM ViT-H) must keep their weights outside the .onnx: the INT8 encoder does too."""
    source = tmp_path / "external" / "encoder.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(str(tiny_exports["test_vit_t"].encoder)), str(source), save_as_external_data=True,
              all_tensors_to_one_file=True, location="encoder.weights", size_threshold=0)
    out = tmp_path / "int8" / "encoder.int8.onnx"
    out.parent.mkdir()
    quantize_encoder(source, sample_records[:2], out, progress=False)
    assert (out.parent / "encoder.int8.onnx.data").is_file() and not list(out.parent.glob(".prepared*"))
    image = np.zeros((1, 3, 1024, 1024), np.float32)
    np.testing.assert_allclose(ort_session(out).run(None, {"image": image})[0],
                               ort_session(source).run(None, {"image": image})[0], atol=0.2)
