"""Calibration data: every mask form, prompt derivation, splits, both layouts and bad files."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from sam_reuse.base.errors import SamReuseError
from sam_reuse.calibrate.data import (
    SkippedRecordsWarning,
    binarize_mask,
    bounding_box,
    interior_point,
    load_calibration,
    load_mask,
    read_records,
    split_records,
)
from tests.conftest import SAMPLES, SHARED_DATA

TRUTH = np.zeros((6, 8), dtype=bool)
TRUTH[1:4, 2:6] = True


def _save(path, array, mode=None):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    image.save(path)
    return path


@pytest.mark.parametrize("form", ["gray255", "gray01", "rgb", "rgb_one_channel", "palette", "gray_with_border"])
def test_every_mask_form_binarises_to_the_same_mask(tmp_path, form):
    gray = TRUTH.astype(np.uint8) * 255
    if form == "gray255":
        path = _save(tmp_path / "m.png", gray)
    elif form == "gray01":
        path = _save(tmp_path / "m.png", TRUTH.astype(np.uint8))
    elif form == "rgb":
        path = _save(tmp_path / "m.png", np.stack([gray] * 3, axis=2))
    elif form == "rgb_one_channel":  # e.g. a red-on-black annotation
        path = _save(tmp_path / "m.png", np.stack([gray, 0 * gray, 0 * gray], axis=2))
    elif form == "palette":
        img = Image.fromarray(TRUTH.astype(np.uint8), mode="L").convert("P")
        img.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
        img.save(tmp_path / "m.png")
        path = tmp_path / "m.png"
    else:  # the shared sets' faint resize border: values 1..5 just outside the object
        with_border = gray.copy()
        with_border[0, 2:6] = 3
        with_border[4, 2:6] = 5
        with_border[1:4, 1] = 1
        path = _save(tmp_path / "m.png", with_border)
    np.testing.assert_array_equal(load_mask(path), TRUTH)


def test_threshold_is_strictly_above_127():
    values = np.array([[0, 5, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize_mask(values), [[False, False, False, True, True]])


def test_a_channel_above_the_threshold_makes_a_colour_mask_pixel_foreground():
    values = np.zeros((1, 4, 3), dtype=np.uint8)
    values[0, 1, 2] = 200  # blue only
    values[0, 2] = (100, 127, 90)  # no channel above 127
    values[0, 3, 0] = 255
    np.testing.assert_array_equal(binarize_mask(values), [[False, True, False, True]])
    np.testing.assert_array_equal(binarize_mask(values > 150), [[False, True, False, True]])  # boolean channels


def test_shared_masks_have_faint_borders_that_the_rule_drops():
    path = SAMPLES / "10.png"
    if not path.exists():
        pytest.skip(f"{path} not present")
    values = np.asarray(Image.open(path).convert("RGB")).max(axis=2)
    faint = (values > 0) & (values <= 5)
    assert faint.any()
    assert not (load_mask(path) & faint).any()


def test_interior_point_is_farthest_from_border_and_deterministic():
    mask = np.zeros((50, 80), dtype=bool)
    mask[10:31, 20:61] = True  # 21 x 41 rectangle: centre (40, 20)
    assert interior_point(mask) == (40.0, 20.0)
    # An L shape: the thick vertical bar (12 wide) beats the thin horizontal one (4 high).
    ell = np.zeros((60, 60), dtype=bool)
    ell[5:55, 5:17] = True
    ell[51:55, 5:55] = True
    x, y = interior_point(ell)
    assert ell[int(y), int(x)] and 10 <= x <= 11
    assert interior_point(ell) == (x, y)
    # The image edge counts as border: a full mask picks its centre, not a corner.
    assert interior_point(np.ones((9, 9), dtype=bool)) == (4.0, 4.0)


def test_bounding_box_is_inclusive():
    assert bounding_box(TRUTH) == (2.0, 1.0, 5.0, 3.0)


def _dataset(folder, count, extra=None):
    """count 32x32 records with a square object, manifest layout; extra: manifest fields per index."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image = np.full((32, 32, 3), 40, dtype=np.uint8)
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8 + i % 4: 20, 10:24] = 255
        _save(folder / f"r{i}.jpg", image)
        _save(folder / f"r{i}.png", mask)
        entry = {"image": f"r{i}.jpg", "mask": f"r{i}.png"}
        entry.update((extra or {}).get(i, {}))
        lines.append(json.dumps(entry))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_bundled_and_shared_layouts_load_as_is():
    calibration = load_calibration(SAMPLES)
    assert (len(calibration.search), len(calibration.held_out)) == (50, 50)
    first = calibration.search[0]
    assert first.prompt.points.shape == (1, 2) and first.prompt.labels.tolist() == [1.0]
    assert first.mask.shape == first.hw and first.mask.any()
    if (SHARED_DATA / "kvasir-seg").exists():
        shared = load_calibration(SHARED_DATA / "kvasir-seg")
        assert (len(shared.search), len(shared.held_out), shared.skipped) == (50, 50, {})


