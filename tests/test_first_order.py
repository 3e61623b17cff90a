"""The first-order strategy: the scorer's meaning (M = G X^T, checked by autograd and finite differences),
its export (ONNX Runtime against torch), the pair ranking, the search on a shortlist, and the tune end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam_reuse.base import imaging
from sam_reuse.base.contract import FIRST_ORDER_SCORER
from sam_reuse.calibrate.first_order import FirstOrderScores, first_order_scores
from sam_reuse.calibrate.journal import Journal
from sam_reuse.cli import main
from sam_reuse.exporter.models import build_sam
from sam_reuse.exporter.wrappers import FirstOrderScorer, SingleMaskDecoder
from tests.conftest import SAMPLES
from tests.test_search import PLAN, ScreeningTask


@pytest.fixture(scope="module")
def scorer_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("first-order")
    assert main(["export", "--model-type", "test_vit_t", "--out", str(out), "--verify-images", "2",
                 "--first-order"]) == 0
    return out


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    coords, labels = torch.tensor([[[400.0, 300.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]])
    mask = np.zeros((600, 800), bool)
    mask[150:400, 250:600] = True
    target, valid = (torch.from_numpy(a[None]) for a in imaging.low_res_target(mask))
    return embedding, coords, labels, target, valid


def _soft_iou(decoder: SingleMaskDecoder, embedding, coords, labels, target, valid) -> torch.Tensor:
    logits = decoder(embedding, coords, labels, torch.zeros(1, 1, 256, 256), torch.zeros(1))[0]
    probability = torch.sigmoid(logits[:, 0]) * valid
    overlap = (probability * target).sum()
    return overlap / (probability.sum() + target.sum() - overlap)


def test_channel_products_are_the_gradient_times_the_embedding_and_predict_a_small_reuse():
    """M from the scorer (transposed convolutions as einsums) equals G X^T from autograd through the plain
    decoder; a small step towards the pair t <- s changes the soft IoU by step * (M[t, s] - M[t, t])."""
    sam = build_sam("test_vit_t")
    scorer, decoder = FirstOrderScorer(sam).eval(), SingleMaskDecoder(sam).eval()
    embedding, coords, labels, target, valid = _inputs()
    products, soft_iou = scorer(embedding, coords, labels, target, valid)
    x = embedding.clone().requires_grad_(True)
    reference = _soft_iou(decoder, x, coords, labels, target, valid)
    (gradient,) = torch.autograd.grad(reference, x)
    expected = gradient.reshape(256, -1) @ embedding.reshape(256, -1).T
    assert float(soft_iou) == pytest.approx(reference.item(), rel=1e-5)
    np.testing.assert_allclose(products[0].numpy(), expected.numpy(), atol=1e-5 * float(expected.abs().max()))
    m = products[0].double().numpy()
    for t, s in ((3, 7), (100, 20), (255, 0)):
        step = 1e-3
        moved = embedding.clone()
        moved[0, t] += step * (embedding[0, s] - embedding[0, t])
        with torch.no_grad():
            change = float(_soft_iou(decoder, moved, coords, labels, target, valid) - reference)
        predicted = step * (m[t, s] - m[t, t])
        assert change == pytest.approx(predicted, rel=0.05, abs=1e-7), (t, s)


def test_low_res_target_covers_the_image_part_of_the_padded_frame():
    mask = np.zeros((600, 900), bool)
    mask[100:300, 200:500] = True
    target, valid = imaging.low_res_target(mask)
    assert target.shape == valid.shape == (256, 256)
    assert valid[:171, :256].all() and not valid[171:].any()  # 600 x 900 -> 683 x 1024 -> 171 x 256
    assert target.sum() == pytest.approx(mask.mean() * valid.sum(), rel=0.01)
    assert target[valid == 0].max() == 0 and 0 <= target.min() and target.max() == 1


def test_exported_scorer_matches_torch_and_scores_the_search_prompts(scorer_export, sample_records):
    from sam_reuse.calibrate.activations import encode
    from sam_reuse.calibrate.data import load_sample

    info = json.loads((scorer_export / "export.json").read_text())["models"]["first_order"]
    assert info["file"] == FIRST_ORDER_SCORER and info["max_rel_diff_vs_torch"] < 1e-4
    samples = [load_sample(r) for r in sample_records[:2]]
    embeddings = encode(scorer_export / "encoder.onnx", samples, progress=False)
    scores = first_order_scores(scorer_export / FIRST_ORDER_SCORER, samples, embeddings, progress=False)
    scorer = FirstOrderScorer(build_sam("test_vit_t")).eval()
    expected = np.zeros((256, 256))
    for sample, embedding in zip(samples, embeddings):
        coords, labels = imaging.prompt_arrays(sample.prompt, sample.hw)
        target, valid = imaging.low_res_target(sample.mask)
        inputs = (embedding[None], coords, labels, target[None], valid[None])
        expected += scorer(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))[0][0].double().numpy() / 2
    assert (scores.prompts, scores.left_out) == (2, 0)
    np.testing.assert_allclose(scores.products, expected, atol=1e-4 * np.abs(expected).max())


def test_best_pairs_rank_by_first_order_change_with_a_cap_per_target():
    products = np.zeros((6, 6))
    products[2, 5] = 3.0  # 2 <- 5 gains 3
    products[2, 4] = 2.0
    products[2, 1] = 1.5
    products[3, 3] = -1.0  # zeroing 3 would gain 1: every 3 <- s gains at least 1
    products[3, 0] = 0.5
    scores = FirstOrderScores(products, prompts=1, left_out=0)
    assert scores.pair_changes()[2, 5] == 3.0 and scores.pair_changes()[3, 0] == 1.5
    assert np.isneginf(np.diag(scores.pair_changes())).all()
    assert scores.best_pairs(4, range(6), range(6), per_target=2) == [(2, 5), (2, 4), (3, 0), (3, 1)]
    assert scores.best_pairs(3, [2], [4, 5, 2], per_target=5) == [(2, 5), (2, 4)]  # no 2 <- 2


def test_fast_on_a_shortlist_skips_screening_and_finds_the_planted_pairs(tmp_path):
    from sam_reuse.calibrate.fast import fast

    task = ScreeningTask()
    shortlist = [(1, 4), (6, 2), (9, 10), (3, 5), (0, 7), (8, 11)]
    journal = Journal(tmp_path / "j.jsonl", {})
    result = fast(task, task.channels, range(task.channels), range(task.channels), journal, task.images, PLAN,
                  "guarded", progress=False, shortlist=shortlist)
    assert "screening" not in result.details and result.details["shortlist"] == [list(p) for p in shortlist]
    assert result.best == ((1, 4), (6, 2))
    assert all(pair in shortlist for pair, _ in result.pair_scores) and len(result.pair_scores) == PLAN.pair_keep
    assert result.evaluations <= PLAN.planned_runs(0, task.images, len(shortlist))
    assert task.rows_scored[1:1 + len(shortlist)] == [8] * len(shortlist)  # every pair raced ...
    assert {kind for kind, _ in journal.entries} == {"baseline", "pair", "subset"}  # ... and nothing zeroed


def test_tune_first_order_end_to_end_and_its_refusals(scorer_export, tiny_exports, tmp_path, capsys):
    argv = ["tune", "--out", str(scorer_export), "--data", str(SAMPLES), "--strategy", "first-order",
            "--search-images", "3", "--holdout-images", "3", "--top-pairs", "2", "--no-progress",
            "--evidence", "given", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) in (0, 3)
    report = json.loads((scorer_export / "report.json").read_text())
    assert report["settings"]["strategy"] == "first-order" and len(report["strategy_details"]["shortlist"]) == 48
    assert report["search"]["pairs_scored"] == 24  # FIRST_ORDER_PLAN's pair_keep
    capsys.readouterr()
    plain = tiny_exports["test_vit_t"].decoder.parent  # the shared export has no scorer
    assert not (plain / FIRST_ORDER_SCORER).exists()
    pair = ["--encoder", str(plain / "encoder.onnx"), "--decoder", str(plain / "decoder.onnx")]
    assert main([*argv[:2], str(tmp_path / "plain"), *pair, *argv[3:]]) == 2
    assert f"--strategy first-order: no {plain / FIRST_ORDER_SCORER} (export with --first-order" in \
        capsys.readouterr().err
    # Without --strategy: first-order where the scorer is, fast (and one line saying why) where it is not.
    default = [arg for arg in argv if arg not in ("--strategy", "first-order")]
    assert main(default) in (0, 3) and capsys.readouterr().out.count(FIRST_ORDER_SCORER) == 0
    assert json.loads((scorer_export / "report.json").read_text())["settings"]["strategy"] == "first-order"
    assert main([*default[:2], str(tmp_path / "plain"), *pair, *default[3:], "--targets", "0-3",
                 "--sources", "4-7"]) in (0, 3)
    assert f"no {FIRST_ORDER_SCORER} beside {plain / 'decoder.onnx'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["settings"]["strategy"] == "fast"
    assert main([*argv, "--site", "mlp.0"]) == 2
    assert "--strategy first-order scores reuse at the image embedding only" in capsys.readouterr().err
