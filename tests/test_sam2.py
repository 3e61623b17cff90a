"""SAM 2 image models: exports agree with torch and with SAM2ImagePredictor; wrong checkpoints are one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from sam_reuse.base import imaging
from sam_reuse.base.contract import (
    CONVENTION_PROPERTY,
    EMBEDDING,
    SAM2_DECODER_INPUTS,
    SAM2_ENCODER_OUTPUTS,
    decoder_feeds,
)
from sam_reuse.base.runtime import ort_session
from sam_reuse.calibrate.activations import encode_tensors
from sam_reuse.calibrate.data import load_calibration
from sam_reuse.calibrate.evaluator import MaskEvaluator
from sam_reuse.calibrate.suffix import SuffixEmbedder
from sam_reuse.calibrate.tune import TuneSettings, evaluate, tune
from sam_reuse.cli import main
from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.onnx_export import export_identity
from sam_reuse.exporter.sam2_export import export_sam2
from sam_reuse.exporter.sam2_models import image_path_keys
from sam_reuse.exporter.sam2_wrappers import Sam2SingleMaskDecoder
from sam_reuse.graphops.graph import fingerprint, load_graph
from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse
from sam_reuse.graphops.rewrites import apply_reuse_map
from sam_reuse.graphops.sites import find_sites
from tests import synthetic
from tests.conftest import SAMPLES

TEST_TYPES = ["test_sam2", "test_sam2_b+", "test_sam2_l"]  # the sam2_exports fixture (conftest)


def _predictor(sam2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        return SAM2ImagePredictor(sam2)


def _check_parity(info: dict) -> None:
    parity = info["parity"]
    assert parity["reference"] == "SAM2ImagePredictor" and parity["images"] >= 1
    assert parity["encoder_max_abs_diff"] < 1e-4 and parity["decoder_max_abs_diff"] < 1e-4
    assert parity["predictor_max_abs_diff"] < 1e-4 and parity["min_mask_iou"] > 0.9999


@pytest.mark.parametrize("model_type", TEST_TYPES)
def test_each_sam2_size_exports_with_parity_recorded(sam2_exports, model_type):
    export = sam2_exports[model_type]
    sidecar = json.loads(export.sidecar.read_text())
    assert sidecar["model_type"] == model_type and sidecar["convention"] == imaging.SAM2
    _check_parity(sidecar)
    encoder_io, decoder_io = sidecar["models"]["encoder"], sidecar["models"]["decoder"]
    assert [o["name"] for o in encoder_io["outputs"]] == list(SAM2_ENCODER_OUTPUTS)
    assert [o["shape"] for o in encoder_io["outputs"]] == [["batch", 256, 64, 64], ["batch", 32, 256, 256],
                                                           ["batch", 64, 128, 128]]
    assert [i["name"] for i in decoder_io["inputs"]] == list(SAM2_DECODER_INPUTS)
    assert decoder_io["outputs"][0]["shape"] == ["batch", 1, 256, 256]
    for path in (export.encoder, export.decoder):
        model = onnx.load(str(path))
        assert {p.key: p.value for p in model.metadata_props}[CONVENTION_PROPERTY] == imaging.SAM2
        # no control flow; Hiera's position embedding is computed from constants, not traced shapes
        assert not [n for n in model.graph.node if n.op_type in ("If", "Loop")]
    assert "first_order" not in sidecar["models"] and "not exported" in sidecar["first_order"]


PROMPTS = {
    "point": lambda r: imaging.Prompt(r.points, r.labels),
    "points": lambda r: imaging.Prompt(np.vstack([r.points, r.points + 150]), np.array([1.0, 0.0])),
    "box": lambda r: imaging.Prompt(box=np.array([200.0, 150.0, 800.0, 900.0])),
    "box+point": lambda r: imaging.Prompt(r.points, r.labels, np.array([200.0, 150.0, 800.0, 900.0])),
}


def test_single_mask_equals_sam2_image_predictor(sam2_exports, sample_records):
    """The whole ONNX path (preprocess, encoder, decoder, upscale) against predict(multimask_output=False) for
    every prompt form, on square images and non-square crops (both sides stretched by different factors)."""
    sam2 = build_sam("test_sam2")
    predictor = _predictor(sam2)
    encoder, decoder = ort_session(sam2_exports["test_sam2"].encoder), ort_session(sam2_exports["test_sam2"].decoder)
    for record in sample_records[1:2]:  # not the image the export was verified on
        whole = imaging.load_image_rgb(record.image)
        for image in (whole, np.ascontiguousarray(whole[100:813, 37:1000])):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                predictor.set_image(image)
            features = encoder.run(list(SAM2_ENCODER_OUTPUTS),
                                   {"image": imaging.preprocess(image, convention=imaging.SAM2)})
            for make_prompt in PROMPTS.values():
                prompt = make_prompt(record)
                masks, scores, _ = predictor.predict(prompt.points, prompt.labels, prompt.box,
                                                     multimask_output=False, return_logits=True)
                coords, labels = imaging.prompt_arrays(prompt, image.shape[:2], convention=imaging.SAM2)
                logits, iou = decoder.run(None, decoder_feeds(features[0], coords, labels, high_res=features[1:]))
                ours = imaging.upscale_logits(logits, image.shape[:2], convention=imaging.SAM2)[0, 0]
                assert np.abs(ours - masks[0]).max() < 1e-4
                assert imaging.binary_iou(ours > 0, masks[0] > 0, empty=1.0) > 0.9999
                np.testing.assert_allclose(iou[0], scores, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_the_single_mask_choice_follows_sam2_on_both_branches(sample_records, threshold):
    """Threshold 0: mask token 0 always counts as stable; 1.01: never, so the best multimask token is returned."""
    sam2 = build_sam("test_sam2")
    sam2.sam_mask_decoder.dynamic_multimask_stability_thresh = threshold
    predictor, wrapper = _predictor(sam2), Sam2SingleMaskDecoder(sam2).eval()
    record = sample_records[0]
    image = imaging.load_image_rgb(record.image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor.set_image(image)
        _, scores, low_res = predictor.predict(record.points, record.labels, multimask_output=False,
                                               return_logits=True)
    features = predictor._features
    coords, labels = imaging.prompt_arrays(record.prompt, image.shape[:2], convention=imaging.SAM2)
    with torch.no_grad():
        logits, iou = wrapper(features["image_embed"], *features["high_res_feats"], torch.from_numpy(coords),
                              torch.from_numpy(labels), torch.zeros(1, 1, 256, 256), torch.zeros(1))
        all_masks, all_ious = wrapper.all_masks(features["image_embed"], *features["high_res_feats"],
                                                torch.from_numpy(coords), torch.from_numpy(labels),
                                                torch.zeros(1, 1, 256, 256), torch.zeros(1))
    token = 0 if threshold == 0.0 else 1 + int(all_ious[0, 1:].argmax())
    np.testing.assert_allclose(logits[0, 0].numpy(), all_masks[0, token].numpy())
    np.testing.assert_allclose(np.clip(logits[0].numpy(), -32, 32), low_res, atol=1e-5)
    np.testing.assert_allclose(iou[0].numpy(), scores, atol=1e-6)


def test_the_real_hiera_t_architecture_exports_with_parity(tmp_path, sample_records):
    """sam2.1_hiera_t at full size with random weights (no SAM 2 weights can be downloaded here)."""
    sam2 = build_sam("sam2.1_hiera_t", random_weights=True)
    result = export_sam2(sam2, tmp_path, sample_records[:1], export_identity("sam2.1_hiera_t", None, 0, "legacy", 17))
    _check_parity(result.info)


@pytest.mark.parametrize("size", ["t", "s", "b+", "l"])
def test_each_sam2_1_size_has_the_image_path_of_meta_s_config(size):
    """Built without hydra, every image-path tensor has the name and shape ``build_sam2`` gives it from the 2.1
    config, so a real checkpoint of that size loads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sam2.build_sam import build_sam2

        reference = build_sam2(f"configs/sam2.1/sam2.1_hiera_{size}.yaml", ckpt_path=None, device="cpu")
    ours = build_sam(f"sam2.1_hiera_{size}", random_weights=True)
    shapes = {name: tuple(value.shape) for name, value in image_path_keys(ours).items()}
    assert shapes == {name: tuple(value.shape) for name, value in image_path_keys(reference).items()}
    assert [block.window_size for block in ours.image_encoder.trunk.blocks] == [
        block.window_size for block in reference.image_encoder.trunk.blocks]


