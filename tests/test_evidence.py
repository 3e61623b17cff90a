"""More evidence per search image: spread points, the mean over prompts, and `tune --evidence points`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam_reuse.base.contract import JOURNAL
from sam_reuse.calibrate.activations import encode
from sam_reuse.calibrate.data import load_calibration
from sam_reuse.calibrate.evaluator import MaskEvaluator
from sam_reuse.calibrate.evidence import MeanOverPrompts, evidence_samples, jittered_boxes, spread_points
from sam_reuse.calibrate.tune import TuneSettings, tune
from sam_reuse.graphops.reuse_map import reuse_index
from tests import synthetic


def _brute_force_best(mask: np.ndarray, placed: list[tuple[float, float]]) -> tuple[float, float]:
    """The pixel maximising min(distance to background or edge, distance to placed points), by brute force."""
    height, width = mask.shape
    best, best_score = None, -1.0
    for y in range(height):
        for x in range(width):
            if not mask[y, x]:
                continue
            edge = min(x + 1, y + 1, width - x, height - y)
            background = min((np.hypot(x - bx, y - by) for by, bx in zip(*np.nonzero(~mask))), default=np.inf)
            score = min([edge, background] + [np.hypot(x - px, y - py) for px, py in placed])
            if score > best_score:  # strict: the first maximum in row-major order wins
                best, best_score = (float(x), float(y)), score
    return best


def test_spread_points_match_a_brute_force_reference_and_stay_inside():
    mask = np.zeros((12, 20), dtype=bool)
    mask[2:10, 1:18] = True
    mask[5:7, 8:11] = False  # a hole: distances to the background count from it too
    given = [(3.0, 5.0)]
    points = spread_points(mask, given, 2)
    expected_first = _brute_force_best(mask, given)
    assert points[0] == expected_first
    assert points[1] == _brute_force_best(mask, given + [expected_first])
    assert all(mask[int(y), int(x)] for x, y in points)
    assert spread_points(mask, given, 2) == points  # deterministic


def test_spread_points_score_the_mask_box_as_the_whole_image():
    # a mask in the image's corner, where the image edge bounds the box on two sides and background on two
    mask = np.zeros((12, 20), dtype=bool)
    mask[0:6, 11:20] = True
    mask[0, 11] = False
    given = [(19.0, 5.0)]
    first = _brute_force_best(mask, given)
    assert spread_points(mask, given, 2) == [first, _brute_force_best(mask, given + [first])]
    # nothing left away from the placed points: a foreground pixel still, never the background
    single = np.zeros((12, 20), dtype=bool)
    single[7, 3] = True
    assert spread_points(single, [(3.0, 7.0)], 2) == [(3.0, 7.0), (3.0, 7.0)]


def test_evidence_samples_add_spread_points_and_keep_the_given_prompt(tmp_path):
    data = synthetic.write_dataset(tmp_path / "data", 4)
    samples = load_calibration(data, search_images=4, holdout_images=0).search
    assert evidence_samples(samples, "given") == samples
    expanded = evidence_samples(samples, "points")
    assert len(expanded) == 12
    for i, sample in enumerate(samples):
        first, *extra = expanded[3 * i: 3 * i + 3]
        assert first is sample
        for copy in extra:
            assert copy.image_sha256 == sample.image_sha256 and copy.prompt.points.shape == (1, 2)
            x, y = copy.prompt.points[0]
            assert sample.mask[int(y), int(x)]
            assert np.hypot(*(copy.prompt.points[0] - sample.prompt.points[0])) > 10  # spread, not on the click
    with pytest.raises(ValueError, match="unknown evidence 'clicks'"):
        evidence_samples(samples, "clicks")


def test_jittered_boxes_grow_and_shrink_each_side_and_stay_in_the_image():
    grown, shrunk = jittered_boxes(np.array([100, 200, 300, 600]), (1000, 1000), 2)
    np.testing.assert_allclose(grown, [90, 180, 310, 620])
    np.testing.assert_allclose(shrunk, [110, 220, 290, 580])
    clipped, _ = jittered_boxes(np.array([0, 10, 999, 200]), (500, 1000), 2)
    np.testing.assert_allclose(clipped, [0, 0.5, 1000, 209.5])
    with pytest.raises(ValueError, match="at most 2 derived boxes"):
        jittered_boxes(np.array([0, 0, 10, 10]), (20, 20), 3)


def test_a_box_prompt_gets_derived_boxes_and_a_point_prompt_derived_points(tmp_path):
    data = synthetic.write_dataset(tmp_path / "data", 2)

    def expanded(mode: str) -> list:
        return evidence_samples(load_calibration(data, prompt=mode, search_images=2, holdout_images=0).search,
                                "points")

    boxes, points = expanded("box"), expanded("point")
    assert len(boxes) == len(points) == 6
    own, *derived = boxes[:3]
    for copy, expected in zip(derived, jittered_boxes(own.prompt.box, own.hw, 2)):
        assert copy.prompt.points is None and copy.prompt.box.tolist() == expected.tolist()
    assert all(copy.prompt.box is None and copy.prompt.points.shape == (1, 2) for copy in points)


def test_mean_over_prompts_is_the_mean_of_each_images_prompt_ious(tmp_path):
    encoder, decoder = synthetic.write_models(tmp_path / "models")
    data = synthetic.write_dataset(tmp_path / "data", 5, seed=3)
    samples = load_calibration(data, search_images=5, holdout_images=0).search
    expanded = evidence_samples(samples, "points")
    evaluator = MaskEvaluator(decoder, expanded, encode(encoder, expanded, progress=False, cache_dir=tmp_path))
    index = reuse_index(synthetic.CHANNELS, [(synthetic.TARGET, synthetic.HELPER)])
    each = evaluator.ious(index)
    scorer = MeanOverPrompts(evaluator, 3)
    np.testing.assert_allclose(scorer.ious(index, [1, 3]), each.reshape(5, 3)[[1, 3]].mean(axis=1), rtol=0, atol=0)
    assert scorer.ious(index).shape == (5,)


def test_tune_with_points_evidence_finds_the_planted_pair_at_three_runs_per_image(tmp_path):
    encoder, decoder = synthetic.write_models(tmp_path / "models")
    data = synthetic.write_dataset(tmp_path / "data", 12)

    def run(evidence: str) -> dict:
        settings = TuneSettings(evidence=evidence, top_n=3, overlays=0, progress=False, cache_dir=str(tmp_path))
        return tune(encoder, decoder, data, tmp_path / "out", settings).report.to_json()

    given, points = run("given"), run("points")  # one folder: the second search must not reuse the first's journal
    assert points["reuse_map"]["sites"]["embedding"]["pairs"] == [[synthetic.TARGET, synthetic.HELPER]]
    assert points["cost"]["decoder_evaluations"]["search"] == 3 * given["cost"]["decoder_evaluations"]["search"]
    assert points["settings"]["evidence"] == "points"
    assert "also scored on 2 prompts of its own prompt's kind" in (tmp_path / "out" / "report.md").read_text()
    # Held-out images are scored on their own prompt alone, whatever the search's evidence.
    assert points["held_out"]["per_image"] == given["held_out"]["per_image"]
    assert points["cost"]["decoder_evaluations"]["held_out"] == given["cost"]["decoder_evaluations"]["held_out"]
    header = json.loads((tmp_path / "out" / JOURNAL).read_text().splitlines()[0])
    assert len(header["config"]["images"]) == 18  # 6 search images x 3 prompts
