"""IoU, bootstrap, salience, channel specs, the exhaustive and fast strategies and their resumable journal."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from sam_reuse.base.imaging import binary_iou
from sam_reuse.calibrate.fast import FastPlan, fast, guarded_prefix
from sam_reuse.calibrate.journal import Journal
from sam_reuse.calibrate.metrics import bootstrap_interval, pooled_bootstrap_interval
from sam_reuse.calibrate.salience import channel_salience, salience_order
from sam_reuse.calibrate.search import exhaustive, pair_space, parse_channels, top_distinct_targets
from sam_reuse.graphops.reuse_map import reuse_index


def test_iou_hand_computed_cases():
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared
    assert binary_iou(a, b) == pytest.approx(2 / 4)
    assert binary_iou(a, a) == 1.0
    assert binary_iou(a, ~a) == 0.0
    assert binary_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0  # empty union: 0, as the reference
    c = np.zeros((4, 4), dtype=bool)
    c[:2, :2] = True  # 4 pixels, shares (0,0),(0,1) with a: 2 / (3 + 4 - 2)
    assert binary_iou(a, c) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="differ in shape"):
        binary_iou(a, np.zeros((3, 4), dtype=bool))


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    rng = np.random.default_rng(1)
    diffs = rng.normal(2.0, 1.0, size=60)
    low, high = bootstrap_interval(diffs)
    assert low < diffs.mean() < high and high - low < 1.0
    assert bootstrap_interval(diffs) == (low, high)
    assert bootstrap_interval(np.zeros(10)) == (0.0, 0.0)


def test_pooled_interval_weights_each_set_equally_and_reduces_to_one_set():
    rng = np.random.default_rng(2)
    small, large = rng.normal(10.0, 1.0, size=10), rng.normal(0.0, 1.0, size=200)
    assert pooled_bootstrap_interval([small]) == bootstrap_interval(small)
    low, high = pooled_bootstrap_interval([small, large])
    assert low < (small.mean() + large.mean()) / 2 < high
    assert bootstrap_interval(np.concatenate([small, large]))[1] < low  # not the mean over all images
    assert all(np.isnan(pooled_bootstrap_interval([small, np.zeros(0)])))


def test_salience_is_the_mean_per_image_l2_norm():
    acts = np.zeros((2, 3, 2, 2), dtype=np.float32)  # 2 images, 3 channels, channel axis 1
    acts[0, 0] = 1.0  # norm 2
    acts[1, 0] = 3.0  # norm 6
    acts[:, 2] = [[0.0, 0.0], [3.0, 4.0]]  # norm 5 in both images
    np.testing.assert_allclose(channel_salience(acts, axis=1), [4.0, 0.0, 5.0])
    tokens = np.moveaxis(acts.reshape(2, 3, 4), 1, 2)  # (images, tokens, channels), axis -1
    np.testing.assert_allclose(channel_salience(tokens, axis=-1), [4.0, 0.0, 5.0])
    assert salience_order(np.array([1.0, 3.0, 3.0, 0.5])).tolist() == [1, 2, 0, 3]


def test_channel_specs():
    salience = np.array([5.0, 1.0, 4.0, 0.0, 3.0])
    assert parse_channels("all", 5) == [0, 1, 2, 3, 4]
    assert parse_channels("salient:2", 5, salience) == [0, 2]
    assert parse_channels("unsalient:2", 5, salience) == [1, 3]
    assert parse_channels("0, 3-4", 5) == [0, 3, 4]
    for bad in ("7", "2-1", "salient:0", "salient:x", "most:3", ""):
        with pytest.raises(ValueError):
            parse_channels(bad, 5, salience)
    with pytest.raises(ValueError, match="needs channel salience"):
        parse_channels("salient:2", 5)


def test_pairs_and_index():
    assert pair_space([1, 0], [0, 2]) == [(0, 2), (1, 0), (1, 2)]
    assert reuse_index(4, [(3, 0), (0, 3)]).tolist() == [3, 1, 2, 0]  # sources read the original tensor
    scored = [((0, 1), 0.5), ((0, 2), 0.9), ((1, 0), 0.5), ((2, 0), 0.1), ((1, 2), 0.5)]
    assert top_distinct_targets(scored, 2) == [(0, 2), (1, 0)]
    assert top_distinct_targets(scored, 5) == [(0, 2), (1, 0), (2, 0)]


class PlantedTask:
    """Per-image 'IoU' of a gather index, with a known best subset of pairs.

    Image i scores base[i] plus the effect of each pair present in the index.
    Pairs (1 <- 4) and (6 <- 2) help every image, (3 <- 5) helps alone but
    hurts when combined with (1 <- 4); everything else does nothing or hurts.
    """

    channels = 8

    def __init__(self, images: int = 5):
        rng = np.random.default_rng(0)
        self.base = rng.uniform(0.3, 0.6, size=images)
        self.calls = 0

    def __call__(self, index: np.ndarray, rows=None) -> np.ndarray:
        self.calls += 1
        present = {(t, int(s)) for t, s in enumerate(index) if s != t}
        score = self.base.copy()
        score += 0.05 * ((1, 4) in present) + 0.03 * ((6, 2) in present) + 0.02 * ((3, 5) in present)
        score -= 0.04 * ({(1, 4), (3, 5)} <= present)
        score -= 0.01 * len(present - {(1, 4), (6, 2), (3, 5)})
        return score if rows is None else score[list(rows)]


def _brute_force_best(task: PlantedTask, candidates):
    best, best_score = (), task(reuse_index(task.channels, ())).mean()
    for size in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            score = task(reuse_index(task.channels, subset)).mean()
            if score > best_score:
                best, best_score = subset, score
    return set(best)


def test_exhaustive_finds_the_planted_best_subset(tmp_path):
    task = PlantedTask()
    pairs = pair_space(range(8), range(8))
    result = exhaustive(task, 8, pairs, top_n=4, journal=Journal(tmp_path / "j.jsonl", {"t": 1}), images=5,
                        progress=False)
    assert result.candidates[:3] == [(1, 4), (6, 2), (3, 5)]
    assert set(result.best) == {(1, 4), (6, 2)} == _brute_force_best(PlantedTask(), result.candidates)
    assert len(result.subsets) == 15
    assert task.calls == 1 + 56 + 15 and result.evaluations == task.calls * 5 and result.reused == 0
    assert result.best_of_size(1) == ((1, 4),) and result.best_of_size(0) == ()
    np.testing.assert_allclose(result.ious_of(()), task.base)


def test_no_helpful_pair_gives_an_empty_map(tmp_path):
    def harmful(index, rows):
        return np.full(3, 0.5) - 0.1 * np.count_nonzero(index != np.arange(len(index)))

    result = exhaustive(harmful, 4, pair_space(range(4), range(4)), top_n=3,
                        journal=Journal(tmp_path / "j.jsonl", {}), images=3, progress=False)
    assert result.best == ()


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_the_same_result_without_repeating_work(tmp_path):
    pairs = pair_space(range(8), range(8))
    reference = exhaustive(PlantedTask(), 8, pairs, 4, Journal(tmp_path / "ref.jsonl", {"x": 1}), 5, progress=False)

    class Dying(PlantedTask):
        def __call__(self, index, rows):
            if self.calls == 30:
                raise Interrupt
            return super().__call__(index, rows)

    with pytest.raises(Interrupt):
        exhaustive(Dying(), 8, pairs, 4, Journal(tmp_path / "j.jsonl", {"x": 1}), 5, progress=False)
    # A kill while writing leaves half a line: it must be dropped, not break the resume.
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"kind": "pair", "key": "7<-6", "ious": [0.1, 0.')
    rest = PlantedTask()
    resumed = exhaustive(rest, 8, pairs, 4, Journal(tmp_path / "j.jsonl", {"x": 1}), 5, progress=False)
    assert resumed.best == reference.best
    assert resumed.pair_scores == reference.pair_scores
    assert rest.calls == (1 + 56 + 15) - 30 and resumed.reused == 30
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 1 + 56 + 15 and all(json.loads(line) for line in lines)


def test_journal_for_other_settings_is_replaced(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path, {"top_n": 3})
    journal.add("pair", "1<-2", ious=[0.5])
    assert Journal(path, {"top_n": 3}).get("pair", "1<-2") == {"kind": "pair", "key": "1<-2", "ious": [0.5]}
    other = Journal(path, {"top_n": 4})
    assert other.restarted and other.get("pair", "1<-2") is None
    assert len(path.read_text().splitlines()) == 1


class ScreeningTask:
    """A planted task for the fast strategy, on 16 channels and 20 images.

    Zeroing a target (1, 3, 6, 9) raises every image's IoU a little, zeroing
    a source (2, 4, 5, 10) lowers it; (1 <- 4) and (6 <- 2) help every image,
    (3 <- 5) helps alone but hurts beside (1 <- 4), and (9 <- 10) is a fluke:
    +0.5 on image 0, -0.005 on every other image. Its mean gain (+0.02) is real
    on the search split, but carried by one image, so a guarded choice drops it.
    """

    channels, images = 16, 20
    zero_effect = {1: 0.01, 3: 0.01, 6: 0.01, 9: 0.01, 2: -0.02, 4: -0.02, 5: -0.02, 10: -0.02}

    def __init__(self, real_pairs: bool = True):
        self.base = np.random.default_rng(0).uniform(0.3, 0.6, size=self.images)
        self.helpful = {(1, 4): 0.05, (6, 2): 0.03, (3, 5): 0.02} if real_pairs else {}
        self.rows_scored: list[int] = []

    def __call__(self, index: np.ndarray, rows) -> np.ndarray:
        rows = list(rows)
        self.rows_scored.append(len(rows))
        present = {(t, int(s)) for t, s in enumerate(index) if s != t}
        score = self.base.copy()
        for t, s in present:
            if s == self.channels:  # zeroed
                score += self.zero_effect.get(t, -0.001 * (t % 4))
            elif (t, s) == (9, 10):
                score += np.where(np.arange(self.images) == 0, 0.5, -0.005)
            else:
                score += self.helpful.get((t, s), -0.01)
        score -= 0.04 * ({(1, 4), (3, 5)} <= present and bool(self.helpful))
        return score[rows]


class TwoPromptTask(ScreeningTask):
    """``ScreeningTask`` with two prompts per image, whose mean is the task's IoU. The decoy (1 <- 4, 3 <- 5)
    looks best on each image's first prompt (+0.2) and is worse on its second by as much."""

    def __call__(self, index: np.ndarray, rows, prompts: slice = slice(None)) -> np.ndarray:
        present = {(t, int(s)) for t, s in enumerate(index) if s != t}
        decoy = 0.2 * ({(1, 4), (3, 5)} <= present)
        per_prompt = super().__call__(index, rows)[:, None] + np.array([decoy, -decoy])
        self.rows_scored[-1] *= len(range(2)[prompts])  # count decoder runs: prompts, not images
        return per_prompt[:, prompts].mean(axis=1)


