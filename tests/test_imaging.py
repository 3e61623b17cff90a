"""Pre/post-processing parity with SamPredictor, SAM2ImagePredictor's transforms and torch ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
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


@pytest.mark.parametrize("convention", [imaging.SAM1, imaging.SAM2])
@pytest.mark.parametrize("hw", [(1024, 1024), (713, 963), (300, 500), (1500, 400)])
def test_iou_and_mask_by_cells_equal_the_whole_masks(hw, convention):
    """Upscaling.iou and .mask take whole cells and upscale only the mask's border; the IoU is the full mask's, for
    small, large, border-touching, speckled, empty and everywhere-positive masks."""
    upscaling = imaging.Upscaling(hw, convention=convention)
    rng = np.random.default_rng(sum(hw))
    yy, xx = np.mgrid[:256, :256]
    truth = rng.random(hw) < 0.3
    truth[hw[0] // 4:hw[0] // 2, hw[1] // 3:hw[1] // 2] = True
    cases = {"blob": 20 - np.hypot(yy - 90, xx - 120), "corner": 30 - np.hypot(yy, xx),
             "far corner": 40 - np.hypot(yy - 255, xx - 255), "speckle": rng.normal(-2, 1, (256, 256)),
             "nothing": -np.ones((256, 256)), "everything": np.ones((256, 256)),
             "one logit": np.where((yy == 17) & (xx == 201), 5.0, -5.0)}
    for name, logits in cases.items():
        logits = logits.astype(np.float32)
        full_mask = imaging.logits_to_mask(upscaling.logits(logits))
        whole = imaging.binary_iou(full_mask, truth)
        assert upscaling.iou(logits, upscaling.target(truth)) == pytest.approx(whole, abs=1e-6), name
        # The mask itself, for SamModel and the overlays: the same pixels but where a logit rounds across 0
        assert (upscaling.mask(logits) != full_mask).sum() <= 2, name
    assert upscaling.iou(cases["nothing"].astype(np.float32), upscaling.target(truth)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        upscaling.target(truth[1:])


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


def _bomb_png(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))


def test_every_pillow_mode_becomes_8_bit_rgb_the_way_a_user_expects(tmp_path):
    from PIL import Image

    ramp = (np.arange(256 * 4, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)  # 0..65472
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    gray16 = imaging.load_image_rgb(tmp_path / "gray16.png")
    assert gray16.dtype == np.uint8 and gray16.shape == (4, 256, 3)
    assert np.array_equal(gray16[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))  # scaled, not clipped
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert imaging.load_image_rgb(tmp_path / "cmyk.jpg")[0, 0].tolist() == [255, 255, 255]
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    assert imaging.load_image_rgb(tmp_path / "alpha.png")[0, 0].tolist() == [10, 20, 30]
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "palette.png")
    assert imaging.load_image_rgb(tmp_path / "palette.png")[1, 1].tolist() == [200, 100, 50]
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tiff")
    assert imaging.load_image_rgb(tmp_path / "float.tiff")[0, 0].tolist() == [128, 128, 128]


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    from sam_reuse.base.errors import SamReuseError

    _bomb_png(tmp_path / "bomb.png", 9000, 9000)  # above our limit, below Pillow's own
    with pytest.raises(SamReuseError, match=r"bomb.png: image is 9000x9000 pixels, too large to decode"):
        imaging.load_image_rgb(tmp_path / "bomb.png")
    _bomb_png(tmp_path / "huge.png", 60000, 60000)  # Pillow refuses it at open
    with pytest.raises(SamReuseError, match=r"huge.png: image too large to decode \(Image size"):
        imaging.load_image_rgb(tmp_path / "huge.png")


def test_a_bomb_in_the_data_is_a_skipped_record(tmp_path):
    from sam_reuse.calibrate.data import SkippedRecordsWarning, load_calibration
    from tests import synthetic

    data = synthetic.write_dataset(tmp_path / "data", 6)
    _bomb_png(data / "img02.png", 50000, 50000)
    with pytest.warns(SkippedRecordsWarning, match="img02: .*too large to decode"):
        calibration = load_calibration(data, search_images=3, holdout_images=3)
    assert [s.key for s in calibration.search] == ["img00", "img01"] and "img02" in calibration.skipped


def _sam2_transforms():
    from sam2.utils.transforms import SAM2Transforms

    return SAM2Transforms(resolution=1024, mask_threshold=0.0)


@pytest.mark.parametrize("resize", [None, "crop", "larger"])
def test_sam2_preprocess_matches_sam2_transforms(sample_records, resize):
    transforms = _sam2_transforms()
    for record in sample_records[:2]:
        image = imaging.load_image_rgb(record.image)
        if resize == "crop":
            image = _non_square(image)  # both sides stretched up
        elif resize == "larger":
            image = np.asarray(Image.fromarray(image).resize((1500, 1100)))  # shrunk: the antialiased path
        expected = transforms(image)[None].numpy()
        ours = imaging.preprocess(image, convention=imaging.SAM2)
        assert ours.shape == (1, 3, 1024, 1024)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(1024, 1024), (713, 963), (500, 300)])
def test_sam2_upscale_and_coords_match_sam2_transforms(hw):
    transforms = _sam2_transforms()
    logits = np.random.default_rng(2).standard_normal((1, 1, 256, 256)).astype(np.float32) * 4
    expected = transforms.postprocess_masks(torch.from_numpy(logits), hw).numpy()
    np.testing.assert_allclose(imaging.upscale_logits(logits, hw, convention=imaging.SAM2), expected, atol=2e-4)
    points = np.array([[10.0, 20.0], [hw[1] - 1, hw[0] - 1]], dtype=np.float32)
    expected_coords = transforms.transform_coords(torch.from_numpy(points), normalize=True, orig_hw=hw).numpy()
    np.testing.assert_allclose(imaging.transform_coords(points, hw, convention=imaging.SAM2), expected_coords,
                               rtol=1e-6)


def test_sam2_prompts_put_the_box_first_and_always_pad():
    prompt = imaging.Prompt(points=np.array([[100.0, 50.0]]), labels=np.array([1.0]),
                            box=np.array([10, 20, 300, 400.0]))
    coords, labels = imaging.prompt_arrays(prompt, (500, 1000), convention=imaging.SAM2)
    np.testing.assert_array_equal(labels, [[2, 3, 1, -1]])
    np.testing.assert_allclose(coords, [[[10.24, 40.96], [307.2, 819.2], [102.4, 102.4], [0, 0]]], rtol=1e-6)
    _, sam_labels = imaging.prompt_arrays(prompt, (500, 1000))
    np.testing.assert_array_equal(sam_labels, [[1, 2, 3]])


def test_a_jpeg_stored_sideways_is_read_upright_like_its_mask(tmp_path):
    """A phone's JPEG is stored sideways with an EXIF orientation tag; its mask is drawn on the upright picture."""
    from sam_reuse.base.imaging import EXIF_ORIENTATION, load_image_rgb
    from sam_reuse.calibrate.data import load_calibration

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :10] = 255  # the left strip as stored: the top strip once turned 90 degrees clockwise (tag 6)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = 6
    image.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = load_image_rgb(tmp_path / "phone.jpg")
    assert upright.shape == (40, 20, 3) and upright[:10].mean() > 250 and upright[12:].mean() < 5
    mask = np.zeros((40, 20), dtype=np.uint8)
    mask[:10] = 255
    Image.fromarray(mask).save(tmp_path / "phone.png")
    (tmp_path / "manifest.jsonl").write_text('{"image": "phone.jpg", "mask": "phone.png"}\n')
    sample = load_calibration(tmp_path, search_images=1, holdout_images=0, min_images=1).search[0]
    assert sample.hw == (40, 20) and sample.mask[:10].all() and not sample.mask[10:].any()
