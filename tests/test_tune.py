"""`tune` / `evaluate` / `export-and-tune` end to end: planted improvement, resume after kill, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from sam_reuse.base.contract import FIRST_ORDER_SCORER, JOURNAL, REUSE_MAP_PROPERTY
from sam_reuse.base.errors import SamReuseError
from sam_reuse.calibrate.report import TuneReport
from sam_reuse.calibrate.tune import TuneSettings, evaluate, tune
from sam_reuse.cli import main
from sam_reuse.graphops.reuse_map import ReuseMap
from tests import synthetic
from tests.conftest import REPO, SAMPLES

OUTPUTS = ["encoder.tuned.onnx", "reuse_map.json", "report.json", "report.md", "miou_vs_pairs.png"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    encoder, decoder = synthetic.write_models(root / "models")
    slow_encoder, slow_decoder = synthetic.write_models(root / "slow", slow=12)
    data = synthetic.write_dataset(root / "data", 12)
    mlp_encoder = root / "mlp" / "encoder.onnx"
    mlp_encoder.parent.mkdir()
    onnx.save(synthetic.mlp_encoder_model(), str(mlp_encoder))
    return {"encoder": encoder, "decoder": decoder, "slow_decoder": slow_decoder, "data": data,
            "mlp_encoder": mlp_encoder, "cache": root / "cache"}


def _settings(task, **kwargs) -> TuneSettings:
    # One prompt per search image, so that units of work and decoder runs below are counted 1:1 (the
    # default at the embedding, 3 prompts, is tested in test_default_evidence_depends_on_the_site).
    return TuneSettings(progress=False, cache_dir=str(task["cache"]), **{"top_n": 3, "evidence": "given", **kwargs})


# units of work (maps x row ranges) each strategy measures on the synthetic task, and the curve it reports:
# exhaustive: baseline + 56 pairs + 7 subsets; fast: baseline + 8 zeroings + 56 pairs + 2 greedy trials.
STRATEGY_WORK = {"exhaustive": (1 + 56 + 7, [0, 1, 2, 3]), "fast": (1 + 8 + 56 + 2, [0, 1])}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_WORK))
def test_tune_finds_the_planted_pair_and_reports_held_out_gain(task, tmp_path, strategy):
    units, curve = STRATEGY_WORK[strategy]
    result = tune(task["encoder"], task["decoder"], task["data"], tmp_path,
                  _settings(task, overlays=2, strategy=strategy))
    pairs = result.reuse_map.sites["embedding"].pairs
    assert pairs == ((synthetic.TARGET, synthetic.HELPER),)
    report = json.loads((tmp_path / "report.json").read_text())
    held = report["held_out"]
    assert held["images"] == 6 and held["baseline_miou"] < 5 and held["tuned_miou"] > 90
    assert held["gain_interval_90"][0] > 50 and report["verdict"].startswith("improvement")
    assert report["shipping"]["shipped"] == "tuned" and result.decision.exit_status == 0
    assert report["search"]["candidates"][0] == [synthetic.TARGET, synthetic.HELPER]
    assert report["cost"]["decoder_evaluations"]["search"] == units * 6
    assert _journal_entries(tmp_path / "search.jsonl") == units
    assert report["tuned_encoder_check"]["max_abs_diff"] == 0.0
    assert [p["pairs"] for p in report["curve"]] == curve
    for name in OUTPUTS + report["overlays"]:
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(report["overlays"]) == 2
    assert ReuseMap.load(tmp_path / "reuse_map.json").sites["embedding"].pairs == pairs
    # The map rides in the shipped encoder: its fingerprint and pairs, no local path and no record id.
    shipped = onnx.load(str(tmp_path / "encoder.tuned.onnx"))
    carried = next(p.value for p in shipped.metadata_props if p.key == REUSE_MAP_PROPERTY)
    assert str(task["data"]) not in carried and str(tmp_path) not in carried
    assert not any(key in carried for key in report["data"]["search"] + report["data"]["held_out"])
    assert json.loads(carried)["meta"]["search_images"] == 6
    # The tuned encoder, run end to end, reproduces what the search measured through the probe.
    tuned = evaluate(tmp_path / "encoder.tuned.onnx", task["decoder"], task["data"], settings=_settings(task))
    assert tuned.miou == pytest.approx(held["tuned_miou"], abs=1e-9)
    original = evaluate(task["encoder"], task["decoder"], task["data"], settings=_settings(task))
    assert original.miou == pytest.approx(held["baseline_miou"], abs=1e-9)
    # Same inputs, same map; the second run reads every map back from the journal.
    again = tune(task["encoder"], task["decoder"], task["data"], tmp_path,
                 _settings(task, overlays=2, strategy=strategy))
    assert again.reuse_map.to_json() == result.reuse_map.to_json()
    assert again.report.cost["decoder_evaluations"]["search"] == 0
    assert again.report.cost["maps_reused_from_journal"] == units
    # report.json is the typed report, saved: it reads back to the same report.
    assert TuneReport.load(tmp_path / "report.json") == again.report


def test_default_evidence_depends_on_the_site(task, tmp_path):
    """3 prompts per search image at the embedding, 1 inside the encoder, unless the user says otherwise."""
    def report(encoder, site: str, folder: str) -> dict:
        settings = TuneSettings(site=site, top_n=3, overlays=0, progress=False, cache_dir=str(task["cache"]))
        return tune(encoder, task["decoder"], task["data"], tmp_path / folder, settings).report.to_json()

    embedding, inner = report(task["encoder"], "embedding", "embedding"), report(task["mlp_encoder"], "mlp.0", "mlp")
    assert (embedding["settings"]["evidence"], inner["settings"]["evidence"]) == ("points", "given")
    assert embedding["reuse_map"]["sites"]["embedding"]["pairs"] == [[synthetic.TARGET, synthetic.HELPER]]
    units = STRATEGY_WORK["fast"][0]
    assert embedding["cost"]["decoder_evaluations"]["search"] == units * 6 * 3
    assert "also scored on 2 prompts of its own prompt's kind" in (tmp_path / "embedding" / "report.md").read_text()
    assert "prompt's kind" not in (tmp_path / "mlp" / "report.md").read_text()


def test_tune_inside_the_encoder_finds_the_planted_hidden_pair_and_prunes_it(task, tmp_path):
    result = tune(task["mlp_encoder"], task["decoder"], task["data"], tmp_path,
                  _settings(task, site="mlp.0", overlays=0))
    assert result.reuse_map.sites["mlp.0"].pairs == ((synthetic.HIDDEN_TARGET, synthetic.HIDDEN_HELPER),)
    report = result.report.to_json()
    assert (report["settings"]["targets"], report["settings"]["sources"]) == ("unsalient:8", "salient:8")
    assert report["site"]["tensor"] == "hidden" and report["strategy_details"]["plan"]["race_images"] == 8
    held = report["held_out"]
    assert held["baseline_miou"] < 5 and held["tuned_miou"] > 80 and report["verdict"].startswith("improvement")
    # Pruned: the replaced hidden channel is gone from both linear layers, and the output is unchanged.
    assert report["tuned_encoder_check"] == {"image": report["tuned_encoder_check"]["image"], "max_abs_diff": 0.0,
                                             "rewrite": "mlp.0: prune"}
    graph = onnx.load(str(tmp_path / "encoder.tuned.onnx")).graph
    dims = {t.name: tuple(t.dims) for t in graph.initializer}
    assert [dims[n.input[1]] for n in graph.node if n.op_type == "MatMul"] == [(3, 7), (7, 8)]
    tuned = evaluate(tmp_path / "encoder.tuned.onnx", task["decoder"], task["data"], settings=_settings(task))
    assert tuned.miou == pytest.approx(held["tuned_miou"], abs=1e-9)


def test_unknown_site_is_an_error_naming_the_sites_there(task, tmp_path):
    with pytest.raises(SamReuseError, match=r"no site 'mlp.7' \(no such site; this encoder has: embedding, mlp.0;"):
        tune(task["mlp_encoder"], task["decoder"], task["data"], tmp_path, _settings(task, site="mlp.7"))
    assert not any(tmp_path.iterdir())


def test_restricted_pair_space_without_the_helper_finds_nothing(task, tmp_path):
    result = tune(task["encoder"], task["decoder"], task["data"], tmp_path,
                  _settings(task, sources="0-4,6-7", overlays=0))
    assert result.reuse_map.num_pairs == 0 and result.decision.exit_status == 3
    assert result.report.held_out.gain.gain == 0.0 and result.report.shipping.decided_on is None
    assert result.report.verdict == "no pair improved the search split: the original encoder ships"
    assert result.report.shipping.encoder == str(task["encoder"])
    assert not list(tmp_path.glob("encoder.tuned*")) and not list(tmp_path.glob("reuse_map*"))


def test_without_a_held_out_split_the_report_gives_a_cross_validated_estimate(task, tmp_path, capsys):
    result = tune(task["encoder"], task["decoder"], task["data"], tmp_path,
                  _settings(task, search_images=12, holdout_images=0, cv_folds=3))
    report = result.report.to_json()
    assert result.reuse_map.sites["embedding"].pairs == ((synthetic.TARGET, synthetic.HELPER),)
    assert report["held_out"] is None and report["overlays"] == []
    cv = report["strategy_details"]["cross_validation"]
    assert cv["folds"] == 3 and len(cv["per_image_gain"]) == 12 and cv["fold_maps"] == [[[2, 5]]] * 3
    assert report["estimate"]["basis"].startswith("cross-validated estimate (3 folds")
    assert report["estimate"]["gain_interval_90"][0] > 50 and report["verdict"].startswith("improvement: cross")
    assert "No held-out split" in (tmp_path / "report.md").read_text()
    assert all(p["held_out_miou"] is None for p in report["curve"])
    assert (tmp_path / "miou_vs_pairs.png").stat().st_size > 0
    args = ["tune", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]), "--data", str(task["data"]),
            "--holdout-images", "0", "--cache-dir", str(task["cache"]), "--no-progress"]
    exhaustive = args + ["--strategy", "exhaustive", "--out", str(tmp_path / "x")]
    assert "needs a held-out split" in _cli_error(capsys, exhaustive)
    too_many_folds = args + ["--cv-folds", "20", "--out", str(tmp_path / "y")]
    assert "cannot make 20 cross-validation folds" in _cli_error(capsys, too_many_folds)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _journal_entries(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def test_killed_search_resumes_to_the_identical_map(task, tmp_path):
    """SIGKILL the CLI mid-search (default strategy), rerun it: same map, finished work is not redone."""
    args = ["tune", "--encoder", str(task["encoder"]), "--decoder", str(task["slow_decoder"]),
            "--data", str(task["data"]), "--top-pairs", "3", "--cache-dir", str(task["cache"]), "--no-progress",
            "--overlays", "0", "--evidence", "given"]  # one prompt per image: a unit of work is 6 decoder runs
    reference = tmp_path / "reference"
    assert main(args + ["--out", str(reference)]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "sam_reuse.cli", *args, "--out", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_entries(out / "search.jsonl") < 10 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, f"the search ended before it could be killed: {process.stderr.read()!r}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _journal_entries(out / "search.jsonl")
    units = _journal_entries(reference / "search.jsonl")
    assert 10 <= done < units and not (out / "reuse_map.json").exists()
    assert main(args + ["--out", str(out)]) == 0
    assert (out / "reuse_map.json").read_text() == (reference / "reuse_map.json").read_text()
    resumed = json.loads((out / "report.json").read_text())
    first = json.loads((reference / "report.json").read_text())
    assert resumed["cost"]["maps_reused_from_journal"] >= done - 1  # the line being written may be lost
    assert resumed["cost"]["decoder_evaluations"]["search"] == (units - resumed["cost"]["maps_reused_from_journal"]) * 6
    assert resumed["search"] == first["search"] and resumed["held_out"] == first["held_out"]


def test_two_tunes_into_one_folder_one_is_refused_naming_the_other(task, tmp_path, capsys):
    """A second tune into a folder a running tune holds gets one line with the holder's PID, and writes nothing."""
    args = ["tune", "--encoder", str(task["encoder"]), "--decoder", str(task["slow_decoder"]),
            "--data", str(task["data"]), "--top-pairs", "3", "--cache-dir", str(task["cache"]), "--no-progress",
            "--overlays", "0", "--evidence", "given", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "sam_reuse.cli", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_entries(tmp_path / "out" / "search.jsonl") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, f"the first tune ended too soon: {first.stderr.read()!r}"
    journal = (tmp_path / "out" / "search.jsonl").read_bytes()
    second = [*args, "--prompt", "box"]  # other settings: it would restart the journal
    message = _cli_error(capsys, second)
    assert f"in use by PID {first.pid}" in message and str(tmp_path / "out") in message
    assert (tmp_path / "out" / "search.jsonl").read_bytes().startswith(journal)  # the first one's journal intact
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert main(second) == 0  # a killed holder leaves no lock behind
    assert not (tmp_path / "out" / ".sam-reuse.lock").exists()


def test_a_symlink_planted_as_the_lock_file_is_refused_and_not_followed(task, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".sam-reuse.lock").symlink_to(victim)
    message = _cli_error(capsys, ["tune", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]),
                                  "--data", str(task["data"]), "--out", str(out), "--no-progress"])
    assert message == (f"export-and-tune: error: {out / '.sam-reuse.lock'}: a symbolic link where the folder's lock "
                       "file goes; remove it (not followed: Too many levels of symbolic links)")
    assert victim.read_text() == "someone else's file"
    assert sorted(p.name for p in out.iterdir()) == [".sam-reuse.lock"]


