"""Bad input exits 2 with one line naming the file and problem, and leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
import torch

from sam_reuse.base.files import OUTPUTS_RECORD
from sam_reuse.cli import main
from sam_reuse.exporter.models import build_sam


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def other_family_checkpoint(tmp_path):
    path = tmp_path / "vit_b_tiny.pt"
    torch.save(build_sam("test_vit_b").state_dict(), path)
    return path


def _cases(tmp_path, other_family_checkpoint):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(other_family_checkpoint.read_bytes()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    return {
        "missing": (["--checkpoint", str(tmp_path / "nope.pt")], "nope.pt: checkpoint not found"),
        "truncated": (["--checkpoint", str(truncated)], "truncated.pt: not a readable PyTorch checkpoint"),
        "wrong type": (["--checkpoint", str(text)], "notes.pt: not a readable PyTorch checkpoint"),
        "other model": (["--checkpoint", str(other_family_checkpoint)], "vit_b_tiny.pt: not a test_vit_t checkpoint"),
        "directory": (["--checkpoint", str(tmp_path)], "checkpoint is not a file"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "wrong type", "other model", "directory"])
def test_bad_checkpoint(capsys, tmp_path, other_family_checkpoint, case):
    extra, message = _cases(tmp_path, other_family_checkpoint)[case]
    out = tmp_path / "out"
    code, err = _run(capsys, "export", "--model-type", "test_vit_t", "--out", str(out), *extra)
    assert code == 2
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_unknown_model_type(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model-type", "vit_x", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "invalid choice: 'vit_x'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_model_type_in_api():
    from sam_reuse.base.errors import SamReuseError

    with pytest.raises(SamReuseError, match="unknown model type 'vit_x'"):
        build_sam("vit_x")


def test_real_model_type_needs_checkpoint(capsys, tmp_path):
    code, err = _run(capsys, "export", "--model-type", "vit_b", "--out", str(tmp_path / "o"))
    assert code == 2 and "needs --checkpoint" in err[0]


def test_failed_export_leaves_existing_outputs_untouched(capsys, tmp_path, sample_records):
    """A failure after the models were written (here: a missing verify image) publishes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "encoder.onnx").write_text("previous result")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text('{"image": "gone.jpg", "mask": "gone.png", "points": [[1, 2]]}\n')
    code, err = _run(capsys, "export", "--model-type", "test_vit_b", "--out", str(out), "--verify-data", str(data))
    assert code == 2 and "gone.jpg: image not found" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx"]
    assert (out / "encoder.onnx").read_text() == "previous result"