PLAN = FastPlan(race_images=8, screen_keep=4, channels_paired=4, pair_keep=6, top_n=4, max_pairs=4, path_keep=2)


def _fast(tmp_path, task, selection="guarded", name="j.jsonl"):
    return fast(task, task.channels, range(task.channels), range(task.channels),
                Journal(tmp_path / name, {"fast": selection}), task.images, PLAN, selection, progress=False)


def test_fast_screens_races_and_guards_against_a_fluke(tmp_path):
    task = ScreeningTask()
    guarded = _fast(tmp_path, task)
    assert guarded.details["screening"]["targets"] == [1, 3, 6, 9]
    assert guarded.details["screening"]["sources"] == [2, 4, 5, 10]
    assert guarded.candidates == [(1, 4), (6, 2), (9, 10), (3, 5)]
    assert guarded.details["path"] == [[1, 4], [6, 2], [9, 10]]  # the naive path takes the fluke ...
    assert guarded.best == ((1, 4), (6, 2))  # ... the guarded choice does not
    assert guarded.curve == [(), ((1, 4),), ((1, 4), (6, 2)), ((1, 4), (6, 2), (9, 10))]
    np.testing.assert_allclose(guarded.ious_of(guarded.best) - task.base, 0.08)
    # Racing: 16 zeroings and 16 pairs on 8 images; only 8 channels and 6 pairs on the other 12. With one
    # prompt per image the greedy steps score every extension (3, 2 and 1) on every image.
    assert task.rows_scored.count(8) == 16 + 16 and task.rows_scored.count(12) == 8 + 6
    assert task.rows_scored.count(20) == 1 + 3 + 2 + 1
    assert guarded.evaluations == sum(task.rows_scored)
    exhaustive_runs = (1 + 16 * 15 + 2 ** 4 - 1) * 20
    assert guarded.evaluations < exhaustive_runs / 2
    naive = _fast(tmp_path, ScreeningTask(), "naive", "naive.jsonl")
    assert naive.best == ((1, 4), (6, 2), (9, 10)) and naive.curve == guarded.curve


