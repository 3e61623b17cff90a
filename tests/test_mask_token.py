"""The mask-token rewrite against SAM's own decoder, the token choice on planted tasks, and the tune that ships it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sam_reuse.base.contract import MASK_TOKEN_PROPERTY
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.runtime import ort_session
from sam_reuse.calibrate.token_choice import choose_token
from sam_reuse.calibrate.tune import TUNED_DECODER, TuneSettings, tune
from sam_reuse.cli import main
from sam_reuse.graphops.mask_token import mask_token_of, with_mask_token
from tests import synthetic


def _operators(model: onnx.ModelProto) -> list[str]:
    """The graph's computing nodes (constants aside: the rewrite makes its two as initializers)."""
    return sorted(n.op_type for n in model.graph.node if n.op_type != "Constant")


def test_every_mask_token_is_sams_own_mask_and_iou(tiny_exports):
    """Token 0 is the single mask, tokens 1-3 SAM's multimask output (torch), at the original's node count."""
    import torch

    from sam_reuse.exporter.models import build_sam
    from sam_reuse.exporter.wrappers import PromptsDecoder, SingleMaskDecoder, example_decoder_inputs

    sam = build_sam("test_vit_t", seed=0)  # the weights the tiny export was made from
    decoder = onnx.load(str(tiny_exports["test_vit_t"].decoder))
    embedding, coords, labels, mask_input, _ = example_decoder_inputs(3, 2)
    inputs = (embedding[:1], coords[:1], labels[:1], mask_input[:1], torch.zeros(1))
    with torch.no_grad():
        single = SingleMaskDecoder(sam).eval()(*inputs)
        multimask = PromptsDecoder(sam, multimask=True).eval()(*inputs)
    names = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
    assert mask_token_of(decoder) == 0
    for token in range(4):
        rewritten = with_mask_token(decoder, token)
        masks, ious = ort_session(rewritten.SerializeToString()).run(
            None, dict(zip(names, (t.numpy() for t in inputs))))
        want = single if token == 0 else [t[:, token - 1:token] for t in multimask]
        np.testing.assert_allclose(masks, want[0].numpy(), rtol=0, atol=1e-3)
        np.testing.assert_allclose(ious, want[1].numpy(), rtol=0, atol=1e-5)
        assert mask_token_of(rewritten) == token and _operators(rewritten) == _operators(decoder)
        assert {p.key: p.value for p in rewritten.metadata_props}[MASK_TOKEN_PROPERTY] == str(token)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in decoder.graph.output]


def test_a_decoder_without_token_slices_or_a_fifth_token_is_refused():
    with pytest.raises(SamReuseError, match="decoder.onnx: no Slice.s. choosing one of 4 mask tokens before "
                                            "'low_res_masks'.*export again"):
        mask_token_of(synthetic.decoder_model(), "decoder.onnx")
    with pytest.raises(SamReuseError, match="mask token 4: SAM's decoder has tokens 0 to 3"):
        with_mask_token(synthetic.tokens_decoder_model(), 4)


def _ious(gains: list[float], base: float = 0.5) -> np.ndarray:
    return base + np.asarray(gains)


def test_a_token_that_helps_steadily_ships_and_one_that_flips_a_few_images_does_not():
    steady = [0.04, 0.05, 0.03, 0.06, 0.04, 0.05] * 5
    flips = [0.0] * 27 + [0.9, 0.9, -0.3]
    search = [_ious([0.0] * 30), _ious(steady), _ious(flips), _ious([-0.2] * 30)]
    choice = choose_token(search, search, search, "cross-fitted")
    assert choice.candidate == 1 and choice.token == 1 and choice.decision.ship_tuned
    # The search split's best token loses on the held-out split: token 0 stays.
    held = [_ious([0.0] * 30), _ious([-0.05] * 30), _ious(flips), _ious([-0.2] * 30)]
    kept = choose_token(search, held, held, "cross-fitted")
    assert kept.candidate == 1 and kept.token == 0 and not kept.decision.ship_tuned


