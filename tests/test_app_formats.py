"""The pair in the formats SAM apps load: against our own pipeline, and run by the real clients' code."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from sam_reuse.base import imaging
from sam_reuse.base.contract import decoder_feeds
from sam_reuse.base.records import Prompt
from sam_reuse.base.runtime import ort_session
from sam_reuse.cli import main
from sam_reuse.exporter.predictor import SamModel
from sam_reuse.graphops.app_format import OFFICIAL_OUTPUTS, official_decoder, preprocessing_encoder

ANYLABELING_SRC = "SAM_REUSE_ANYLABELING_SRC"  # an unpacked anylabeling wheel (its GPL code is not bundled)


def _crops(sample_records) -> list[np.ndarray]:
    """Real images at three aspect ratios (square, landscape, portrait): the crop to the resized image differs."""
    image = imaging.load_image_rgb(sample_records[0].image)
    return [image, np.ascontiguousarray(image[:600, :900]), np.ascontiguousarray(image[:900, :500])]


def _prompts(image: np.ndarray) -> list[Prompt]:
    h, w = image.shape[:2]
    return [Prompt(points=np.array([[w * 0.5, h * 0.45]], np.float32), labels=np.array([1], np.float32)),
            Prompt(box=np.array([w * 0.2, h * 0.2, w * 0.8, h * 0.8], np.float32))]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_official_interface_gives_our_masks_at_the_image_size(tiny_exports, sample_records):
    """masks = our upscale of the low-res logits at orig_im_size (any aspect); a box's padding point is dropped."""
    export = tiny_exports["test_vit_t"]
    decoder = official_decoder(onnx.load(str(export.decoder)))
    assert [i.name for i in decoder.graph.input][-1] == "orig_im_size"
    assert tuple(o.name for o in decoder.graph.output) == OFFICIAL_OUTPUTS
    official, ours = ort_session(decoder.SerializeToString()), ort_session(str(export.decoder))
    encoder = ort_session(str(export.encoder))
    for image in _crops(sample_records):
        embedding = encoder.run(None, {"image": imaging.preprocess(image)})[0]
        for prompt in _prompts(image):
            coords, labels = imaging.prompt_arrays(prompt, image.shape[:2])
            want = ours.run(["low_res_masks"], decoder_feeds(embedding, coords, labels))[0]
            if prompt.box is not None:  # fed as SAM's ONNX example feeds a box: with a padding point
                coords = np.concatenate([coords, np.zeros((1, 1, 2), np.float32)], axis=1)
                labels = np.concatenate([labels, -np.ones((1, 1), np.float32)], axis=1)
            feeds = {**decoder_feeds(embedding, coords, labels),
                     "orig_im_size": np.array(image.shape[:2], np.float32)}
            masks, _, low_res = official.run(None, feeds)
            np.testing.assert_allclose(low_res, want, rtol=0, atol=1e-5)
            assert masks.shape == (1, 1, *image.shape[:2])
            np.testing.assert_allclose(masks, imaging.upscale_logits(want, image.shape[:2]), rtol=0, atol=1e-3)


