"""TensorRT engines (TensorRT-RTX builds them on this GPU-less machine), fp16 ONNX, and the LayerNorm fusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import sha256_file
from sam_reuse.base.runtime import ort_session
from sam_reuse.cli import main
from sam_reuse.exporter.engine import build_engine, engine_name, load_backend, to_fp16
from sam_reuse.graphops.fuse import fuse_decomposed_layernorm
from sam_reuse.graphops.graph import finalize, fingerprint, load_graph
from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse
from sam_reuse.graphops.rewrites import apply_reuse_map
from tests.conftest import SAMPLES


def _backend():
    try:
        return load_backend()
    except SamReuseError as exc:
        pytest.skip(f"no TensorRT backend: {exc}")


def _layernorm2d_model(exponent: float = 2.0) -> onnx.ModelProto:
    """x (1x4x3x3) -> LayerNorm2d written out as SAM exports it -> * w + b."""
    const = {"two": np.array(exponent, np.float32), "eps": np.array(1e-6, np.float32),
             "w": np.arange(1, 5, dtype=np.float32).reshape(4, 1, 1), "b": np.full((4, 1, 1), 0.5, np.float32)}
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1, name="ln/mean"),
             helper.make_node("Sub", ["x", "mean"], ["dev"], name="ln/sub"),
             helper.make_node("Pow", ["dev", "two"], ["sq"], name="ln/pow"),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[1], keepdims=1, name="ln/var"),
             helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln/add"),
             helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln/sqrt"),
             helper.make_node("Div", ["dev", "std"], ["normed"], name="ln/div"),
             helper.make_node("Mul", ["normed", "w"], ["scaled"]),
             helper.make_node("Add", ["scaled", "b"], ["y"])]
    graph = helper.make_graph(nodes, "ln2d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [numpy_helper.from_array(v, k) for k, v in const.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_fusion_of_a_written_out_layernorm_equals_the_numpy_reference():
    x = np.random.default_rng(0).normal(0, 300, (1, 4, 3, 3)).astype(np.float32)  # large, like SAM's neck
    graph = load_graph(_layernorm2d_model())
    assert fuse_decomposed_layernorm(graph) == 1
    fused = finalize(graph)
    assert [n.op_type for n in fused.graph.node] == ["Transpose", "LayerNormalization", "Transpose", "Mul", "Add"]
    mean = x.mean(axis=1, keepdims=True)
    reference = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + 1e-6)
    reference = reference * np.arange(1, 5).reshape(1, 4, 1, 1) + 0.5
    got = ort_session(fused.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    cubed = load_graph(_layernorm2d_model(exponent=3.0))
    assert fuse_decomposed_layernorm(cubed) == 0  # not a variance: left alone


def test_fp16_mobilesam_keeps_the_embedding_and_the_masks(mobilesam_export, sample_records):
    """fp16 ONNX (fp32 LayerNorms/softmax), run on ONNX Runtime CPU, against fp32: embedding and final masks."""
    from sam_reuse.base.imaging import load_image_rgb, preprocess
    from sam_reuse.calibrate.data import load_sample
    from sam_reuse.calibrate.evaluator import MaskEvaluator

    encoder = onnx.load(str(mobilesam_export.encoder))
    graph = load_graph(encoder)
    assert fuse_decomposed_layernorm(graph) == 2  # the neck's two LayerNorm2d
    fp16_encoder = ort_session(to_fp16(encoder).SerializeToString())
    fp32_encoder = ort_session(str(mobilesam_export.encoder))
    samples = [load_sample(r) for r in sample_records[:3]]
    emb32, emb16 = [], []
    for sample in samples:
        image = preprocess(load_image_rgb(sample.record.image))
        emb32.append(fp32_encoder.run(None, {"image": image})[0][0])
        emb16.append(fp16_encoder.run(None, {"image": image})[0][0])
    emb32, emb16 = np.stack(emb32), np.stack(emb16)
    assert np.abs(emb16 - emb32).max() < 1e-2 * np.abs(emb32).max()  # an all-fp16 neck is off by 200%
    decoder16 = to_fp16(onnx.load(str(mobilesam_export.decoder)))
    ious32 = MaskEvaluator(str(mobilesam_export.decoder), samples, emb32).ious()
    ious16 = MaskEvaluator(decoder16, samples, emb16).ious()
    np.testing.assert_allclose(ious16, ious32, atol=0.02)


def _check_sidecar(sidecar: dict, onnx_path: Path, engine: Path, precision: str, backend) -> None:
    model = onnx.load(str(onnx_path), load_external_data=False)
    assert sidecar["backend"] == backend.name and sidecar["backend_version"] == backend.version
    assert sidecar["precision"] == precision
    assert sidecar["source_onnx_sha256"] == sha256_file(onnx_path)
    assert sidecar["engine_sha256"] == sha256_file(engine) and sidecar["engine_bytes"] == engine.stat().st_size
    assert [i["name"] for i in sidecar["inputs"]] == [i.name for i in model.graph.input]
    assert [o["name"] for o in sidecar["outputs"]] == [o.name for o in model.graph.output]
    assert all(i["dtype"] == "float32" for i in sidecar["inputs"])  # fp16 engines keep fp32 I/O


@pytest.mark.parametrize("model_type", ["test_vit_t", "test_vit_b"])
def test_tiny_engines_build_with_sidecars(tiny_exports, tmp_path, model_type):
    backend = _backend()
    export = tiny_exports[model_type]
    for precision in ("fp32", "fp16"):
        for source in (export.encoder, export.decoder):
            engine = tmp_path / f"{Path(source).stem}.{precision}.engine"
            sidecar = build_engine(source, engine, precision, points=(1, 2, 8), backend=backend)
            _check_sidecar(sidecar, Path(source), engine, precision, backend)
    decoder_inputs = {i["name"]: i for i in sidecar["inputs"]}
    assert decoder_inputs["point_coords"]["min"] == [1, 1, 2] and decoder_inputs["point_coords"]["max"] == [1, 8, 2]
    assert decoder_inputs["point_coords"]["shape"] == [-1, -1, 2]


def test_mobilesam_original_and_tuned_engines_build(mobilesam_export, tmp_path, capsys):
    backend = _backend()
    encoder = mobilesam_export.encoder
    reuse = ReuseMap(fingerprint(str(encoder)), {"embedding": SiteReuse("image_embeddings", 1, 256, ((18, 178), (85, 118)))})
    tuned, _ = apply_reuse_map(encoder, reuse)
    onnx.save(tuned, str(tmp_path / "encoder.tuned.onnx"))
    for source, precision in ((encoder, "fp32"), (tmp_path / "encoder.tuned.onnx", "fp16"),
                              (mobilesam_export.decoder, "fp16")):
        engine = tmp_path / f"{Path(source).name}.{precision}.engine"
        assert main(["engine", str(source), "--out", str(engine), "--precision", precision]) == 0
        _check_sidecar(json.loads(Path(f"{engine}.json").read_text()), Path(source), engine,
                       precision, backend)
    assert "tensorrt" in capsys.readouterr().out


def test_engine_errors_name_the_problem_and_write_nothing(tmp_path, capsys):
    _backend()
    model = _layernorm2d_model()
    model.graph.node[0].op_type = "NoSuchOp"  # an op no TensorRT parser knows
    model.graph.node[0].domain = "com.example.custom"
    model.opset_import.append(helper.make_opsetid("com.example.custom", 1))
    onnx.save(model, str(tmp_path / "custom.onnx"))
    engine = tmp_path / "custom.engine"
    assert main(["engine", str(tmp_path / "custom.onnx"), "--out", str(engine)]) == 2
    assert "custom.onnx: tensorrt" in capsys.readouterr().err
    assert not engine.exists() and not Path(f"{engine}.json").exists()
    good = tmp_path / "ln.onnx"
    onnx.save(_layernorm2d_model(), str(good))
    for bad, message in ((["--points", "3:2:1"], "need 1 <= MIN <= OPT <= MAX"),
                         (["--compute-capability", "9.9"], "is not a target"),
                         (["--batch", "x"], "expected MIN:OPT:MAX")):
        assert main(["engine", str(good), *bad]) == 2
        assert message in capsys.readouterr().err
    assert not engine_name(good, "fp32").exists()
    assert engine_name(Path("out/encoder.tuned.onnx"), "fp16") == Path("out/encoder.tuned.fp16.engine")


def test_run_without_tensorrt_still_delivers_the_onnx_models(tmp_path, capsys, monkeypatch):
    from sam_reuse.exporter import engine

    def missing(name="auto"):
        raise SamReuseError(engine.ENABLE_HINT)

    monkeypatch.setattr(engine, "load_backend", missing)
    out = tmp_path / "run"
    argv = ["--model-type", "test_vit_t", "--out", str(out), "--data", str(SAMPLES), "--search-images", "2",
            "--holdout-images", "2", "--targets", "0-2", "--sources", "3-4", "--overlays", "0", "--no-progress",
            "--cache-dir", str(tmp_path / "cache"), "--verify-images", "1", "--ship-anyway", "--strategy", "fast"]
    assert main(argv) == 0  # the tuned candidate ships (forced): its engines would be due
    assert "engines skipped: TensorRT engines need TensorRT or TensorRT-RTX: pip install 'sam-reuse[trt]'" in \
        capsys.readouterr().out
    assert (out / "encoder.tuned.onnx").exists() and not list(out.glob("*.engine"))


def test_onnx_model_predicts_like_the_search_evaluator(mobilesam_export, sample_records):
    """SamModel (the runtime wrapper) on ONNX Runtime: the same mask the tuner scores.

    The tuner's decoder carries a Gather on its input (``graphops.probe``), so ONNX Runtime plans it a
    little differently: logits agree to about 1e-5, and a mask pixel may flip only where its logit is
    within rounding of 0 (seen: one pixel of 1,048,576, logit 1.1e-7).
    """
    from sam_reuse.base.imaging import load_image_rgb, upscale_logits
    from sam_reuse.calibrate.activations import encode
    from sam_reuse.calibrate.data import load_sample
    from sam_reuse.calibrate.evaluator import MaskEvaluator
    from sam_reuse.exporter.predictor import SamModel

    model = SamModel.from_onnx(mobilesam_export.encoder, mobilesam_export.decoder)
    samples = [load_sample(r) for r in sample_records[:2]]
    evaluator = MaskEvaluator(str(mobilesam_export.decoder), samples,
                              encode(mobilesam_export.encoder, samples, progress=False))
    for i, sample in enumerate(samples):
        prediction = model.predict(load_image_rgb(sample.record.image), sample.prompt)
        searched = evaluator.low_res_logits(rows=[i])[0]
        np.testing.assert_allclose(prediction.low_res_logits, searched, rtol=0, atol=1e-4)
        differ = prediction.mask != evaluator.predicted_mask(searched, i)
        assert differ.sum() <= 10 and np.abs(upscale_logits(searched, sample.hw)[differ]).max(initial=0.0) < 1e-4
        assert prediction.mask.shape == sample.hw and 0 < prediction.iou_prediction <= 1.5


def test_engines_run_like_onnx_runtime_on_a_gpu(mobilesam_export, sample_records, tmp_path, capsys):
    """Engine vs ONNX Runtime (verify-engine, polygraphy) and the runtime wrapper; without a GPU, a clear error."""
    from sam_reuse.base.imaging import load_image_rgb
    from sam_reuse.calibrate.data import load_sample
    from sam_reuse.exporter.engine import gpu_available
    from sam_reuse.exporter.predictor import SamModel

    _backend()
    engines = {}
    for name in ("encoder", "decoder"):
        engines[name] = tmp_path / f"{name}.fp32.engine"
        build_engine(getattr(mobilesam_export, name), engines[name], "fp32")
    if not gpu_available():
        assert main(["verify-engine", str(engines["encoder"]), "--images", "1"]) == 2
        assert "needs an NVIDIA GPU" in capsys.readouterr().err
        with pytest.raises(SamReuseError, match="needs an NVIDIA GPU"):
            SamModel.from_engines(engines["encoder"], engines["decoder"])
        pytest.skip("engines built and refused cleanly; running them needs an NVIDIA GPU")
    for engine in engines.values():
        assert main(["verify-engine", str(engine), "--images", "2"]) == 0
    sample = load_sample(sample_records[0])
    image = load_image_rgb(sample.record.image)
    on_gpu = SamModel.from_engines(engines["encoder"], engines["decoder"]).predict(image, sample.prompt)
    on_cpu = SamModel.from_onnx(mobilesam_export.encoder, mobilesam_export.decoder).predict(image, sample.prompt)
    intersection = np.logical_and(on_gpu.mask, on_cpu.mask).sum()
    assert intersection / np.logical_or(on_gpu.mask, on_cpu.mask).sum() > 0.98
