"""The decoder for apps: one embedding, K prompts per call, single or multimask, equal to SamPredictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam_reuse.base import imaging
from sam_reuse.base.records import Prompt
from sam_reuse.base.runtime import ort_session
from sam_reuse.cli import main
from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.onnx_export import APP_DECODERS


@pytest.fixture(scope="module")
def app_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    assert main(["export", "--model-type", "test_vit_b", "--out", str(out), "--verify-images", "2",
                 "--app-decoders", "single,multimask", "--no-first-order"]) == 0
    return out


def _feeds(embedding: np.ndarray, prompts: list[Prompt], hw: tuple[int, int]) -> dict[str, np.ndarray]:
    arrays = [imaging.prompt_arrays(p, hw) for p in prompts]
    return {"image_embeddings": embedding, "point_coords": np.concatenate([c for c, _ in arrays]),
            "point_labels": np.concatenate([lab for _, lab in arrays]),
            "mask_input": np.zeros((len(prompts), 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(len(prompts), np.float32)}


@pytest.mark.parametrize("kind", sorted(APP_DECODERS))
def test_k_prompts_in_one_call_equal_sam_predictor(app_export, sample_records, kind):
    """Points, boxes and points with a box, K at once, against SamPredictor.predict one prompt at a time."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(build_sam("test_vit_b"))
    session = ort_session(app_export / APP_DECODERS[kind])
    multimask = kind == "multimask"
    for record in sample_records[:2]:
        image = imaging.load_image_rgb(record.image)
        predictor.set_image(image)
        embedding = predictor.features.numpy()
        height, width = image.shape[:2]
        point = np.array([[width * 0.4, height * 0.5]])
        box = np.array([width * 0.2, height * 0.25, width * 0.7, height * 0.8])
        groups = [  # one call per number of points: K prompts of N points each
            [Prompt(points=point, labels=np.ones(1)), Prompt(box=box),
             Prompt(points=point + 40, labels=np.zeros(1))],
            [Prompt(points=point, labels=np.ones(1), box=box),
             Prompt(points=np.vstack([point, point - 60]), labels=np.array([1.0, 0.0]))],
        ]
        for prompts in groups:
            masks, scores = session.run(None, _feeds(embedding, prompts, (height, width)))
            assert masks.shape == (len(prompts), 3 if multimask else 1, 256, 256)
            for k, prompt in enumerate(prompts):
                _, expected_scores, expected_low_res = predictor.predict(
                    point_coords=prompt.points, point_labels=prompt.labels, box=prompt.box,
                    multimask_output=multimask, return_logits=True)
                np.testing.assert_allclose(masks[k], expected_low_res, atol=2e-4)
                np.testing.assert_allclose(scores[k], expected_scores, atol=2e-5)


def test_sixteen_prompts_in_one_call_equal_sixteen_calls(app_export, sample_records):
    session = ort_session(app_export / APP_DECODERS["single"])
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0)).numpy()
    rng = np.random.default_rng(0)
    prompts = [Prompt(points=rng.uniform(0, 1000, (1, 2)), labels=np.ones(1)) for _ in range(16)]
    together = session.run(None, _feeds(embedding, prompts, (1000, 1000)))[0]
    one_by_one = np.concatenate([session.run(None, _feeds(embedding, [p], (1000, 1000)))[0] for p in prompts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert np.array_equal(together > 0, one_by_one > 0)


def test_an_unknown_app_decoder_is_refused_before_export(tmp_path, capsys):
    assert main(["export", "--model-type", "test_vit_t", "--out", str(tmp_path / "o"),
                 "--app-decoders", "single,triple"]) == 2
    assert "--app-decoders: unknown kind triple (choose from single, multimask)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", sorted(APP_DECODERS))
def test_sam_model_predicts_many_prompts_like_sam_predictor(app_export, sample_records, kind):
    """SamModel.predict_many on ONNX Runtime (image in, masks out) against SamPredictor one prompt at a time;
    with the single-mask app decoder also against the search's decoder.onnx, one call per prompt."""
    from segment_anything import SamPredictor

    from sam_reuse.exporter.predictor import SamModel

    predictor = SamPredictor(build_sam("test_vit_b"))
    model = SamModel.from_onnx(app_export / "encoder.onnx", app_export / APP_DECODERS[kind])
    paired = SamModel.from_onnx(app_export / "encoder.onnx", app_export / "decoder.onnx")
    assert model.shared_embedding and not paired.shared_embedding
    image = imaging.load_image_rgb(sample_records[0].image)
    predictor.set_image(image)
    height, width = image.shape[:2]
    point = np.array([[width * 0.4, height * 0.5]])
    box = np.array([width * 0.2, height * 0.25, width * 0.7, height * 0.8])
    prompts = [Prompt(points=point, labels=np.ones(1)), Prompt(box=box),
               Prompt(points=point, labels=np.ones(1), box=box),
               Prompt(points=np.vstack([point, point - 60]), labels=np.array([1.0, 0.0])), Prompt(box=box - 30)]
    embedding = model.embed(image)
    predictions = model.predict_many(image, prompts, embedding)
    assert [len(p) for p in predictions] == [3 if kind == "multimask" else 1] * len(prompts)
    for prompt, masks in zip(prompts, predictions):
        expected_logits, expected_scores, expected_low_res = predictor.predict(
            point_coords=prompt.points, point_labels=prompt.labels, box=prompt.box,
            multimask_output=kind == "multimask", return_logits=True)
        for prediction, logits, score, low_res in zip(masks, expected_logits, expected_scores, expected_low_res):
            np.testing.assert_allclose(prediction.low_res_logits, low_res, atol=2e-3)  # ONNX vs torch encoder
            assert prediction.iou_prediction == pytest.approx(float(score), abs=1e-3)
            differ = prediction.mask != (logits > 0)
            assert np.abs(logits[differ]).max(initial=0.0) < 1e-2
    if kind == "single":
        for together, alone in zip(predictions, paired.predict_many(image, prompts, embedding)):
            np.testing.assert_allclose(together[0].low_res_logits, alone[0].low_res_logits, atol=1e-5)


def test_app_decoder_engine_has_a_profile_over_prompts_and_points(app_export, tmp_path):
    """`engine decoder.prompts.onnx --batch 1:4:16 --points 1:3:8`: K and N vary, the one embedding does not."""
    from sam_reuse.base.errors import SamReuseError
    from sam_reuse.exporter.engine import load_backend

    try:
        load_backend()
    except SamReuseError as exc:
        pytest.skip(f"no TensorRT backend: {exc}")
    engine = tmp_path / "decoder.prompts.fp16.engine"
    assert main(["engine", str(app_export / APP_DECODERS["single"]), "--out", str(engine), "--precision", "fp16",
                 "--batch", "1:4:16", "--points", "1:3:8"]) == 0
    inputs = {i["name"]: i for i in json.loads((tmp_path / f"{engine.name}.json").read_text())["inputs"]}
    assert inputs["image_embeddings"]["min"] == inputs["image_embeddings"]["max"] == [1, 256, 64, 64]
    assert (inputs["point_coords"]["min"], inputs["point_coords"]["opt"], inputs["point_coords"]["max"]) == \
        ([1, 1, 2], [4, 3, 2], [16, 8, 2])
    assert inputs["point_labels"]["max"] == [16, 8] and inputs["mask_input"]["max"] == [16, 1, 256, 256]
    assert inputs["has_mask_input"]["min"] == [1] and inputs["has_mask_input"]["max"] == [16]