def test_app_decoders_and_sam_model_equal_sam2_image_predictor(tmp_path, sample_records):
    """SamModel.predict_many on a SAM 2 export, with the app decoders (K prompts per call) and with the
    search's decoder (one call per prompt), against SAM2ImagePredictor.predict one prompt at a time."""
    from sam_reuse.exporter.onnx_export import APP_DECODERS
    from sam_reuse.exporter.predictor import SamModel

    out = tmp_path / "app"
    assert main(["export", "--model-type", "test_sam2", "--out", str(out), "--verify-images", "1",
                 "--app-decoders", "single,multimask"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert all(info["models"][f"decoder.prompts.{kind}"]["max_abs_diff_vs_torch"] < 1e-4 for kind in APP_DECODERS)
    predictor = _predictor(build_sam("test_sam2"))
    record = sample_records[1]
    image = np.ascontiguousarray(imaging.load_image_rgb(record.image)[100:813, 37:1000])  # stretched unevenly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor.set_image(image)
    prompts = [make_prompt(record) for make_prompt in PROMPTS.values()] + [PROMPTS["point"](record)]
    paired = SamModel.from_onnx(out / "encoder.onnx", out / "decoder.onnx")
    features = paired.embed(image)
    assert list(features) == list(SAM2_ENCODER_OUTPUTS) and paired.convention == imaging.SAM2
    for kind, path in [("single", out / "decoder.onnx")] + [(kind, out / file) for kind, file in APP_DECODERS.items()]:
        model = SamModel.from_onnx(out / "encoder.onnx", path)
        assert model.shared_embedding == (path.name != "decoder.onnx")
        multimask = kind == "multimask"
        for prompt, predictions in zip(prompts, model.predict_many(image, prompts, features)):
            masks, scores, _ = predictor.predict(prompt.points, prompt.labels, prompt.box,
                                                 multimask_output=multimask, return_logits=True)
            assert len(predictions) == (3 if multimask else 1)
            for prediction, mask, score in zip(predictions, masks, scores):
                ours = imaging.upscale_logits(prediction.low_res_logits, image.shape[:2], imaging.SAM2)
                assert np.abs(ours - mask).max() < 1e-4
                assert imaging.binary_iou(prediction.mask, mask > 0, empty=1.0) > 0.9999
                assert prediction.iou_prediction == pytest.approx(float(score), abs=1e-5)


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export-and-tune: error: "), err
    return err[0]


def test_wrong_checkpoints_and_options_are_one_line(tmp_path, capsys):
    sam1 = tmp_path / "mobile_sam.pt"
    torch.save(build_sam("test_vit_t").state_dict(), sam1)
    small_sam2 = tmp_path / "sam2_test.pt"
    torch.save({"model": build_sam("test_sam2").state_dict()}, small_sam2)
    out = tmp_path / "out"
    export = ["export", "--out", str(out), "--model-type"]
    assert "mobile_sam.pt: a SAM / MobileSAM checkpoint, not a SAM 2 one (model type sam2.1_hiera_t)" in _cli_error(
        capsys, export + ["sam2.1_hiera_t", "--checkpoint", str(sam1)])
    assert "sam2_test.pt: not a sam2.1_hiera_t checkpoint: " in _cli_error(
        capsys, export + ["sam2.1_hiera_t", "--checkpoint", str(small_sam2)])
    assert "sam2_test.pt: a SAM 2 checkpoint, not a vit_t one" in _cli_error(
        capsys, export + ["vit_t", "--checkpoint", str(small_sam2)])
    assert not out.exists()


def test_tune_on_a_sam2_pair_feeds_its_features_and_finds_the_planted_pair(tmp_path, capsys):
    """The planted task as a SAM 2 export: the search feeds each image's high-resolution features with its
    embedding, finds TARGET <- HELPER, and the tuned encoder keeps the export's convention and features."""
    encoder, decoder = synthetic.write_sam2_models(tmp_path / "models")
    data = synthetic.write_dataset(tmp_path / "data", 12)
    settings = TuneSettings(evidence="given", top_n=3, overlays=0, progress=False, cache_dir=str(tmp_path / "cache"))
    result = tune(encoder, decoder, data, tmp_path / "out", settings)
    assert "SAM 2 exports have no first-order scorer" in capsys.readouterr().out
    assert result.reuse_map.sites["embedding"].pairs == ((synthetic.TARGET, synthetic.HELPER),)
    report = result.report.to_json()
    assert report["settings"]["strategy"] == "fast" and report["shipping"]["shipped"] == "tuned"
    assert report["held_out"]["baseline_miou"] < 5 and report["held_out"]["tuned_miou"] > 90
    tuned_path = tmp_path / "out" / "encoder.tuned.onnx"
    tuned = onnx.load(str(tuned_path))
    assert {p.key: p.value for p in tuned.metadata_props}[CONVENTION_PROPERTY] == imaging.SAM2
    assert [o.name for o in tuned.graph.output] == list(SAM2_ENCODER_OUTPUTS)
    held = evaluate(tuned_path, decoder, data, settings=settings)
    assert held.miou == pytest.approx(report["held_out"]["tuned_miou"], abs=1e-9)
    capsys.readouterr()
    assert main(["verify", str(tuned_path), "--reference", str(encoder), "--data", str(data), "--images", "2"]) == 0
    assert "high_res_feats_0: max |tuned - reference| 0.00e+00" in capsys.readouterr().out


def test_the_evaluator_gives_each_prompt_its_own_image_features(tmp_path):
    """Batched scoring equals one decoder run per image with that image's own features (and not another's)."""
    encoder, decoder = synthetic.write_sam2_models(tmp_path / "models")
    samples = load_calibration(synthetic.write_dataset(tmp_path / "data", 6, seed=4), search_images=6,
                               holdout_images=0).search
    values = encode_tensors(onnx.load(str(encoder)), samples, list(SAM2_ENCODER_OUTPUTS), tmp_path / "cache",
                            progress=False)
    features = {name: values[name] for name in SAM2_ENCODER_OUTPUTS[1:]}
    evaluator = MaskEvaluator(decoder, samples, np.stack(values[EMBEDDING]), batch_size=4, features=features,
                              convention=imaging.SAM2)
    batched = evaluator.low_res_logits()
    session = ort_session(decoder)
    for row, sample in enumerate(samples):
        coords, labels = imaging.prompt_arrays(sample.prompt, sample.hw, convention=imaging.SAM2)
        own = [values[name][row][None] for name in SAM2_ENCODER_OUTPUTS]
        other = [own[0], *(values[name][(row + 1) % len(samples)][None] for name in SAM2_ENCODER_OUTPUTS[1:])]
        alone = session.run(["low_res_masks"], decoder_feeds(own[0], coords, labels, high_res=own[1:]))[0][0, 0]
        swapped = session.run(["low_res_masks"], decoder_feeds(other[0], coords, labels, high_res=other[1:]))[0][0, 0]
        np.testing.assert_array_equal(batched[row], alone)
        assert np.abs(swapped - alone).max() > 1.0


def test_a_sam_encoder_with_a_sam2_decoder_is_one_line(tmp_path, capsys):
    sam1_encoder, _ = synthetic.write_models(tmp_path / "sam1")
    sam2_encoder, sam2_decoder = synthetic.write_sam2_models(tmp_path / "sam2")
    data = synthetic.write_dataset(tmp_path / "data", 6)
    base = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert "a decoder of a sam2 export, but" in _cli_error(capsys, [
        "evaluate", "--encoder", str(sam1_encoder), "--decoder", str(sam2_decoder), *base])
    assert "reads high_res_feats_0, high_res_feats_1, which" in _cli_error(capsys, [
        "tune", "--encoder", str(sam1_encoder), "--decoder", str(_unmarked(sam2_decoder, tmp_path)),
        "--out", str(tmp_path / "out"), *base])
    assert not (tmp_path / "out").exists()


def _unmarked(path, tmp_path):
    """The model without its convention metadata (as if edited by another tool)."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / f"unmarked-{path.name}"))
    return tmp_path / f"unmarked-{path.name}"


@pytest.mark.parametrize("site_name", ["mlp.0", "mlp.5"])
def test_suffix_scoring_inside_a_sam2_encoder_equals_the_pruned_encoder(sam2_exports, sample_records, tmp_path,
                                                                        site_name):
    """At a site before the high-resolution features (mlp.0) the suffix recomputes them, at one after (mlp.5) it
    passes them through; either way every output equals the rewritten encoder's."""
    encoder_path = sam2_exports["test_sam2"].encoder
    encoder = onnx.load(str(encoder_path))
    site = find_sites(load_graph(encoder))[site_name]
    samples = load_calibration(SAMPLES, search_images=2, holdout_images=0).search
    embedder = SuffixEmbedder(encoder, site, samples, cache_dir=str(tmp_path), progress=False,
                              features=SAM2_ENCODER_OUTPUTS[1:])
    identity = np.arange(site.channels)
    unchanged = embedder.outputs(identity, [0, 1])
    np.testing.assert_array_equal(unchanged[EMBEDDING], embedder.original_embeddings())
    for name, values in embedder.original_features().items():
        np.testing.assert_array_equal(unchanged[name], np.stack(values))
    reuse = SiteReuse(site.tensor, site.axis, site.channels, ((0, 3), (5, 1), (7, 2)))
    pruned, _ = apply_reuse_map(encoder, ReuseMap(fingerprint(encoder), {site_name: reuse}), "prune")
    session = ort_session(pruned.SerializeToString())
    searched = embedder.outputs(reuse.index(), [1])
    image = imaging.preprocess(imaging.load_image_rgb(samples[1].record.image), convention=imaging.SAM2)
    for name, value in zip(SAM2_ENCODER_OUTPUTS, session.run(list(SAM2_ENCODER_OUTPUTS), {"image": image})):
        np.testing.assert_allclose(searched[name][0], value[0], rtol=1e-5, atol=1e-5 * np.abs(value).max(),
                                   err_msg=name)
    assert np.abs(searched[EMBEDDING] - unchanged[EMBEDDING][1:]).max() > 0


def test_sam2_engines_build_with_the_high_res_features_in_their_profile(sam2_exports, tmp_path):
    """fp16 engines (LayerNorms and softmaxes kept fp32) of a SAM 2 export, built without a GPU."""
    from sam_reuse.exporter.engine import build_engine
    from tests.test_engine import _backend, _check_sidecar

    backend = _backend()
    export = sam2_exports["test_sam2"]
    for source in (export.encoder, export.decoder):
        engine = tmp_path / f"{source.stem}.fp16.engine"
        sidecar = build_engine(source, engine, "fp16", points=(1, 2, 8), backend=backend)
        _check_sidecar(sidecar, source, engine, "fp16", backend)
    assert [o["name"] for o in json.loads((tmp_path / "encoder.fp16.engine.json").read_text())["outputs"]] == list(
        SAM2_ENCODER_OUTPUTS)
    assert sidecar["convention"] == imaging.SAM2  # SamModel.from_engines frames images by it
    inputs = {i["name"]: i for i in sidecar["inputs"]}
    assert inputs["high_res_feats_0"]["min"] == inputs["high_res_feats_0"]["max"] == [1, 32, 256, 256]
    assert inputs["point_coords"]["max"] == [1, 8, 2]