def test_prompt_modes(tmp_path):
    folder = _dataset(tmp_path / "d", 4, {0: {"points": [[3, 4]], "labels": [1]}, 1: {"box": [1, 2, 30, 31]}})
    given = load_calibration(folder, prompt="given")
    samples = given.search + given.held_out
    assert samples[0].prompt.points.tolist() == [[3.0, 4.0]]
    assert samples[1].prompt.box.tolist() == [1.0, 2.0, 30.0, 31.0] and samples[1].prompt.points is None
    # No prompt given: a positive point derived from the mask.
    mask = samples[2].mask
    x, y = samples[2].prompt.points[0]
    assert mask[int(y), int(x)] and (x, y) == interior_point(mask)
    derived = load_calibration(folder, prompt="point")
    assert derived.search[0].prompt.points.tolist() == [list(interior_point(derived.search[0].mask))]
    boxes = load_calibration(folder, prompt="box")
    assert all(s.prompt.points is None and s.prompt.box.tolist() == list(bounding_box(s.mask))
               for s in boxes.search + boxes.held_out)


def test_split_is_positional_and_configurable(tmp_path):
    records = read_records(_dataset(tmp_path / "d", 7))
    search, held = split_records(records)
    assert [r.key for r in search] == ["r0", "r1", "r2"] and [r.key for r in held] == ["r3", "r4", "r5", "r6"]
    assert split_records(records) == (search, held)
    search, held = split_records(records, search_images=2, holdout_images=3)
    assert [r.key for r in search] == ["r0", "r1"] and [r.key for r in held] == ["r4", "r5", "r6"]
    with pytest.raises(SamReuseError, match="5 search \\+ 3 held-out records, the data has 7"):
        split_records(records, search_images=5, holdout_images=3)
    with pytest.raises(SamReuseError, match="^--search-images 100000: the data has 7 records$"):
        split_records(records, search_images=100000)  # it was '--holdout-images -99993'
    with pytest.raises(SamReuseError, match="^--holdout-images 8: the data has 7 records$"):
        split_records(records, holdout_images=8)


