"""ONNX exports agree with torch: every family, real images, every prompt form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam_reuse.base import imaging
from sam_reuse.base.contract import decoder_feeds
from sam_reuse.base.runtime import ort_session
from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.onnx_export import MIN_MASK_IOU, verify_export


def _predictor_vs_onnx(sam, export, image, prompt):
    """(onnx mask, predictor mask, max |low-res logit diff|) for one prompt."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    masks, iou_pred, low_res = predictor.predict(prompt.points, prompt.labels, prompt.box, multimask_output=False)
    embedding = ort_session(export.encoder).run(None, {"image": imaging.preprocess(image)})[0]
    coords, labels = imaging.prompt_arrays(prompt, image.shape[:2])
    logits, onnx_iou = ort_session(export.decoder).run(None, decoder_feeds(embedding, coords, labels))
    mask = imaging.logits_to_mask(imaging.upscale_logits(logits, image.shape[:2]))[0, 0]
    np.testing.assert_allclose(onnx_iou[0], iou_pred, atol=1e-4)
    return mask, masks[0], float(np.abs(logits[0] - low_res).max())


PROMPTS = {
    "point": lambda r: imaging.Prompt(r.points, r.labels),
    "points": lambda r: imaging.Prompt(np.vstack([r.points, r.points + 150]), np.array([1.0, 0.0])),
    "box": lambda r: imaging.Prompt(box=np.array([200.0, 150.0, 800.0, 900.0])),
    "box+point": lambda r: imaging.Prompt(r.points, r.labels, np.array([200.0, 150.0, 800.0, 900.0])),
}