def test_a_symlink_planted_as_the_run_work_folder_is_refused_and_its_target_left_alone(task, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "theirs.txt").write_text("not ours")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run-work").symlink_to(elsewhere, target_is_directory=True)
    message = _cli_error(capsys, ["run", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]),
                                  "--data", str(task["data"]), "--out", str(out), "--no-progress", "--engines", "none"])
    assert message.endswith(f"{out / '.run-work'}: not the folder an interrupted run leaves (a symbolic link or a "
                            "file); remove it")
    assert [p.name for p in elsewhere.iterdir()] == ["theirs.txt"] and (out / ".run-work").is_symlink()


def test_a_folder_where_an_output_goes_stops_the_publish_before_any_file_moves(task, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["tune", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]), "--data", str(task["data"]),
            "--out", str(out), "--top-pairs", "2", "--cache-dir", str(task["cache"]), "--no-progress",
            "--overlays", "0", "--evidence", "given"]
    assert main(argv) == 0
    (out / "miou_vs_pairs.png").unlink()
    (out / "miou_vs_pairs.png").mkdir()
    before = _hashes(out)
    message = _cli_error(capsys, argv + ["--targets", "0-3"])  # another search: every output would change
    assert message.endswith(f"{out / 'miou_vs_pairs.png'}: a folder where an output goes; nothing was published "
                            "(move it away)")
    after = _hashes(out)
    assert after.pop(JOURNAL) != before.pop(JOURNAL)  # the journal is progress, written as the search goes
    assert after == before


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("export-and-tune: error: ")
    return err[-1]