def test_tune_ships_the_planted_token_and_searches_on_its_masks(tmp_path, capsys):
    encoder, decoder = synthetic.write_models(tmp_path / "models", tokens=True)
    data = synthetic.write_dataset(tmp_path / "data", 12)
    out = tmp_path / "out"
    argv = ["tune", "--out", str(out), "--encoder", str(encoder), "--decoder", str(decoder), "--data", str(data),
            "--top-pairs", "3", "--overlays", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    token = report["mask_token"]
    assert token["shipped"] == token["candidate"] == synthetic.OBJECT_TOKEN and token["decoder"] == TUNED_DECODER
    assert token["held_out_miou"][0] < 5 < 90 < token["held_out_miou"][synthetic.OBJECT_TOKEN]
    assert mask_token_of(out / TUNED_DECODER) == synthetic.OBJECT_TOKEN
    # The reuse search ran on the object token's masks: the planted pair (which fixes token 0) has nothing to do.
    assert report["held_out"]["baseline_miou"] == pytest.approx(token["held_out_miou"][synthetic.OBJECT_TOKEN])
    assert report["reuse_map"]["sites"]["embedding"]["pairs"] == [] and report["shipping"]["shipped"] == "original"
    assert report["shipping"]["exit_status"] == 0 and report["cost"]["decoder_evaluations"]["mask_tokens"] > 0
    assert f"with {out / TUNED_DECODER} (exit status 0)" in printed
    assert "## Mask token" in (out / "report.md").read_text()
    # On token 0 the planted pair is what fixes the masks; the tune in the same folder drops the decoder it no
    # longer ships.
    assert main([*argv, "--mask-token", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mask_token"] is None and not (out / TUNED_DECODER).exists()
    assert report["reuse_map"]["sites"]["embedding"]["pairs"] == [[synthetic.TARGET, synthetic.HELPER]]


def test_a_given_token_ships_and_a_decoder_that_cannot_switch_is_refused(tmp_path, capsys):
    encoder, decoder = synthetic.write_models(tmp_path / "models", tokens=True)
    data = synthetic.write_dataset(tmp_path / "data", 8)
    settings = TuneSettings(mask_token="2", top_n=2, overlays=0, progress=False, cache_dir=str(tmp_path))
    result = tune(encoder, decoder, data, tmp_path / "out", settings)
    assert result.report.mask_token.chosen_by == "--mask-token" and result.shipped_decoder == TUNED_DECODER
    assert mask_token_of(tmp_path / "out" / TUNED_DECODER) == 2 and result.exit_status == 0
    plain_encoder, plain_decoder = synthetic.write_models(tmp_path / "plain")
    assert main(["tune", "--out", str(tmp_path / "plain-out"), "--encoder", str(plain_encoder), "--decoder",
                 str(plain_decoder), "--data", str(data), "--mask-token", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export-and-tune: error: --mask-token:") and "before 'low_res_masks'" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "plain-out" / "report.json").exists()
    # An already switched decoder is not tuned again (its token would be taken for SAM's single mask).
    with pytest.raises(SamReuseError, match="already returns mask token 2"):
        tune(encoder, tmp_path / "out" / TUNED_DECODER, data, tmp_path / "again", settings)


def test_cli_rewrites_a_decoder_to_a_token_and_refuses_bad_requests(tiny_exports, tmp_path, capsys):
    export = tiny_exports["test_vit_t"]
    out = tmp_path / "decoder.token3.onnx"
    assert main(["mask-token", str(export.decoder), "3", "--out", str(out)]) == 0
    assert mask_token_of(out) == 3 and f"wrote {out} (mask token 3)" in capsys.readouterr().out
    for argv, problem in ((["mask-token", str(export.decoder), "7", "--out", str(tmp_path / "x.onnx")],
                           "mask token 7: SAM's decoder has tokens 0 to 3"),
                          (["mask-token", str(export.decoder), "1", "--out", str(export.encoder)],
                           f"--out {export.encoder}: holds a SAM encoder"),
                          (["mask-token", str(export.decoder), "1", "--out", str(export.decoder)],
                           "is an input of this command")):
        assert main(argv) == 2
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and mask_token_of(export.decoder) == 0


def test_a_report_written_before_mask_tokens_loads_without_one(tmp_path):
    from sam_reuse.calibrate.report import TuneReport

    encoder, decoder = synthetic.write_models(tmp_path / "models", tokens=True)
    settings = TuneSettings(top_n=2, overlays=0, progress=False, cache_dir=str(tmp_path))
    tune(encoder, decoder, synthetic.write_dataset(tmp_path / "data", 8), tmp_path / "out", settings)
    older = json.loads((tmp_path / "out" / "report.json").read_text())
    assert older.pop("mask_token")["shipped"] == synthetic.OBJECT_TOKEN
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert TuneReport.load(tmp_path / "older.json").mask_token is None


def test_runs_errors_name_the_published_folder_not_its_work_folder(tmp_path, capsys):
    encoder, decoder = synthetic.write_models(tmp_path / "plain")
    data = synthetic.write_dataset(tmp_path / "data", 8)
    out = tmp_path / "out"
    assert main(["run", "--encoder", str(encoder), "--decoder", str(decoder), "--data", str(data), "--out", str(out),
                 "--mask-token", "1", "--engines", "none", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--mask-token: {out / 'decoder.onnx'}: no Slice" in err and ".run-work" not in err


def test_the_single_click_rule_takes_the_best_multimask_mask_for_one_click_only(tiny_exports, tmp_path, capsys):
    """SamOnnxModel's return_single_mask rule, on our prompts: one click (its padding point aside) and no box -> the
    multimask token with the best predicted IoU; two clicks, or a box -> token 0."""
    from sam_reuse.graphops.mask_token import recorded_token, with_every_token, with_single_click_rule

    decoder = onnx.load(str(tiny_exports["test_vit_t"].decoder))
    out = tmp_path / "decoder.click.onnx"
    assert main(["mask-token", str(tiny_exports["test_vit_t"].decoder), "click", "--out", str(out)]) == 0
    clicked = onnx.load(str(out))
    assert recorded_token(clicked) == "click"
    assert _operators(with_single_click_rule(decoder)) == _operators(clicked)
    rng = np.random.default_rng(0)
    prompts = {"one click": ([[300, 400], [0, 0]], [1, -1]), "a negative click": ([[300, 400], [0, 0]], [0, -1]),
               "two clicks": ([[300, 400], [500, 600]], [1, 0]), "a box": ([[100, 100], [700, 800]], [2, 3])}
    every, rule = ort_session(with_every_token(decoder).SerializeToString()), ort_session(str(out))
    for name, (coords, labels) in prompts.items():
        feeds = {"image_embeddings": rng.normal(size=(1, 256, 64, 64)).astype(np.float32),
                 "point_coords": np.array([coords], np.float32), "point_labels": np.array([labels], np.float32),
                 "mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32)}
        masks, ious = every.run(None, feeds)
        token = 1 + int(np.argmax(ious[0, 1:])) if name in ("one click", "a negative click") else 0
        chosen_masks, chosen_iou = rule.run(None, feeds)
        np.testing.assert_array_equal(chosen_masks[0, 0], masks[0, token])
        assert chosen_iou[0, 0] == ious[0, token], name
    assert main(["mask-token", str(tiny_exports["test_vit_t"].decoder), "seven", "--out", str(tmp_path / "x")]) == 2
    assert "mask token 'seven': a number 0 to 3, or click" in capsys.readouterr().err


def test_an_export_of_the_older_layout_is_made_again_not_reused(tiny_exports, tmp_path):
    """Decoders exported before every mask token was computed cannot switch tokens: run must not reuse them."""
    import shutil

    from sam_reuse.exporter.onnx_export import existing_export

    folder = tmp_path / "export"
    shutil.copytree(tiny_exports["test_vit_t"].encoder.parent, folder)
    assert existing_export(folder, "test_vit_t") is not None
    info = json.loads((folder / "export.json").read_text())
    del info["layout"]
    (folder / "export.json").write_text(json.dumps(info))
    assert existing_export(folder, "test_vit_t") is None