@pytest.mark.parametrize("model_type", ["test_vit_t", "test_vit_b"])
def test_tiny_export_parity_recorded_in_sidecar(tiny_exports, model_type):
    export = tiny_exports[model_type]
    sidecar = json.loads(export.sidecar.read_text())
    assert sidecar["model_type"] == model_type and sidecar["opset"] == 17
    parity = sidecar["parity"]
    assert parity["encoder_max_abs_diff"] < 1e-4
    assert parity["decoder_max_abs_diff"] < 1e-4
    assert parity["min_mask_iou"] > 0.9999  # a few pixels whose logits are within rounding of 0 may flip
    enc_io = sidecar["models"]["encoder"]
    assert enc_io["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 1024, 1024]}]
    assert enc_io["outputs"][0]["shape"] == ["batch", 256, 64, 64]
    dec_io = sidecar["models"]["decoder"]
    assert [i["name"] for i in dec_io["inputs"]] == [
        "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
    assert dec_io["inputs"][1]["shape"] == ["batch", "num_points", 2]
    assert dec_io["outputs"][0]["shape"] == ["batch", 1, 256, 256]


@pytest.mark.parametrize("model_type", ["test_vit_t", "test_vit_b"])
@pytest.mark.parametrize("prompt_kind", list(PROMPTS))
def test_single_mask_equals_sam_predictor(tiny_exports, sample_records, model_type, prompt_kind):
    sam = build_sam(model_type)
    record = sample_records[2]
    image = np.ascontiguousarray(imaging.load_image_rgb(record.image)[:900, :700])  # non-square, padded
    ours, theirs, logit_diff = _predictor_vs_onnx(sam, tiny_exports[model_type], image, PROMPTS[prompt_kind](record))
    assert logit_diff < 1e-4
    assert imaging.binary_iou(ours, theirs, empty=1.0) >= MIN_MASK_IOU


@pytest.mark.parametrize("model_type", ["test_vit_t", "test_vit_b"])
@pytest.mark.parametrize("multimask", [False, True])
def test_decoder_modules_equal_sams_mask_decoder(model_type, multimask):
    """The exported decoders' reassociated attention and token-layout upscaling give SAM's own values, with and
    without a mask input, for the single mask and SAM's three."""
    from sam_reuse.exporter.wrappers import PromptsDecoder

    sam = build_sam(model_type).eval()
    generator = torch.Generator().manual_seed(1)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    points = torch.rand(3, 2, 2, generator=generator) * 1024
    box = torch.tensor([[200.0, 150.0, 800.0, 900.0]])
    # SAM's prompt encoder pads point prompts itself and embeds a box as two corners after the points
    sam_prompts = [dict(points=(points[:1], torch.tensor([[1.0, 0.0]])), boxes=None),
                   dict(points=(points[1:2, :1], torch.tensor([[1.0]])), boxes=box),
                   dict(points=(points[2:], torch.tensor([[1.0, 1.0]])), boxes=None)]
    coords = torch.stack([torch.cat([points[0], torch.zeros(1, 2)]), torch.cat([points[1, :1], box.reshape(2, 2)]),
                          torch.cat([points[2], torch.zeros(1, 2)])])
    labels = torch.tensor([[1.0, 0.0, -1.0], [1.0, 2.0, 3.0], [1.0, 1.0, -1.0]])
    mask_input = torch.randn(3, 1, 256, 256, generator=generator) * 4
    for has_mask in (0.0, 1.0):
        with torch.no_grad():
            ours, our_iou = PromptsDecoder(sam, multimask)(embedding, coords, labels, mask_input,
                                                           torch.full((3,), has_mask))
            for k, prompt in enumerate(sam_prompts):
                sparse, dense = sam.prompt_encoder(**prompt, masks=mask_input[k:k + 1] if has_mask else None)
                theirs, their_iou = sam.mask_decoder(image_embeddings=embedding,
                                                     image_pe=sam.prompt_encoder.get_dense_pe(),
                                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                     multimask_output=multimask)
                assert float((ours[k] - theirs[0]).abs().max()) < 1e-5 * max(float(theirs.abs().max()), 1.0)
                assert torch.allclose(our_iou[k], their_iou[0], atol=1e-5)


def test_decoder_pairs_embeddings_with_prompts_in_a_batch(tiny_exports, sample_records):
    """Batch b of the embeddings is decoded with batch b of the prompts, and nothing else."""
    export = tiny_exports["test_vit_t"]
    encoder, decoder = ort_session(export.encoder), ort_session(export.decoder)
    images = [imaging.load_image_rgb(r.image) for r in sample_records[:2]]
    batch = np.concatenate([imaging.preprocess(i) for i in images])
    embeddings = encoder.run(None, {"image": batch})[0]
    singles = [encoder.run(None, {"image": batch[i:i + 1]})[0] for i in range(2)]
    np.testing.assert_allclose(embeddings, np.concatenate(singles), atol=1e-5)

    prompts = [imaging.prompt_arrays(r.prompt, (1024, 1024)) for r in sample_records[:2]]
    coords = np.concatenate([p[0] for p in prompts])
    labels = np.concatenate([p[1] for p in prompts])
    batched = decoder.run(None, decoder_feeds(embeddings, coords, labels))[0]
    for i in range(2):
        single = decoder.run(None, decoder_feeds(embeddings[i:i + 1], coords[i:i + 1], labels[i:i + 1]))[0]
        np.testing.assert_allclose(batched[i:i + 1], single, atol=1e-5)


def test_dynamo_exporter_is_verified_too(tmp_path, sample_records):
    from sam_reuse.exporter.onnx_export import export_model

    result = export_model("test_vit_b", tmp_path, verify_records=sample_records[:1], exporter="dynamo", opset=18)
    assert result.info["exporter"] == "dynamo"
    assert result.info["parity"]["min_mask_iou"] == 1.0
    assert not list(tmp_path.glob("*.data")), "dynamo must not write external data for a small model"


def test_verify_export_detects_a_wrong_model(tiny_exports, sample_records):
    """Parity checking is real: another seed's ONNX pair must fail it."""
    from sam_reuse.base.errors import SamReuseError

    other = build_sam("test_vit_b", seed=7)
    export = tiny_exports["test_vit_b"]
    with pytest.raises(SamReuseError, match="does not match torch"):
        verify_export(other, export.encoder, export.decoder, sample_records[:1])


def test_verify_export_refuses_nan_outputs(tiny_exports, sample_records, tmp_path):
    """NaN minus NaN is NaN, which no limit catches: an encoder whose weights hold a NaN must fail verification."""
    import onnx
    from onnx import numpy_helper

    from sam_reuse.base.errors import SamReuseError

    export = tiny_exports["test_vit_b"]
    model = onnx.load(str(export.encoder))
    weight = next(w for w in model.graph.initializer if w.data_type == onnx.TensorProto.FLOAT and len(w.dims) > 1)
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    broken = tmp_path / "encoder.onnx"
    onnx.save(model, str(broken))
    record = sample_records[0]
    with pytest.raises(SamReuseError, match=f"^{record.image}: the exported model's image embedding, mask logits on "
                                            "its own embedding hold NaN or inf values"):
        verify_export(build_sam("test_vit_b"), broken, export.decoder, [record])


def test_real_mobilesam_parity(mobilesam_export, mobilesam_checkpoint, sample_records):
    info = mobilesam_export.info
    assert info["checkpoint_sha256"] == "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
    assert info["parity"]["encoder_max_abs_diff"] < 1e-4
    assert info["parity"]["min_mask_iou"] > 0.99999
    sam = build_sam("vit_t", mobilesam_checkpoint)
    figures = verify_export(sam, mobilesam_export.encoder, mobilesam_export.decoder, sample_records[3:8])
    # Over the first 24 bundled images at most a couple of pixels whose logit is
    # within 3e-5 of the threshold flip (min IoU 0.9999977 measured).
    assert figures["images"] == 5 and figures["min_mask_iou"] > 0.99999
    assert figures["predictor_max_abs_diff"] < 1e-4


def test_real_mobilesam_predicts_the_lesions(mobilesam_export, sample_records):
    """Sanity on real data: the exported MobileSAM segments ISIC lesions far better than chance."""
    from sam_reuse.calibrate.data import load_mask

    encoder, decoder = ort_session(mobilesam_export.encoder), ort_session(mobilesam_export.decoder)
    ious = []
    for record in sample_records[:4]:
        image = imaging.load_image_rgb(record.image)
        embedding = encoder.run(None, {"image": imaging.preprocess(image)})[0]
        logits = decoder.run(None, decoder_feeds(embedding, *imaging.prompt_arrays(record.prompt, image.shape[:2])))[0]
        mask = imaging.logits_to_mask(imaging.upscale_logits(logits, image.shape[:2]))[0, 0]
        ious.append(imaging.binary_iou(mask, load_mask(record.mask), empty=1.0))
    assert np.mean(ious) > 0.4


def test_tinyvit_attention_biases_are_loaded_before_eval(mobilesam_checkpoint):
    """build_sam calls eval() after loading, so TinyViT's cached biases are the checkpoint's."""
    sam = build_sam("vit_t", mobilesam_checkpoint)
    attn = sam.image_encoder.layers[1].blocks[0].attn
    torch.testing.assert_close(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])
    assert attn.ab.abs().sum() > 0
