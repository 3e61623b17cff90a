"""Altered copies of search images (simulated shift): what each copy is, and that tune scores them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam_reuse.base.imaging import load_image_rgb
from sam_reuse.base.records import Prompt
from sam_reuse.calibrate.augment import ALTERATIONS, _mirrored_prompt, with_altered_copies
from sam_reuse.calibrate.data import load_calibration
from sam_reuse.calibrate.tune import TuneSettings, tune
from tests import synthetic


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    data = synthetic.write_dataset(tmp_path_factory.mktemp("augment") / "data", 4, seed=3)
    return load_calibration(data, search_images=4, holdout_images=0).search


def test_each_sample_is_followed_by_its_copies_with_mirrored_mask_and_prompt(samples, tmp_path):
    copies = with_altered_copies(samples, 2, tmp_path)
    assert [c.key for c in copies[:3]] == [samples[0].key, f"{samples[0].key}~mirror-flat-warm",
                                            f"{samples[0].key}~blur-dark-cool"]
    assert len(copies) == 3 * len(samples) and copies[3] is samples[1]
    original, mirrored, blurred = copies[:3]
    width = original.hw[1]
    np.testing.assert_array_equal(mirrored.mask, original.mask[:, ::-1])
    (x, y), = original.prompt.points
    (mx, my), = mirrored.prompt.points
    assert (mx, my) == (width - 1 - x, y) and mirrored.mask[int(my), int(mx)]
    np.testing.assert_array_equal(blurred.mask, original.mask)
    assert blurred.prompt is original.prompt
    # The copies are the alterations of the image, written once and found again by content.
    pixels = load_image_rgb(original.record.image).astype(np.float32)
    for copy, (alter, _) in zip((mirrored, blurred), ALTERATIONS.values()):
        expected = np.clip(np.rint(alter(pixels)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(load_image_rgb(copy.record.image), expected)
        assert copy.image_sha256 != original.image_sha256
    written = mirrored.record.image.stat().st_mtime_ns
    again = with_altered_copies(samples, 1, tmp_path)
    assert again[1].image_sha256 == mirrored.image_sha256 and again[1].record.image.stat().st_mtime_ns == written
    assert with_altered_copies(samples, 0, tmp_path) == list(samples)


def test_a_mirrored_box_keeps_its_corners_ordered():
    prompt = Prompt(box=np.array([10, 20, 50, 60], dtype=np.float32))
    np.testing.assert_array_equal(_mirrored_prompt(prompt, 100).box, [49, 20, 89, 60])


def test_more_copies_than_alterations_is_refused(samples, tmp_path):
    with pytest.raises(ValueError, match="augment must be between 0 and 2"):
        with_altered_copies(samples, 3, tmp_path)


def test_tune_scores_every_copy_and_still_finds_the_planted_pair(tmp_path):
    encoder, decoder = synthetic.write_models(tmp_path / "models")
    data = synthetic.write_dataset(tmp_path / "data", 12)
    settings = TuneSettings(strategy="fast", evidence="given", augment=1, top_n=3, overlays=0, progress=False,
                            cache_dir=str(tmp_path / "cache"))
    result = tune(encoder, decoder, data, tmp_path / "out", settings)
    assert result.reuse_map.sites["embedding"].pairs == ((synthetic.TARGET, synthetic.HELPER),)
    report = result.report.to_json()
    assert report["settings"]["augment"] == 1
    assert "and on 1 altered copies of each (--augment)" in (tmp_path / "out" / "report.md").read_text()
    # Two rows per search image (itself and its mirrored copy) in every unit of the fast plan.
    units = 1 + 8 + 56 + 2
    assert report["cost"]["decoder_evaluations"]["search"] == units * 6 * 2
    config = json.loads((tmp_path / "out" / "search.jsonl").read_text().splitlines()[0])
    keys = [image[0] for image in config["config"]["images"]]
    assert keys[:2] == ["img00", "img00~mirror-flat-warm"] and len(keys) == 12
