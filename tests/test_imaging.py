"""Pre/post-processing parity with segment_anything's SamPredictor and torch ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from sam_reuse.base import imaging
from sam_reuse.exporter.models import build_sam


@pytest.fixture(scope="module")
def sam():
    return build_sam("test_vit_b")


def _non_square(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[100:813, 37:1000])  # 713x963: both sides change, padding on the bottom


@pytest.mark.parametrize("crop", [False, True])
def test_preprocess_matches_sam_predictor(sam, sample_records, crop):
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    for record in sample_records[:3]:
        image = imaging.load_image_rgb(record.image)
        if crop:
            image = _non_square(image)
        resized = predictor.transform.apply_image(image)
        expected = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float()).numpy()
        ours = imaging.preprocess(image)
        assert ours.shape == (1, 3, 1024, 1024)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_resized_shape_rounds_like_sam():
    from segment_anything.utils.transforms import ResizeLongestSide

    for h, w in [(713, 963), (1024, 1024), (1, 3000), (599, 600), (333, 1000)]:
        assert imaging.resized_shape(h, w) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


@pytest.mark.parametrize("size_in,size_out", [(256, 1024), (1024, 713), (256, 180), (7, 7), (64, 1000)])
def test_bilinear_matrix_equals_torch_interpolate(size_in, size_out):
    x = np.random.default_rng(0).standard_normal((3, size_in)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x)[None], size=size_out, mode="linear", align_corners=False)[0]
    np.testing.assert_allclose(x @ imaging.bilinear_matrix(size_in, size_out).T, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("hw", [(1024, 1024), (713, 963), (963, 713), (500, 300)])
def test_upscale_logits_matches_postprocess_masks(sam, hw):
    logits = np.random.default_rng(1).standard_normal((2, 1, 256, 256)).astype(np.float32) * 4
    input_size = imaging.resized_shape(*hw)
    expected = sam.postprocess_masks(torch.from_numpy(logits), input_size, hw).numpy()
    ours = imaging.upscale_logits(logits, hw)
    assert ours.shape == (2, 1, *hw)
    np.testing.assert_allclose(ours, expected, atol=2e-4)
    assert (imaging.logits_to_mask(ours) == (expected > 0)).mean() > 0.9999


def test_prompt_arrays_add_padding_point_like_prompt_encoder(sam):
    from segment_anything.utils.transforms import ResizeLongestSide

    hw = (713, 963)
    points = np.array([[100.0, 200.0], [500.0, 600.0]])
    coords, labels = imaging.prompt_arrays(imaging.Prompt(points, np.array([1, 0])), hw)
    expected = ResizeLongestSide(1024).apply_coords(points, hw)
    np.testing.assert_allclose(coords[0, :2], expected, rtol=1e-6)
    np.testing.assert_array_equal(coords[0, 2], [0, 0])
    np.testing.assert_array_equal(labels, [[1, 0, -1]])

    box = np.array([10.0, 20.0, 300.0, 400.0])
    coords, labels = imaging.prompt_arrays(imaging.Prompt(points[:1], np.array([1]), box), hw)
    np.testing.assert_array_equal(labels, [[1, 2, 3]])
    np.testing.assert_allclose(coords[0, 1:], ResizeLongestSide(1024).apply_boxes(box, hw).reshape(2, 2), rtol=1e-6)


def test_prompt_without_points_or_box_is_rejected():
    with pytest.raises(ValueError, match="at least one point or a box"):
        imaging.prompt_arrays(imaging.Prompt(), (100, 100))