def test_preprocessing_encoder_takes_the_resized_image(tiny_exports, sample_records):
    export = tiny_exports["test_vit_t"]
    inside = ort_session(preprocessing_encoder(onnx.load(str(export.encoder))).SerializeToString())
    outside = ort_session(str(export.encoder))
    for image in _crops(sample_records):
        h, w = imaging.resized_shape(*image.shape[:2])
        from PIL import Image

        resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), dtype=np.float32)
        np.testing.assert_allclose(inside.run(None, {"image": resized})[0],
                                   outside.run(None, {"image": imaging.preprocess(image)})[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("export_name", ["tiny", "mobilesam"])
def test_samexporters_client_runs_our_pair_unchanged_with_our_masks(export_name, request, sample_records,
                                                                     tmp_path):
    if importlib.util.find_spec("samexporter") is None or importlib.util.find_spec("cv2") is None:
        pytest.skip("samexporter's client is not installed (make setup installs samexporter==0.5.0)")
    import cv2
    from samexporter.sam_onnx import SegmentAnythingONNX

    export = (request.getfixturevalue("tiny_exports")["test_vit_t"] if export_name == "tiny"
              else request.getfixturevalue("mobilesam_export"))
    assert main(["app-format", "--format", "samexporter", "--encoder", str(export.encoder), "--decoder",
                 str(export.decoder), "--out", str(tmp_path)]) == 0
    client = SegmentAnythingONNX(str(tmp_path / "encoder.onnx"), str(tmp_path / "decoder.onnx"))
    ours = SamModel.from_onnx(export.encoder, export.decoder)
    for image in _crops(sample_records):
        embedding = client.encode(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        for prompt in _prompts(image):
            marks = ([{"type": "point", "data": prompt.points[0].tolist(), "label": 1}] if prompt.box is None
                     else [{"type": "rectangle", "data": prompt.box.tolist()}])
            theirs = client.predict_masks(embedding, marks)[0, 0] > 0
            assert _iou(theirs, ours.predict(image, prompt).mask) >= 0.999


def _anylabeling_client():
    """AnyLabeling's SAM client from an unpacked wheel, without its Qt GUI (its package __init__ imports Qt)."""
    source = os.environ.get(ANYLABELING_SRC)
    if not source or importlib.util.find_spec("cv2") is None:
        pytest.skip(f"set {ANYLABELING_SRC} to an unpacked anylabeling wheel (pip download anylabeling "
                    "--no-deps; unzip) to run AnyLabeling's client; not bundled (GPL-3.0)")
    sys.path.insert(0, source)
    package = types.ModuleType("anylabeling.services.auto_labeling")
    package.__path__ = [str(Path(source) / "anylabeling" / "services" / "auto_labeling")]
    import anylabeling.services  # noqa: F401  (Qt-free)

    sys.modules[package.__name__] = package
    from anylabeling.services.auto_labeling.sam_onnx import SegmentAnythingONNX

    return SegmentAnythingONNX


def test_anylabelings_client_runs_our_pair_from_its_config(tiny_exports, sample_records, tmp_path):
    client_class = _anylabeling_client()
    export = tiny_exports["test_vit_t"]
    assert main(["app-format", "--format", "anylabeling", "--encoder", str(export.encoder), "--decoder",
                 str(export.decoder), "--out", str(tmp_path / "anylabeling")]) == 0
    client = client_class(str(tmp_path / "anylabeling" / "encoder.onnx"),
                          str(tmp_path / "anylabeling" / "decoder.onnx"))
    ours = SamModel.from_onnx(export.encoder, export.decoder)
    for image in _crops(sample_records):
        embedding = client.encode(image)
        # AnyLabeling draws the image on a 684 x 1024 canvas itself; our encoder sees the same canvas.
        scale = min(684 / image.shape[0], 1024 / image.shape[1])
        import cv2

        canvas = cv2.warpAffine(image, np.array([[scale, 0, 0], [0, scale, 0]], np.float32), (1024, 684))
        np.testing.assert_allclose(embedding["image_embedding"], ours.embed(canvas)["image_embeddings"],
                                   rtol=0, atol=2e-3)  # float rounding: normalised in the graph, not in numpy
        masks = np.asarray(client.predict_masks(embedding, [{"type": "point", "data": [10.0, 10.0], "label": 1}]))
        assert masks.shape[-2:] == image.shape[:2]


def test_anylabeling_folder_and_zip_hold_the_config_it_reads(tiny_exports, tmp_path):
    export = tiny_exports["test_vit_t"]
    out = tmp_path / "my-model"
    assert main(["app-format", "--format", "anylabeling", "--encoder", str(export.encoder), "--decoder",
                 str(export.decoder), "--out", str(out)]) == 0
    config = dict(line.split(": ", 1) for line in (out / "config.yaml").read_text().splitlines())
    assert config["type"] == "segment_anything" and config["encoder_model_path"] == "encoder.onnx"
    assert {"name", "display_name", "decoder_model_path", "input_size", "max_width", "max_height"} <= set(config)
    with zipfile.ZipFile(out / "sam_reuse_my-model.zip") as archive:
        assert sorted(archive.namelist()) == [f"sam_reuse_my-model/{f}" for f in
                                              ("config.yaml", "decoder.onnx", "encoder.onnx")]
    assert [i.type.tensor_type.shape.dim[2].dim_value for i in onnx.load(str(out / "encoder.onnx")).graph.input] == [3]


def test_bad_app_format_requests_are_one_line_and_write_nothing(tiny_exports, sam2_exports, tmp_path, capsys):
    tiny, sam2 = tiny_exports["test_vit_t"], sam2_exports["test_sam2"]
    cases = [(["--format", "labelme", "--encoder", str(tiny.encoder), "--decoder", str(tiny.decoder)],
              "--format: unknown app format 'labelme' (choose from samexporter, anylabeling)"),
             (["--format", "samexporter", "--encoder", str(sam2.encoder), "--decoder", str(sam2.decoder)],
              f"--format samexporter: a SAM 1 format; {sam2.encoder} is a SAM 2 export")]
    for argv, message in cases:
        assert main(["app-format", *argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
        assert not (tmp_path / "out").exists()
