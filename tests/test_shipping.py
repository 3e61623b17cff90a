"""The shipping rule: planted helpful maps ship, planted harmful ones do not, and the files say which."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam_reuse.base.files import staged_outputs
from sam_reuse.calibrate.shipping import (
    ORIGINAL_SHIPPED,
    TUNED_SHIPPED,
    Gain,
    cross_fitted_gains,
    decide_on_cross_validation,
    decide_on_held_out,
    held_out_parts,
)
from sam_reuse.calibrate.tune import TuneSettings, tune
from sam_reuse.cli import main
from tests import synthetic


def _curve(*gains_per_map: list[float], baseline: float = 0.5) -> list[np.ndarray]:
    """Held-out IoUs of the original and of each curve map, from per-image gains in IoU units."""
    base = np.full(len(gains_per_map[0]), baseline)
    return [base] + [base + np.asarray(g) for g in gains_per_map]


def test_held_out_parts_interleave_and_cover_every_image_once():
    validation, test = held_out_parts(7)
    assert validation.tolist() == [0, 2, 4, 6] and test.tolist() == [1, 3, 5]


def test_validated_selection_picks_the_map_the_validation_part_likes_and_reports_the_test_part():
    # Validation rows (even) like map 1 a little, map 2 a lot; test rows (odd) tell another story for map 2.
    map1 = [0.02, 0.00, 0.03, 0.00, 0.02, 0.00, 0.03, 0.00]
    map2 = [0.20, -0.10, 0.25, -0.10, 0.20, -0.10, 0.25, -0.10]
    decision = decide_on_held_out(_curve(map1, map2), search_choice=1, selection="validated")
    assert decision.candidate == 2 and decision.ship_tuned and decision.exit_status == TUNED_SHIPPED
    assert decision.decided.gain == pytest.approx(22.5) and decision.decided.images == 4
    assert decision.reported.gain == pytest.approx(-10.0) and decision.reported.label() == "harmful"
    assert decision.verdict.startswith("improvement: validation part of the held-out split (4 of 8 images) +22.50")
    assert decision.verdict.endswith("; the tuned encoder ships")
    # guarded/naive keep the search's own choice; the validation part still decides whether it ships.
    assert decide_on_held_out(_curve(map1, map2), search_choice=1, selection="guarded").candidate == 1


def test_cross_fitting_scores_each_half_with_the_map_the_other_half_chose():
    # The even half likes map 2, the odd half map 1: odd images get map 2's gains, even images map 1's.
    map1 = np.array([0.00, 0.10, 0.00, 0.12, 0.01, 0.11])
    map2 = np.array([0.20, -0.30, 0.22, -0.20, 0.21, -0.25])
    curve = _curve(map1, map2)
    gains = cross_fitted_gains(curve, held_out_parts(6))
    np.testing.assert_allclose(gains, [0.0, -30.0, 0.0, -20.0, 1.0, -25.0], atol=1e-9)
    decision = decide_on_held_out(curve, search_choice=2)
    assert decision.candidate == 1  # on all six images map 1 has the better bound
    assert not decision.ship_tuned and decision.reported == decision.decided and decision.decided.gain < 0
    assert decision.verdict.startswith("harmful: held-out split, cross-fitted (each of 6 images")


def test_a_map_that_flips_a_few_images_a_lot_is_not_chosen_over_one_that_helps_most_a_little():
    steady = np.full(50, 0.02)
    steady[::10] = -0.01  # +2 points on 45 images, -1 on 5
    flips = np.zeros(50)
    flips[[3, 17, 30, 44]], flips[[8, 41]] = 0.9, -0.6  # +4.8 points on average, carried by 6 images
    assert flips.mean() > steady.mean()
    decision = decide_on_held_out(_curve(steady, flips), search_choice=2)
    assert decision.candidate == 1 and decision.ship_tuned
    assert decision.reported.gain == pytest.approx(1.7) and decision.reported.improved == 45


def _planted_gains(mean: float, spread: float, seed: int) -> np.ndarray:
    """50 per-image gains (IoU units) with exactly this mean and standard deviation, shaped by the seed."""
    draws = np.random.default_rng(seed).normal(size=50)
    return mean + spread * (draws - draws.mean()) / draws.std()


def test_a_real_small_gain_on_50_images_ships_where_half_of_them_rarely_show_it():
    # +3 points per image with a spread of 9 (flips smoothed over several prompts), 20 draws of its shape.
    cross_fitted, validated = [], []
    for seed in range(20):
        curve = _curve(_planted_gains(0.03, 0.09, seed))
        cross_fitted.append(decide_on_held_out(curve, search_choice=1))
        validated.append(decide_on_held_out(curve, search_choice=1, selection="validated"))
    assert all(d.ship_tuned and d.decided.images == 50 for d in cross_fitted)
    assert sum(d.ship_tuned for d in validated) <= 10 and all(d.decided.images == 25 for d in validated)
    unshipped = next(d for d in validated if not d.ship_tuned and d.decided.gain > 0)
    assert f"needs about {unshipped.decided.images_needed} images to show" in unshipped.verdict


def test_a_small_harmful_map_does_not_ship_on_50_images():
    for seed in range(20):
        decision = decide_on_held_out(_curve(_planted_gains(-0.02, 0.09, seed)), search_choice=1)
        assert not decision.ship_tuned and decision.decided.gain < 0 and decision.decided.images_needed is None


def test_images_needed_scales_the_interval_to_a_bound_of_zero():
    gain = Gain(images=25, gain=2.0, interval=(-1.0, 5.0), improved=10, unchanged=5, worse=10)
    assert gain.images_needed == 57  # 25 x (3 / 2)^2 = 56.25
    assert Gain(25, -1.0, (-3.0, 1.0), 5, 5, 15).images_needed is None


def test_a_harmful_map_does_not_ship_unless_forced():
    harmful = [-0.3, -0.2, -0.3, -0.2, -0.25, -0.2]
    decision = decide_on_held_out(_curve(harmful), search_choice=1)
    assert not decision.ship_tuned and decision.exit_status == ORIGINAL_SHIPPED and decision.candidate == 1
    assert decision.verdict.startswith("harmful:") and decision.verdict.endswith("; the original encoder ships")
    forced = decide_on_held_out(_curve(harmful), search_choice=1, force=True)
    assert forced.ship_tuned and forced.forced and forced.verdict.endswith("ships anyway (--ship-anyway)")


def test_an_unreliable_gain_does_not_ship_and_ties_keep_the_shorter_map():
    mixed = [0.3, 0.0, -0.2, 0.0, 0.1, 0.0, -0.1, 0.0]
    decision = decide_on_held_out(_curve(mixed, mixed), search_choice=2)
    assert decision.candidate == 1 and not decision.ship_tuned
    assert decision.verdict.startswith("no reliable improvement:")
    assert decide_on_held_out(_curve(mixed), search_choice=1, force=False).decided.label() == "no reliable improvement"


def test_no_candidate_ships_the_original_and_says_why():
    decision = decide_on_held_out(_curve([0.1, 0.1])[:1], search_choice=0, empty_reason="nothing helped")
    assert (decision.candidate, decision.ship_tuned, decision.verdict) == (0, False,
                                                                          "nothing helped: the original encoder ships")
    assert decide_on_cross_validation(np.zeros(4), 0, folds=2).exit_status == ORIGINAL_SHIPPED


def test_without_a_held_out_split_the_cross_validated_gain_decides():
    assert decide_on_cross_validation(np.array([5.0, 4.0, 6.0, 5.0]), 2, folds=2).ship_tuned
    unsure = decide_on_cross_validation(np.array([5.0, -4.0, 6.0, -5.0]), 2, folds=2)
    assert not unsure.ship_tuned and unsure.basis.startswith("cross-validated estimate (2 folds")


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="unknown selection 'best'"):
        decide_on_held_out(_curve([0.1]), 1, selection="best")


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """The synthetic task whose held-out masks are the background: the planted pair helps search, hurts held-out."""
    root = tmp_path_factory.mktemp("shifted")
    encoder, decoder = synthetic.write_models(root / "models")
    return {"encoder": encoder, "decoder": decoder, "cache": root / "cache",
            "harmful": synthetic.write_dataset(root / "harmful", 12, background_from=6),
            "helpful": synthetic.write_dataset(root / "helpful", 12)}


def _cli(task, data, out, *extra) -> list[str]:
    return ["tune", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]), "--data", str(data),
            "--out", str(out), "--top-pairs", "3", "--evidence", "given", "--cache-dir", str(task["cache"]),
            "--no-progress", "--overlays", "1", *extra]


def test_a_planted_harmful_map_is_kept_back_and_the_exit_status_says_so(shifted, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_cli(shifted, shifted["harmful"], out)) == ORIGINAL_SHIPPED
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    # The search loved the pair; the validation part said harmful; the original ships.
    assert report["search"]["tuned_miou"] - report["search"]["baseline_miou"] > 80
    assert report["shipping"]["shipped"] == "original" and report["shipping"]["decided_on"]["label"] == "harmful"
    assert report["verdict"].startswith("harmful: held-out split, cross-fitted (each of 6 images scored with the "
                                        "map chosen on the other half)")
    assert report["shipping"]["encoder"] == str(shifted["encoder"])
    assert f"shipped: the original encoder {shifted['encoder']} (exit status 3" in printed
    assert not (out / "encoder.tuned.onnx").exists() and not (out / "reuse_map.json").exists()
    kept = json.loads((out / "reuse_map.not-shipped.json").read_text())
    assert kept["sites"]["embedding"]["pairs"] == [[synthetic.TARGET, synthetic.HELPER]]
    assert (out / "encoder.tuned.not-shipped.onnx").stat().st_size > 0
    assert "**Shipped:** the original encoder" in (out / "report.md").read_text()
    # Forced: the same candidate ships under the shipping names, and the not-shipped copies are gone.
    assert main(_cli(shifted, shifted["harmful"], out, "--ship-anyway")) == TUNED_SHIPPED
    report = json.loads((out / "report.json").read_text())
    assert report["shipping"]["forced"] and report["verdict"].endswith("ships anyway (--ship-anyway)")
    assert (out / "encoder.tuned.onnx").exists() and not list(out.glob("*not-shipped*"))


def test_a_run_that_ships_the_original_removes_an_earlier_tuned_encoder(shifted, tmp_path):
    out = tmp_path / "out"
    settings = TuneSettings(top_n=3, evidence="given", overlays=0, progress=False, cache_dir=str(shifted["cache"]))
    assert tune(shifted["encoder"], shifted["decoder"], shifted["helpful"], out, settings).decision.ship_tuned
    stale_engine = out / "encoder.tuned.fp16.engine"
    with staged_outputs(out) as staging:  # published as the engine stage publishes it
        (staging / stale_engine.name).write_bytes(b"engine of the earlier tuned encoder")
    user_file = out / "notes.txt"
    user_file.write_text("mine")
    assert not tune(shifted["encoder"], shifted["decoder"], shifted["harmful"], out, settings).decision.ship_tuned
    assert not (out / "encoder.tuned.onnx").exists() and not stale_engine.exists()
    assert (out / "encoder.tuned.not-shipped.onnx").exists() and user_file.read_text() == "mine"


@pytest.mark.parametrize("selection", ["guarded", "naive"])
def test_search_chosen_selections_are_kept_back_by_the_validation_part_too(shifted, tmp_path, selection):
    settings = TuneSettings(top_n=3, evidence="given", overlays=0, progress=False, cache_dir=str(shifted["cache"]),
                            selection=selection)
    result = tune(shifted["encoder"], shifted["decoder"], shifted["harmful"], tmp_path, settings)
    assert result.decision.candidate == 1 and not result.decision.ship_tuned