def test_bad_inputs_exit_2_naming_the_problem_and_write_nothing(task, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["tune", "--out", str(out), "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]),
            "--data", str(task["data"]), "--cache-dir", str(task["cache"]), "--no-progress"]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx")
    no_site = tmp_path / "no_site.onnx"
    model = synthetic.encoder_model()
    model.graph.output[0].name = "features"
    model.graph.node[-1].output[0] = "features"
    onnx.save(model, str(no_site))
    cases = {
        "encoder ONNX not found": base[:4] + [str(tmp_path / "missing.onnx")] + base[5:],
        "not a readable ONNX model": base[:4] + [str(garbage)] + base[5:],
        "no_site.onnx: not a SAM encoder exported by export-and-tune (inputs image; expected image -> "
        "image_embeddings)": base[:4] + [str(no_site)] + base[5:],
        "data folder not found": base[:8] + [str(tmp_path / "nodata")] + base[9:],
        "--targets: 'salient:99': expected salient:K with 1 <= K <= 8": base + ["--targets", "salient:99"],
        "--sources: 'x'": base + ["--sources", "x"],
        "--top-pairs must be at least 1": base + ["--top-pairs", "0"],
        "--augment must be between 0 and 2 (the alterations: mirror-flat-warm, blur-dark-cool), not 3":
            base + ["--augment", "3"],
        "only 1 usable search record(s) of 1 (at least 2 needed)": base + ["--search-images", "1"],
        "split asks for 10 search + 5 held-out records, the data has 12": base + ["--search-images", "10",
                                                                                  "--holdout-images", "5"],
    }
    for expected, argv in cases.items():
        assert expected in _cli_error(capsys, argv), expected
        assert not out.exists(), expected


def test_skipped_records_are_one_warning_on_the_command_line(task, tmp_path, capsys):
    data = synthetic.write_dataset(tmp_path / "data", 6)
    (data / "img01.png").write_bytes(b"broken")
    (data / "img04_mask.png").unlink()
    assert main(["evaluate", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]), "--data", str(data),
                 "--split", "all", "--cache-dir", str(task["cache"]), "--no-progress",
                 "--json", str(tmp_path / "eval.json")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("export-and-tune: warning:") == 1 and "skipped 2 unusable record(s)" in captured.err
    assert "img01" in captured.err and "img04" in captured.err
    assert "all split (4 images): mIoU" in captured.out
    assert len(json.loads((tmp_path / "eval.json").read_text())["per_image"]) == 4


def test_run_exports_a_tiny_model_tunes_it_and_reuses_the_export(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model-type", "test_vit_t", "--out", str(out), "--data", str(SAMPLES), "--search-images", "2",
            "--holdout-images", "2", "--targets", "0-2", "--sources", "3-4", "--top-pairs", "2", "--overlays", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--verify-images", "1", "--quantize", "int8"]
    status = main(argv)
    first = capsys.readouterr().out
    assert "parity vs torch" in first and "verdict:" in first
    report = json.loads((out / "report.json").read_text())
    shipped = out / report["shipping"]["encoder"]
    int8 = json.loads(shipped.with_name(shipped.name.replace(".onnx", ".int8.onnx.json")).read_text())
    assert int8["source_onnx"] == shipped.name and int8["held_out"]["images"] == 2
    assert f"int8 {int8['held_out']['int8_miou']:.2f}" in first
    assert int8["latency"]["int8_over_fp32"] > 0 and int8["latency"]["threads"] >= 1
    assert report["int8"] == {"model": shipped.name.replace(".onnx", ".int8.onnx"), "images": 2,
                              "fp32_miou": int8["held_out"]["fp32_miou"], "int8_miou": int8["held_out"]["int8_miou"],
                              "latency_ratio": int8["latency"]["int8_over_fp32"], "threads": int8["latency"]["threads"]}
    encoder_tuned = report["shipping"]["shipped"] == "tuned"
    # The INT8 encoder is scored with the shipped decoder, on whose mask token the held-out figures are measured.
    assert report["int8"]["fp32_miou"] == pytest.approx(report["held_out"]["tuned_miou" if encoder_tuned
                                                                          else "baseline_miou"])
    assert f"| int8 | {int8['held_out']['int8_miou']:.2f} (" in (out / "report.md").read_text()
    token = report["mask_token"]
    decoder = "decoder.tuned" if token["shipped"] else "decoder"
    assert token["decoder"] == f"{decoder}.onnx" and (token["shipped"] == 0) != (out / "decoder.tuned.onnx").exists()
    assert status == report["shipping"]["exit_status"] == (0 if encoder_tuned or token["shipped"] else 3)
    for name in ["encoder.onnx", "decoder.onnx", "export.json", *report["shipping"]["candidate_files"], *OUTPUTS[2:]]:
        assert (out / name).exists(), name
    assert report["search"]["pairs_scored"] == 6 and report["held_out"]["images"] == 2
    # run exports the first-order scorer, so its default search is first-order.
    assert report["settings"]["strategy"] == "first-order" and (out / FIRST_ORDER_SCORER).exists()
    if "engines skipped" not in first:  # TensorRT(-RTX) installed: engines of what ships come with the ONNX
        shipped = "encoder.tuned" if encoder_tuned else "encoder"
        assert not list(out.glob(f"{'encoder' if encoder_tuned else 'encoder.tuned'}.fp*.engine"))
        for name in (shipped, decoder):
            for precision in ("fp32", "fp16"):
                assert (out / f"{name}.{precision}.engine").stat().st_size > 0
                assert json.loads((out / f"{name}.{precision}.engine.json").read_text())["precision"] == precision
    assert main([*argv, "--engines", "none", "--quantize", "none"]) == status  # the rerun tests reuse only
    second = capsys.readouterr().out
    assert "reusing the verified export" in second and "engine" not in second and "int8" not in second
    reused = json.loads((out / "report.json").read_text())["cost"]["maps_reused_from_journal"]
    assert reused == _journal_entries(out / "search.jsonl") >= 1 + 6  # baseline, 6 pairs (no zeroing)


def test_evaluator_scores_real_mobilesam_like_sampredictor(mobilesam_export, mobilesam_checkpoint, sample_records):
    """The probe evaluator's IoU equals IoU of SamPredictor.predict(multimask_output=False) masks."""
    from segment_anything import SamPredictor

    from sam_reuse.base.imaging import binary_iou, load_image_rgb
    from sam_reuse.calibrate.activations import encode
    from sam_reuse.calibrate.data import load_sample
    from sam_reuse.calibrate.evaluator import MaskEvaluator
    from sam_reuse.exporter.models import build_sam

    samples = [load_sample(r) for r in sample_records[:3]]
    embeddings = encode(mobilesam_export.encoder, samples, progress=False, cache_dir=None)
    ours = MaskEvaluator(mobilesam_export.decoder, samples, embeddings, batch_size=2).ious()
    predictor = SamPredictor(build_sam("vit_t", mobilesam_checkpoint))
    reference = []
    for sample in samples:
        predictor.set_image(load_image_rgb(sample.record.image))
        masks, _, _ = predictor.predict(sample.prompt.points, sample.prompt.labels, multimask_output=False)
        reference.append(binary_iou(masks[0], sample.mask))
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert 0.3 < np.mean(ours) < 1.0


def test_suffix_scoring_at_a_real_mlp_site_equals_the_pruned_encoder(mobilesam_export, sample_records, tmp_path):
    """Scoring through the cached prefix + suffix gives the embedding the rewritten MobileSAM encoder computes."""
    from sam_reuse.base.imaging import load_image_rgb, preprocess
    from sam_reuse.base.runtime import ort_session
    from sam_reuse.calibrate.activations import encode
    from sam_reuse.calibrate.data import load_sample
    from sam_reuse.calibrate.suffix import SuffixEmbedder
    from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse
    from sam_reuse.graphops.rewrites import apply_reuse_map
    from sam_reuse.graphops.sites import sites_of

    samples = [load_sample(r) for r in sample_records[:2]]
    encoder = onnx.load(str(mobilesam_export.encoder))
    site = sites_of(mobilesam_export.encoder)["mlp.9"]
    embedder = SuffixEmbedder(encoder, site, samples, cache_dir=str(tmp_path), progress=False)
    assert embedder.frontier[0] == site.tensor and len(embedder.frontier) == 2  # the site and the residual
    identity = np.arange(site.channels)
    np.testing.assert_array_equal(embedder.embeddings(identity, [0, 1]), embedder.original_embeddings())
    np.testing.assert_allclose(embedder.original_embeddings(),
                               encode(encoder, samples, progress=False, cache_dir=str(tmp_path / "full")), atol=1e-5)

    pairs = ((5, 100), (17, 900), (1100, 3))
    reuse = SiteReuse(tensor=site.tensor, axis=site.axis, channels=site.channels, pairs=pairs)
    tuned, applied = apply_reuse_map(encoder, ReuseMap(model_fingerprint="", sites={"mlp.9": reuse}),
                                     check_fingerprint=False)
    assert applied == {"mlp.9": "prune"}
    session = ort_session(tuned.SerializeToString())
    for row, sample in enumerate(samples):
        image = preprocess(load_image_rgb(sample.record.image))
        pruned = session.run(["image_embeddings"], {session.get_inputs()[0].name: image})[0][0]
        searched = embedder.embeddings(reuse.index(), [row])[0]
        assert np.abs(searched - embedder.original_embeddings()[row]).max() > 1e-3  # the map does change it
        np.testing.assert_allclose(pruned, searched, atol=1e-4)


def test_run_takes_an_existing_onnx_pair(task, tmp_path, capsys):
    out = tmp_path / "pair"
    argv = ["run", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]), "--data", str(task["data"]),
            "--out", str(out), "--top-pairs", "2", "--cache-dir", str(task["cache"]), "--no-progress",
            "--overlays", "0"]
    assert main(argv) == 0
    assert (out / "encoder.onnx").read_bytes() == task["encoder"].read_bytes()
    assert (out / "decoder.onnx").read_bytes() == task["decoder"].read_bytes()
    assert f"{synthetic.TARGET} <- {synthetic.HELPER}" in capsys.readouterr().out
    assert "--encoder and --decoder go together" in _cli_error(capsys, argv[:3] + argv[5:])


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_publishes_its_whole_set_at_once_and_resumes_after_an_interrupt(task, tmp_path, capsys, monkeypatch):
    """Into a folder holding an earlier run, with the user's own file beside it: a run that fails late and a run
    interrupted after its search leave every file as it was; the rerun resumes the search and publishes all."""
    from sam_reuse.calibrate import tune as tune_module

    out = tmp_path / "run"
    argv = ["run", "--encoder", str(task["encoder"]), "--decoder", str(task["decoder"]), "--data", str(task["data"]),
            "--out", str(out), "--top-pairs", "2", "--cache-dir", str(task["cache"]), "--no-progress",
            "--overlays", "0", "--evidence", "given", "--engines", "none"]
    earlier = argv + ["--targets", "0-3", "--sources", "4-7"]  # another search: other settings, other journal
    assert main(earlier) in (0, 3)
    (out / "notes.txt").write_text("the user's")
    before = _hashes(out)

    failing = _with_option(argv, "--decoder", str(task["encoder"]))  # found out only after the pair is copied
    assert main(failing) == 2 and "not a SAM decoder" in capsys.readouterr().err
    assert _hashes(out) == before and not (out / ".run-work").exists()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "_assess", interrupted)
    assert main(argv) == 130
    published = {k: v for k, v in _hashes(out).items() if not k.startswith(".run-work/")}
    assert published == before  # the new search's journal lies in the work folder only
    searched = _journal_entries(out / ".run-work" / "search.jsonl")
    assert searched > 1
    monkeypatch.undo()

    assert main(argv) == 0
    assert not (out / ".run-work").exists() and (out / "notes.txt").read_text() == "the user's"
    report = json.loads((out / "report.json").read_text())
    assert report["cost"]["maps_reused_from_journal"] == searched
    assert report["model"]["encoder"] == "encoder.onnx" and report["shipping"]["encoder"] == "encoder.tuned.onnx"
    assert TuneReport.load(out / "report.json").candidate_pairs == [[synthetic.TARGET, synthetic.HELPER]]
    assert (out / "encoder.onnx").read_bytes() == task["encoder"].read_bytes()