def test_greedy_steps_race_extensions_on_first_prompts_and_choose_on_all(tmp_path):
    task = TwoPromptTask()
    journal = Journal(tmp_path / "j.jsonl", {})
    result = fast(task, task.channels, range(task.channels), range(task.channels), journal, task.images, PLAN,
                  progress=False, per_image=2)
    # Step 2 (after (1, 4)) races (6, 2), the fluke (9, 10) and the decoy (3, 5) on the first prompts: the decoy
    # and (6, 2) lead and go on to the second prompts, where the decoy falls back; the fluke is raced out.
    assert result.details["path"] == [[1, 4], [6, 2], [9, 10]] and result.best == ((1, 4), (6, 2))
    scored_everywhere = dict(result.subsets)
    assert ((1, 4), (3, 5)) in scored_everywhere and ((1, 4), (9, 10)) not in scored_everywhere
    np.testing.assert_allclose(scored_everywhere[((1, 4), (3, 5))] - task.base, 0.05 + 0.02 - 0.04)
    assert {key for kind, key in journal.entries if kind == "subset"} == {
        "1<-4;6<-2#first", "1<-4;9<-10#first", "1<-4;3<-5#first", "1<-4;6<-2#others", "1<-4;3<-5#others",
        "1<-4;6<-2;9<-10#first", "1<-4;3<-5;6<-2#first", "1<-4;6<-2;9<-10#others", "1<-4;3<-5;6<-2#others",
        "1<-4;3<-5;6<-2;9<-10#first", "1<-4;3<-5;6<-2;9<-10#others"}
    # counted in decoder runs (2 per image, 1 for a part); the path ran to its longest, as planned
    assert result.evaluations == sum(task.rows_scored) == PLAN.planned_runs(16, task.images, per_image=2)
    again = fast(TwoPromptTask(), task.channels, range(task.channels), range(task.channels), journal, task.images,
                 PLAN, progress=False, per_image=2)
    assert again.evaluations == 0 and again.best == result.best and again.details == result.details