def test_image_and_mask_folders_pair_by_stem(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for stem in ("b", "a", "c", "d"):
        _save(images / f"{stem}.jpg", np.zeros((16, 16, 3), dtype=np.uint8))
        _save(masks / f"{stem}.png", (np.eye(16) * 255).astype(np.uint8))
    (images / "notes.txt").write_text("not an image")
    assert [r.key for r in read_records(tmp_path)] == ["a", "b", "c", "d"]
    explicit = read_records(images, masks)
    assert [(r.image.name, r.mask.name) for r in explicit] == [("a.jpg", "a.png"), ("b.jpg", "b.png"),
                                                                ("c.jpg", "c.png"), ("d.jpg", "d.png")]
    calibration = load_calibration(images, masks=masks)
    assert [s.key for s in calibration.search] == ["a", "b"]
    assert calibration.search[0].prompt.points is not None  # derived: no prompt in this layout


def test_bad_files_are_listed_in_one_warning_and_skipped(tmp_path):
    folder = _dataset(tmp_path / "d", 10)
    (folder / "r1.jpg").write_bytes(b"not a jpeg at all")  # unreadable image
    _save(folder / "r2.png", np.zeros((16, 32), dtype=np.uint8) + 255)  # mask of another size
    (folder / "r3.png").unlink()  # missing mask
    _save(folder / "r6.png", np.zeros((32, 32), dtype=np.uint8))  # empty mask
    (folder / "r7.jpg").unlink()  # missing image
    _save(folder / "r8.jpg", np.zeros((3000, 1, 3), dtype=np.uint8))  # a side that shrinks to nothing at 1024
    _save(folder / "r8.png", np.full((3000, 1), 255, dtype=np.uint8))
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    lines[8] = json.dumps({"image": "r8.jpg", "mask": "r8.png", "points": [[0, 1500]], "labels": [1]})
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibration = load_calibration(folder)
    skipped_warnings = [w for w in caught if issubclass(w.category, SkippedRecordsWarning)]
    assert len(skipped_warnings) == 1
    text = str(skipped_warnings[0].message)
    assert "skipped 6 unusable record(s)" in text
    for key, reason in {"r1": "cannot read image", "r2": "mask is 32x16, image is 32x32", "r3": "mask not found",
                        "r6": "empty mask", "r7": "image not found",
                        "r8": "1x3000 pixels; a side shrinks to nothing"}.items():
        assert key in calibration.skipped and reason in calibration.skipped[key] and reason in text
    # The split was made before dropping: bad search records never pull held-out images forward.
    assert [s.key for s in calibration.search] == ["r0", "r4"]
    assert [s.key for s in calibration.held_out] == ["r5", "r9"]


def test_too_few_usable_records_is_an_error(tmp_path):
    folder = _dataset(tmp_path / "d", 4)
    (folder / "r0.jpg").write_bytes(b"")
    with pytest.raises(SamReuseError, match="only 1 usable search record\\(s\\) of 2 \\(at least 2 needed\\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_calibration(folder)


def test_a_mask_that_is_a_fifo_is_a_bad_record_not_a_hang(tmp_path):
    folder = _dataset(tmp_path / "d", 4)
    mask = read_records(folder)[3].mask
    mask.unlink()
    os.mkfifo(mask)
    with pytest.warns(SkippedRecordsWarning, match=f"{mask}: mask is not a regular file"):
        calibration = load_calibration(folder, min_images=1)
    assert list(calibration.skipped) == ["r3"]


def test_prompt_outside_the_image_is_a_bad_record(tmp_path):
    folder = _dataset(tmp_path / "d", 4, {3: {"points": [[50, 5]]}})
    with pytest.warns(SkippedRecordsWarning, match="outside the 32x32 image"):
        calibration = load_calibration(folder, min_images=1)
    assert "r3" in calibration.skipped


@pytest.mark.parametrize("content, message", [
    ('{"image": "a.jpg"}\n', "manifest.jsonl:1: not a record"),
    ("not json\n", "manifest.jsonl:1: not a record"),
    ('{"image": "a.jpg", "mask": "a.png", "points": [[1, 2]], "labels": [1, 0]}\n', "1 points but 2 labels"),
    ("\n", "no records"),
    ('{"image": "a.jpg", "mask": "a.png", "points": [[1, 2]], "labels": [7]}\n',
     "manifest.jsonl:1: .*'labels' must be 1 \\(foreground\\) or 0 \\(background\\), not \\[7.0\\]"),
    ('{"image": "a.jpg", "mask": "a.png", "points": [[1, 2], [3, 4]], "labels": [1, -5]}\n', "not \\[1.0, -5.0\\]"),
    ('{"image": "a.jpg", "mask": "a.png", "id": "%s"}\n' % ("x" * 300),
     "manifest.jsonl:1: .*id of 300 bytes is too long for a file name \\(at most 200\\)"),
    ('{"image": "a.jpg", "mask": "a.png", "box": [30, 2, 10, 20]}\n',
     "'box' must be \\[x0, y0, x1, y1\\] with x0 < x1 and y0 < y1, not \\[30.0, 2.0, 10.0, 20.0\\]"),
])
def test_broken_manifest_names_file_and_line(tmp_path, content, message):
    (tmp_path / "manifest.jsonl").write_text(content)
    with pytest.raises(SamReuseError, match=message):
        read_records(tmp_path)


def test_missing_layouts_are_clear_errors(tmp_path):
    with pytest.raises(SamReuseError, match="data folder not found"):
        read_records(tmp_path / "nope")
    with pytest.raises(SamReuseError, match="no manifest.jsonl, no images/ \\+ masks/"):
        read_records(tmp_path)
    with pytest.raises(SamReuseError, match="--masks .*nope: not a folder"):
        read_records(tmp_path, masks=tmp_path / "nope")
    with pytest.raises(SamReuseError, match="the images' own folder \\(each image would be its own mask\\)"):
        read_records(tmp_path, masks=tmp_path / ".")


def test_a_manifest_line_nested_10000_deep_is_named_not_a_crash(tmp_path):
    folder = _dataset(tmp_path / "d", 2)
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    lines[1] = '{"image": "r1.jpg", "mask": "r1.png", "extra": ' + "[" * 10_000 + "]" * 10_000 + "}"
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SamReuseError, match=r"manifest.jsonl:2: not a record with 'image' and 'mask' \(maximum "
                                            "recursion depth"):
        read_records(folder)