def _with_option(argv: list[str], option: str, value: str) -> list[str]:
    at = argv.index(option) + 1
    return argv[:at] + [value] + argv[at + 1:]


def test_evaluator_batches_mixed_prompts_and_image_sizes_like_one_at_a_time(task, tmp_path):
    """Batching groups prompts by length and upscales each mask to its own image's size."""
    from PIL import Image

    from sam_reuse.base.contract import decoder_feeds
    from sam_reuse.base.imaging import binary_iou, logits_to_mask, prompt_arrays, upscale_logits
    from sam_reuse.base.runtime import ort_session
    from sam_reuse.calibrate.activations import encode
    from sam_reuse.calibrate.data import load_calibration
    from sam_reuse.calibrate.evaluator import MaskEvaluator

    data = synthetic.write_dataset(tmp_path / "data", 8)
    for i in (1, 4, 6):  # non-square images (and masks) of another size
        for name in (f"img{i:02d}.png", f"img{i:02d}_mask.png"):
            with Image.open(data / name) as img:
                img.resize((256, 160), Image.Resampling.NEAREST).save(data / name)
    lines = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    for i in (1, 4, 6):
        lines[i]["points"] = [[x, y * 160 // 256] for x, y in lines[i]["points"]]
    for i in (2, 5):  # point + box: three prompt points instead of point + padding point
        lines[i]["box"] = [40, 40, 200, 150]
    (data / "manifest.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    samples = load_calibration(data, search_images=8, holdout_images=0, min_images=0).search
    embeddings = encode(task["encoder"], samples, cache_dir=task["cache"], progress=False)
    index = np.arange(synthetic.CHANNELS)
    index[synthetic.TARGET] = synthetic.HELPER
    batched = MaskEvaluator(task["decoder"], samples, embeddings, batch_size=4)
    assert sorted(len(b) for b in batched.batches()) == [2, 2, 4]
    one_by_one = MaskEvaluator(task["decoder"], samples, embeddings, batch_size=1)
    everything = batched.ious(index)
    np.testing.assert_array_equal(everything, one_by_one.ious(index))
    np.testing.assert_array_equal(batched.ious(index, rows=[6, 2, 5]), everything[[6, 2, 5]])  # any subset, in order
    zeroed = index.copy()
    zeroed[synthetic.TARGET] = batched.zero  # the mask channel reads zeros: the mask is empty, IoU 0
    assert everything.min() > 0.5 and batched.ious(zeroed).max() == 0.0
    plain = ort_session(str(task["decoder"]))
    for i, sample in enumerate(samples):  # the plain decoder on the gathered embedding, upscaled by hand
        coords, labels = prompt_arrays(sample.prompt, sample.hw)
        logits = plain.run(["low_res_masks"], decoder_feeds(embeddings[i:i + 1][:, index], coords, labels))[0]
        expected = binary_iou(logits_to_mask(upscale_logits(logits[0, 0], sample.hw)), sample.mask)
        assert batched.ious(index)[i] == pytest.approx(expected, abs=1e-12)
    assert batched.evaluations == 8 + 3 + 8 + 8 * 8


def test_run_takes_an_encoder_saved_with_external_data(tmp_path):
    """Models over 2 GB (SAM ViT-H) must keep their weights in external data files: run copies them along."""
    encoder, decoder = synthetic.write_models(tmp_path / "models")
    external = tmp_path / "external"
    external.mkdir()
    onnx.save(onnx.load(str(encoder)), str(external / "encoder.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="encoder.weights", size_threshold=0)
    assert (external / "encoder.weights").stat().st_size > 0
    data = synthetic.write_dataset(tmp_path / "data", 8)
    out = tmp_path / "out"
    status = main(["run", "--encoder", str(external / "encoder.onnx"), "--decoder", str(decoder), "--data", str(data),
                   "--out", str(out), "--evidence", "given", "--top-pairs", "2", "--engines", "none",
                   "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert status in (0, 3) and (out / "encoder.weights").is_file() and (out / "report.json").is_file()


@pytest.mark.parametrize("damage", ["truncated", "NaN", "float64"])
def test_a_damaged_activation_cache_entry_is_recomputed(tmp_path, damage):
    from sam_reuse.calibrate.activations import encode
    from sam_reuse.calibrate.data import load_calibration

    encoder, _ = synthetic.write_models(tmp_path / "models")
    samples = load_calibration(synthetic.write_dataset(tmp_path / "data", 4), search_images=4,
                               holdout_images=0).search
    fresh = encode(encoder, samples, progress=False, cache_dir=tmp_path / "cache")
    entry = next((tmp_path / "cache").rglob("*.npy"))
    value = np.load(entry)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    else:
        np.save(entry, np.full_like(value, np.nan) if damage == "NaN" else value.astype(np.float64) + 1)
    np.testing.assert_array_equal(encode(encoder, samples, progress=False, cache_dir=tmp_path / "cache"), fresh)
    np.testing.assert_array_equal(np.load(entry), value)  # and written back