def test_guard_returns_the_empty_map_when_only_a_fluke_helps(tmp_path):
    result = _fast(tmp_path, ScreeningTask(real_pairs=False))
    assert result.details["path"] == [[9, 10]] and result.best == ()
    assert result.details["guarded_pairs"] == 0 and result.details["naive_pairs"] == 1


def test_guarded_prefix_keeps_the_best_positive_lower_bound():
    base = np.zeros(30)
    steady = np.full(30, 0.02)
    lucky = np.where(np.arange(30) == 0, 0.9, 0.0)
    assert guarded_prefix(base, [steady, steady + 0.01, steady + 0.01 + lucky])[0] == 2
    assert guarded_prefix(base, [lucky])[0] == 0
    assert guarded_prefix(base, [])[0] == 0


def test_fast_resumes_from_its_journal_without_new_work(tmp_path):
    first = _fast(tmp_path, ScreeningTask())
    again_task = ScreeningTask()
    again = _fast(tmp_path, again_task)
    assert again.best == first.best and again.pair_scores == first.pair_scores
    assert again_task.rows_scored == [] and again.evaluations == 0 and again.reused > 0


def test_cross_validation_scores_each_image_by_a_map_chosen_without_it(tmp_path):
    def run(selection):
        task = ScreeningTask()
        return fast(task, task.channels, range(16), range(16), Journal(tmp_path / f"{selection}.jsonl", {}),
                    task.images, PLAN, selection, cv_folds=5, progress=False).details["cross_validation"]

    guarded, naive = run("guarded"), run("naive")
    assert guarded["fold_maps"] == [[[1, 4], [6, 2]]] * 5
    np.testing.assert_allclose(guarded["per_image_gain"], 8.0)
    # Naive folds that see image 0 keep the fluke, which costs 0.5 points on each of the 16 other images.
    assert [len(m) for m in naive["fold_maps"]] == [2, 3, 3, 3, 3]
    assert naive["gain"] == pytest.approx((16 * 7.5 + 4 * 8.0) / 20)
    with pytest.raises(ValueError, match="2 to 20 folds"):
        fast(ScreeningTask(), 16, range(16), range(16), Journal(tmp_path / "x.jsonl", {}), 20, PLAN, cv_folds=1)
    with pytest.raises(ValueError, match="at least one extension"):
        fast(ScreeningTask(), 16, range(16), range(16), Journal(tmp_path / "x.jsonl", {}), 20,
             dataclasses.replace(PLAN, path_keep=0))