def _with(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option``'s value replaced."""
    at = argv.index(option) + 1
    return argv[:at] + [value] + argv[at + 1:]


def _tree(folder):
    """Every file under ``folder`` with its content hash and mode: what a refused command must leave as it was."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode & 0o777)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tuned_folder(tmp_path_factory):
    """A synthetic encoder/decoder, data and a reuse map, in one folder."""
    from sam_reuse.graphops.graph import fingerprint
    from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse
    from tests import synthetic

    root = tmp_path_factory.mktemp("campaign")
    encoder, _ = synthetic.write_models(root)
    synthetic.write_dataset(root / "data", 12)
    ReuseMap(model_fingerprint=fingerprint(encoder),
             sites={"embedding": SiteReuse("image_embeddings", 1, synthetic.CHANNELS,
                                           ((synthetic.TARGET, synthetic.HELPER),))}).save(root / "map.json")
    return root


def _campaign(root: Path) -> dict[str, tuple[list[str], str]]:
    """Bad input by subcommand: argv, and what its one line of error must say. Paths are under ``root``."""
    enc, dec, data, rmap = (str(root / n) for n in ("encoder.onnx", "decoder.onnx", "data", "map.json"))
    garbage, empty, folder, nowhere = (str(root / n) for n in ("garbage.onnx", "empty.onnx", "data", "nowhere/x"))
    listed, fractional, tuned = (str(root / n) for n in ("list.json", "half.json", "tuned.onnx"))
    engine, bad_sidecar = str(root / "e.engine"), str(root / "bad.engine")
    fifo, record = str(root / "fifo"), str(root / "export.json")
    quick = ["--no-progress", "--cache-dir", str(root / "cache")]
    tune = ["tune", "--encoder", enc, "--decoder", dec, "--data", data, "--out", str(root / "out"), *quick,
            "--evidence", "given", "--top-pairs", "2"]
    evaluate = ["evaluate", "--encoder", enc, "--decoder", dec, "--data", data, *quick]
    train = ["peft-train", "--model-type", "test_vit_t", "--method", "lora", "--data", data, "--search-images", "2",
             "--holdout-images", "2", "--epochs", "1", "--out", str(root / "adapters"), "--no-progress"]
    run = ["run", "--encoder", enc, "--decoder", dec, "--data", data, "--out", str(root), *quick]
    return {
        # the whole CLI
        "cli: --threads 0": (["--threads", "0", "sites", enc], "--threads must be at least 1"),
        # fetch-weights
        "fetch-weights: unknown weights": (["fetch-weights", "nosuch"], "unknown weights 'nosuch'"),
        # export
        "export: --verify-images -1": (["export", "--model-type", "test_vit_t", "--out", str(root / "exp"),
                                        "--verify-images", "-1"], "--verify-images must be at least 1"),
        "export: --verify-data without a manifest": (["export", "--model-type", "test_vit_t", "--out",
                                                      str(root / "exp"), "--verify-data", str(root / "cache")],
                                                     "manifest not found"),
        "export: --opset 5": (["export", "--model-type", "test_vit_t", "--opset", "5", "--out", str(root / "exp")],
                              "--opset 5: not an opset torch can export to"),
        "export: --out is a file": (["export", "--model-type", "test_vit_t", "--out", rmap],
                                    f"--out {rmap}: is a file, not a folder"),
        "export: --out below a file": (["export", "--model-type", "test_vit_t", "--out", f"{rmap}/sub"],
                                       "map.json is not a folder this user can write in"),
        # sites
        "sites: not ONNX": (["sites", garbage], "garbage.onnx: not a readable ONNX model"),
        "sites: an empty file": (["sites", empty], "empty.onnx: not an ONNX model (no graph"),
        "sites: a folder": (["sites", folder], f"{folder}: is a folder, not an ONNX model file"),
        "sites: missing": (["sites", str(root / "gone.onnx")], "gone.onnx: ONNX model not found"),
        "sites: of a decoder": (["sites", dec], "decoder.onnx: no channel site"),
        # apply
        "apply: over its encoder": (["apply", enc, rmap, "--out", enc], f"--out {enc}: is an input of this command"),
        "apply: over its map": (["apply", enc, rmap, "--out", rmap], f"--out {rmap}: is an input of this command"),
        "apply: into a folder": (["apply", enc, rmap, "--out", str(root)], f"--out {root}: is a folder, not a file"),
        "apply: over the decoder": (["apply", enc, rmap, "--out", dec],
                                    f"--out {dec}: holds a SAM decoder, not a SAM encoder; name another file"),
        "apply: into a FIFO": (["apply", enc, rmap, "--out", fifo], f"--out {fifo}: is not a regular file"),
        "app-format: unknown format": (["app-format", "--format", "labelme", "--encoder", enc, "--decoder", dec,
                                        "--out", str(root / "app")], "--format: unknown app format 'labelme'"),
        "app-format: a decoder not exported here": (["app-format", "--format", "samexporter", "--encoder", enc,
                                                     "--decoder", enc, "--out", str(root / "app")],
                                                    "encoder.onnx: not a SAM decoder exported by export-and-tune"),
        "mask-token: a decoder without token slices": (["mask-token", dec, "1", "--out", str(root / "t.onnx")],
                                                       "before 'low_res_masks'"),
        "mask-token: over the encoder": (["mask-token", dec, "1", "--out", enc], f"--out {enc}: holds a SAM encoder"),
        "apply: into a missing folder": (["apply", enc, rmap, "--out", nowhere], "does not exist"),
        "apply: a map that is a list": (["apply", enc, listed, "--out", str(root / "x.onnx")], "a JSON list"),
        "apply: a fractional channel": (["apply", enc, fractional, "--out", str(root / "x.onnx")],
                                        "malformed site entry (2.5 is not an integer)"),
        "apply: a map that is a folder": (["apply", enc, str(root / "cache"), "--out", str(root / "x.onnx")],
                                          "cache: reuse map is not a regular file"),
        "apply: a map that is not UTF-8": (["apply", enc, str(root / "latin1.json"), "--out", str(root / "x.onnx")],
                                           "latin1.json: not a JSON reuse map (UnicodeDecodeError"),
        "apply: a map nested 100,000 deep": (["apply", enc, str(root / "deep.json"), "--out", str(root / "x.onnx")],
                                             "deep.json: not a JSON reuse map (RecursionError"),
        "apply: on a tuned encoder": (["apply", tuned, rmap, "--out", str(root / "x.onnx")],
                                      f"{tuned}: already rewritten by a reuse map"),
        "apply: an encoder that is not ONNX": (["apply", garbage, rmap, "--out", str(root / "x.onnx")],
                                               "garbage.onnx: not a readable ONNX model"),
        "apply: a map that is not JSON": (["apply", enc, garbage, "--out", str(root / "x.onnx")],
                                          "garbage.onnx: not a JSON reuse map"),
        "apply: a missing map": (["apply", enc, str(root / "gone.json"), "--out", str(root / "x.onnx")],
                                 "gone.json: reuse map not found"),
        # verify
        "verify: negative --atol": (["verify", tuned, "--reference", enc, "--atol", "-1"],
                                    "--atol -1: a tolerance must be"),
        "verify: negative --rtol": (["verify", tuned, "--reference", enc, "--rtol", "-3"],
                                    "--rtol -3: a tolerance must be"),
        "verify: --images 0": (["verify", tuned, "--reference", enc, "--images", "0"], "--images must be at least 1"),
        "verify: a tuned model that is not ONNX": (["verify", garbage, "--reference", enc],
                                                   "garbage.onnx: not a readable ONNX model"),
        "verify: an original without a map": (["verify", enc, "--reference", enc],
                                               "encoder.onnx: no reuse map in the model's metadata"),
        # evaluate
        "evaluate: --json over the encoder": (evaluate + ["--json", enc], f"--json {enc}: is an input"),
        "evaluate: --json into a folder": (evaluate + ["--json", str(root)], f"--json {root}: is a folder"),
        "evaluate: --json over an export record": (evaluate + ["--json", record],
                                                   f"--json {record}: holds sam-reuse/export@1, not "
                                                   "sam-reuse/evaluation@1"),
        "evaluate: --json into a FIFO": (evaluate + ["--json", fifo], f"--json {fifo}: is not a regular file"),
        "evaluate: --json in a missing folder": (evaluate + ["--json", nowhere], "does not exist"),
        "evaluate: the decoder as encoder": (_with(evaluate, "--encoder", dec),
                                             "decoder.onnx: not a SAM encoder exported by export-and-tune"),
        "evaluate: the encoder as decoder": (_with(evaluate, "--decoder", enc),
                                             "encoder.onnx: not a SAM decoder exported by export-and-tune"),
        "evaluate: --batch-size 0": (evaluate + ["--batch-size", "0"], "--batch-size must be at least 1"),
        "evaluate: missing data": (_with(evaluate, "--data", str(root / "gone")), "gone: data folder not found"),
        "evaluate: data without records": (_with(evaluate, "--data", str(root / "cache")),
                                           "no manifest.jsonl, no images/ + masks/"),
        "evaluate: missing --masks": (evaluate + ["--masks", str(root / "gone")], "--masks"),
        "evaluate: negative split size": (evaluate + ["--search-images", "-3"],
                                          "--search-images -3: must not be negative"),
        # tune
        "tune: negative overlays": (tune + ["--overlays", "-1"], "--overlays must be 0 or more"),
        "tune: backwards range": (tune + ["--targets", "5-2"], "range 5-2 runs backwards (write 2-5)"),
        "tune: channels out of range": (tune + ["--sources", "3,99"], "--sources: '3,99': channels must lie in 0..7"),
        "tune: unreadable channel list": (tune + ["--targets", "abc"], "--targets: 'abc': not 'all'"),
        "tune: --top-pairs 0": (tune + ["--top-pairs", "0"], "--top-pairs must be at least 1"),
        "tune: unknown site": (tune + ["--site", "nosuch"], "no site 'nosuch'"),
        "tune: first-order without its scorer": (tune + ["--strategy", "first-order"], "--strategy first-order: no "
                                                 + str(root / "decoder.first_order.onnx")),
        "tune: the encoder as decoder": (_with(tune, "--decoder", enc),
                                         "encoder.onnx: not a SAM decoder exported by export-and-tune"),
        "tune: a tuned encoder": (_with(tune, "--encoder", tuned), "already rewritten by a reuse map"),
        "tune: a cache that is a file": (_with(tune, "--cache-dir", rmap), "is a file, not a folder"),
        "tune: a cache that cannot be made": (_with(tune, "--cache-dir", f"{rmap}/cache"), "--cache-dir"),
        "tune: --out is a file": (_with(tune, "--out", rmap), f"--out {rmap}: is a file, not a folder"),
        "tune: --data is a file": (_with(tune, "--data", rmap), "map.json: data folder not found"),
        "tune: too few images": (tune + ["--search-images", "1", "--holdout-images", "0"],
                                 "only 1 usable search record(s)"),
        # run
        "run: unknown precision": (run + ["--engines", "fp8"], "--engines: unknown precision fp8"),
        "run: empty precision": (run + ["--engines", ""], "--engines: unknown precision"),
        "run: half a model pair": (["run", "--encoder", enc, "--out", str(root)],
                                   "--encoder and --decoder go together"),
        "run: data without records": (_with(run, "--data", str(root / "cache")), "no manifest.jsonl"),
        "run: the decoder as encoder": (_with(run, "--encoder", dec),
                                        f"{dec}: not a SAM encoder exported by export-and-tune"),
        "run: --out is a file": (_with(run, "--out", rmap), f"--out {rmap}: is a file, not a folder"),
        # engine
        "engine: --out over its ONNX": (["engine", enc, "--out", enc], "is an input of this command"),
        "engine: --out named .onnx": (["engine", enc, "--out", str(root / "x.onnx")], "name it .engine"),
        "engine: --out a folder": (["engine", enc, "--out", str(root)], f"--out {root}: is a folder"),
        "engine: --out in a missing folder": (["engine", enc, "--out", f"{nowhere}.engine"], "does not exist"),
        "engine: batch range backwards": (["engine", enc, "--batch", "4:2:1"], "need 1 <= MIN <= OPT <= MAX"),
        "engine: no points": (["engine", dec, "--points", "0"], "--points '0': need 1 <= MIN"),
        "engine: not ONNX": (["engine", garbage], "garbage.onnx: not a readable ONNX model"),
        "engine: missing ONNX": (["engine", str(root / "gone.onnx")], "gone.onnx: ONNX model not found"),
        # verify-engine
        "verify-engine: no sidecar": (["verify-engine", engine], "e.engine: no sidecar e.engine.json"),
        "verify-engine: sidecar not JSON": (["verify-engine", bad_sidecar],
                                            "bad.engine.json: not a valid engine sidecar"),
        "verify-engine: --images 0": (["verify-engine", bad_sidecar, "--images", "0"], "--images must be at least 1"),
        # quantize
        "quantize: a decoder": (["quantize", dec, "--data", data, "--no-progress"], "not a SAM encoder"),
        "quantize: a quantized model": (["quantize", str(root / "int8.onnx"), "--data", data, "--no-progress"],
                                        "int8.onnx: already quantized"),
        "quantize: --out over its ONNX": (["quantize", enc, "--out", enc, "--data", data, "--no-progress"],
                                          "is an input of this command"),
        "quantize: no calibration images": (["quantize", enc, "--search-images", "0", "--data", data,
                                             "--out", str(root / "q.onnx"), "--no-progress"],
                                            "no calibration images"),
        "quantize: --out over its --decoder": (["quantize", enc, "--decoder", dec, "--out", dec, "--data", data,
                                                "--no-progress"], f"--out {dec}: holds a SAM decoder"),
        "quantize: --out over a record": (["quantize", enc, "--out", record, "--data", data, "--no-progress"],
                                          f"--out {record}: holds sam-reuse/export@1, not a SAM encoder"),
        "quantize: --decoder that is the encoder": (["quantize", enc, "--decoder", enc, "--data", data,
                                                     "--no-progress"], "not a SAM decoder"),
        # peft-train
        "peft-train: --alpha nan": (train + ["--alpha", "nan"], "--alpha nan: must be a finite number"),
        "peft-train: --device tpu": (train + ["--device", "tpu"], "--device tpu: not a torch device"),
        "peft-train: --device meta": (train + ["--device", "meta"],
                                       "--device meta: adapters train on cpu or cuda only"),
        "peft-train: --blocks nosuch": (train + ["--blocks", "nosuch"], "--blocks: expected 'all', 'last:N'"),
        "peft-train: --epochs 0": (train + ["--epochs", "0"], "--epochs 0: must be at least 1"),
        "peft-train: --lr -1": (train + ["--lr", "-1"], "--lr -1: the learning rate must be above 0"),
        "peft-train: --batch-size 0": (train + ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        "peft-train: --rank 0": (train + ["--rank", "0"], "--rank 0: must be at least 1"),
        # peft-export
        "peft-export: missing adapters": (["peft-export", str(root / "gone.pt"), "--model-type", "test_vit_t",
                                           "--out", str(root / "pe")], "gone.pt: adapter checkpoint not found"),
        "peft-export: adapters not a checkpoint": (["peft-export", rmap, "--model-type", "test_vit_t", "--out",
                                                    str(root / "pe")], "map.json: not a readable adapter checkpoint"),
        "peft-export: --out is a file": (["peft-export", str(root / "adapters.pt"), "--model-type", "test_vit_t",
                                          "--out", rmap], f"--out {rmap}: is a file, not a folder"),
        # peft-import
        "peft-import: missing source": (["peft-import", str(root / "gone.pt"), "--out", str(root / "pi")],
                                        "gone.pt: checkpoint not found"),
        "peft-import: source not a checkpoint": (["peft-import", rmap, "--out", str(root / "pi")],
                                                 "map.json: not a readable PyTorch checkpoint"),
        "peft-import: a vector lora_alpha": (["peft-import", str(root / "vector_alpha.pt"), "--out", str(root / "pi")],
                                             "vector_alpha.pt: 'lora_alpha' must be one finite number"),
        "peft-import: source is a folder": (["peft-import", folder, "--out", str(root / "pi")],
                                            "checkpoint is not a file"),
        "peft-import: --out is a file": (["peft-import", str(root / "adapters.pt"), "--out", rmap],
                                         f"--out {rmap}: is a file, not a folder"),
        "peft-import: over its source": (["peft-import", str(root / "adapters.pt"), "--out", str(root)],
                                         "is an input of this command"),
    }


@pytest.fixture(scope="module")
def campaign_folder(tuned_folder):
    """The synthetic models, data and map, plus the broken files the campaign feeds them."""
    root = tuned_folder
    rmap_text = (root / "map.json").read_text()
    (root / "list.json").write_text("[[2, 5]]")
    (root / "half.json").write_text(rmap_text.replace("[\n          2,", "[\n          2.5,"))
    (root / "garbage.onnx").write_bytes(b"\x08garbage, not protobuf")
    (root / "empty.onnx").write_bytes(b"")
    (root / "latin1.json").write_bytes("{\"format\": \"caf\u00e9\"}".encode("latin-1"))
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "e.engine").write_bytes(b"engine")
    (root / "bad.engine").write_bytes(b"engine")
    (root / "bad.engine.json").write_text("{not json")
    (root / "adapters.pt").write_bytes(b"not a checkpoint")
    (root / "cache").mkdir(exist_ok=True)
    import torch

    torch.save({"lora_alpha": torch.ones(3),
                "image_encoder.layers.3.blocks.1.attn.qkv.lora_A": torch.zeros(4, 8)}, root / "vector_alpha.pt")
    if not (root / "fifo").exists():
        os.mkfifo(root / "fifo")
    (root / "export.json").write_text('{"format": "sam-reuse/export@1", "model_type": "test_vit_t"}\n')
    int8 = onnx.load(str(root / "encoder.onnx"))
    int8.graph.node[0].op_type = "DequantizeLinear"  # what the refusal looks for; never run
    onnx.save(int8, str(root / "int8.onnx"))
    assert main(["apply", str(root / "encoder.onnx"), str(root / "map.json"), "--out", str(root / "tuned.onnx")]) == 0
    return root


CAMPAIGN = list(_campaign(Path("/root")))


def test_the_campaign_is_at_least_60_cases_over_every_subcommand():
    from sam_reuse.cli import build_parser

    commands = set(build_parser()[1])
    covered = {argv[0] for argv, _ in _campaign(Path("/root")).values()} | {"cli"}
    assert len(CAMPAIGN) >= 60 and commands <= covered, sorted(commands - covered)


@pytest.mark.parametrize("case", CAMPAIGN)
def test_bad_input_is_one_line_naming_it_and_changes_no_file(capsys, campaign_folder, case):
    """Exit 2, one line that names the file or option, and every file under the folder as it was (hashes, modes)."""
    argv, message = _campaign(campaign_folder)[case]
    before = _tree(campaign_folder)
    code, err = _run(capsys, *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err
    ignore_cache = lambda tree: {k: v for k, v in tree.items() if not k.startswith("cache/")}  # noqa: E731
    assert ignore_cache(_tree(campaign_folder)) == ignore_cache(before)
    assert not [p for p in campaign_folder.rglob(".*") if "cache" not in p.parts], "partial output left"


def test_outputs_get_the_usual_file_mode(capsys, tuned_folder, tmp_path):
    import os

    root = tuned_folder
    out = tmp_path / "tuned.onnx"
    assert main(["apply", str(root / "encoder.onnx"), str(root / "map.json"), "--out", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch, tuned_folder):
    from sam_reuse.cli import graph

    def broken(_args):
        raise ZeroDivisionError("a bug\nwith a second line")

    monkeypatch.setattr(graph, "_sites", broken)
    code, err = _run(capsys, "sites", str(tuned_folder / "encoder.onnx"))
    assert code == 1 and err == ["export-and-tune sites: unexpected error: ZeroDivisionError: a bug "
                                 "(rerun with --debug for the traceback)"]
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "sites", str(tuned_folder / "encoder.onnx")])


def test_a_new_export_removes_what_was_derived_from_the_models_it_replaces(capsys, tmp_path, sample_records):
    """Tuned encoders, maps, reports and engines of the old models go; the user's own files stay."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("encoder.onnx", "encoder.tuned.onnx", "reuse_map.json", "report.json", "encoder.tuned.fp16.engine",
                 "decoder.first_order.onnx", "notes.txt"):
        (out / name).write_text("earlier")
    code, _ = _run(capsys, "export", "--model-type", "test_vit_t", "--out", str(out), "--verify-images", "1",
                   "--no-first-order")
    assert code == 0
    listed = sorted(p.name for p in out.iterdir() if p.name != OUTPUTS_RECORD)
    assert listed == ["decoder.onnx", "encoder.onnx", "export.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "earlier" and (out / "encoder.onnx").read_bytes() != b"earlier"
    # The folder now records what sam-reuse published: a user's files that match an output pattern stay.
    for name in ("yolo.engine", "reuse_map_handmade.json", "my.int8.onnx"):
        (out / name).write_text("mine")
    code, _ = _run(capsys, "export", "--model-type", "test_vit_t", "--out", str(out), "--verify-images", "1",
                   "--no-first-order")
    assert code == 0 and all((out / name).read_text() == "mine"
                             for name in ("yolo.engine", "reuse_map_handmade.json", "my.int8.onnx"))


@pytest.mark.parametrize("where", ["a file", "below a file", "in /proc"])
def test_a_cache_folder_that_cannot_hold_files_is_one_line(tuned_folder, tmp_path, monkeypatch, capsys, where):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cache = {"a file": afile, "below a file": afile / "below", "in /proc": Path("/proc/sam-reuse-cache")}[where]
    monkeypatch.setenv("SAM_REUSE_CACHE", str(cache))
    argv = ["evaluate", "--encoder", str(tuned_folder / "encoder.onnx"), "--decoder",
            str(tuned_folder / "decoder.onnx"), "--data", str(tuned_folder / "data"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"$SAM_REUSE_CACHE {cache}:" in err
    assert afile.read_text() == "mine"


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MB tmpfs (needs the right to mount: root in a container that allows it; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root, or the container forbids it)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.fixture
def read_only_disk(tmp_path):
    """A real read-only tmpfs: root writes through permission bits, not through a read-only mount."""
    import subprocess

    mount = tmp_path / "read-only"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (not root, or the container forbids it)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_read_only_folder_is_one_line_naming_it(tuned_folder, read_only_disk, capsys):
    cases = [(["apply", str(tuned_folder / "encoder.onnx"), str(tuned_folder / "map.json"), "--out",
               str(read_only_disk / "x.onnx")], f"{read_only_disk / 'x.onnx'}: Read-only file system while writing it"),
             (["evaluate", "--encoder", str(tuned_folder / "encoder.onnx"), "--decoder",
               str(tuned_folder / "decoder.onnx"), "--data", str(tuned_folder / "data"), "--no-progress",
               "--cache-dir", str(read_only_disk / "cache")],
              f"--cache-dir {read_only_disk / 'cache'}: not a folder this user can write in (Read-only file system)")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tuned_folder, full_disk, capsys):
    with open(full_disk / "filler", "wb", buffering=0) as filler:  # fill the disk to the last block
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass
    argv = ["apply", str(tuned_folder / "encoder.onnx"), str(tuned_folder / "map.json"), "--out",
            str(full_disk / "x.onnx")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"export-and-tune: error: {full_disk / 'x.onnx'}: No space left on device while writing it; "
                   "nothing was written (free space or choose another folder)")
    assert [p.name for p in full_disk.iterdir()] == ["filler"]
    assert main(["export", "--model-type", "test_vit_t", "--out", str(full_disk / "export"), "--verify-images",
                 "1", "--no-first-order"]) == 2  # the disk is named, not torch (which writes the models)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"export-and-tune: error: {full_disk / 'export'}: No space left on device while writing")
    assert len(err.splitlines()) == 1 and "torch" not in err
    assert [p.name for p in full_disk.iterdir()] == ["filler"]
    # The activation cache on a full disk: the run goes on uncached, with one warning.
    argv = ["evaluate", "--encoder", str(tuned_folder / "encoder.onnx"), "--decoder",
            str(tuned_folder / "decoder.onnx"), "--data", str(tuned_folder / "data"), "--cache-dir",
            str(full_disk / "cache"), "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "the activation cache cannot be written" in captured.err and "mIoU" in captured.out


def test_a_model_whose_shapes_need_more_memory_than_the_machine_is_one_line(tuned_folder, tmp_path, capsys):
    """An encoder that asks ONNX Runtime for 40 TB (a constant of shape 1e5 x 1e5 x 1e3) fails to allocate."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["huge"], value=zero),
             helper.make_node("ReduceMean", ["huge"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["image", "mean"], ["scaled"]),
             helper.make_node("AveragePool", ["scaled"], ["image_embeddings"], kernel_shape=[16, 16], strides=[16, 16])]
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            [1, 3, 1024, 1024])],
                              [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [numpy_helper.from_array(np.array([100_000, 100_000, 1000], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "encoder.onnx"))
    argv = ["evaluate", "--encoder", str(tmp_path / "encoder.onnx"), "--decoder", str(tuned_folder / "decoder.onnx"),
            "--data", str(tuned_folder / "data"), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the model needs more memory than this machine has" in err