class FlipsOrSteadyTask:
    """Pair (0, 5) moves 45 of 50 images up 2 points and 5 down 1 (+1.7 on average); pair (1, 6) flips 5 images
    up 45 points and 1 down 45 (+3.6 on average, carried by 6 images)."""

    channels, images = 8, 50

    def __init__(self):
        self.base = np.full(self.images, 0.5)
        self.steady = np.where(np.arange(self.images) % 10 == 0, -0.01, 0.02)
        self.flips = np.zeros(self.images)
        self.flips[[3, 17, 25, 30, 44]], self.flips[8] = 0.45, -0.45

    def __call__(self, index, rows, prompts=slice(None)):
        ious = self.base + self.steady * (index[0] == 5) + self.flips * (index[1] == 6)
        return ious[list(rows)]


def test_the_trimmed_objective_prefers_a_pair_that_helps_most_images_over_a_few_flips(tmp_path):
    task = FlipsOrSteadyTask()
    journal = tmp_path / "j.jsonl"

    def search(objective: str):
        return fast(task, task.channels, range(8), range(8), Journal(journal, {}), task.images, PLAN, "naive",
                    progress=False, shortlist=[(0, 5), (1, 6)], objective=objective)

    mean, trimmed = search("mean"), search("trimmed")
    assert mean.details["path"] == [[1, 6], [0, 5]]  # the flips carry the mean
    # Trimmed, the 5 largest and smallest changes do not count: the steady pair first, then the flips add 0.
    assert trimmed.details["path"] == [[0, 5]] and trimmed.details["objective"] == "trimmed"
    assert trimmed.pair_scores[0] == ((0, 5), pytest.approx(0.02)) and trimmed.pair_scores[1][1] == 0
    assert trimmed.evaluations == 0  # every map it needed was in the mean search's journal
    with pytest.raises(ValueError, match="unknown objective 'median'"):
        search("median")


def test_a_journal_line_from_another_configuration_is_dropped_with_what_follows(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path, {"top_n": 3})
    journal.add("pair", "1<-2", ious=[0.5])
    Journal(tmp_path / "other.jsonl", {"top_n": 4}).add("pair", "3<-4", ious=[0.9, 0.9])
    foreign = (tmp_path / "other.jsonl").read_text().splitlines()[1]
    with open(path, "a") as f:  # pasted from another run's journal
        f.write(foreign + "\n")
    journal.add("pair", "5<-6", ious=[0.25])
    resumed = Journal(path, {"top_n": 3})
    assert resumed.get("pair", "1<-2") == {"kind": "pair", "key": "1<-2", "ious": [0.5]}
    assert resumed.get("pair", "3<-4") is None and resumed.get("pair", "5<-6") is None
    assert len(path.read_text().splitlines()) == 2  # the header and the first unit
