"""Bad input exits 2 with one line naming the file and problem, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, "export", "--model-type", "test_vit_t", "--out", str(blocker / "sub"))
    assert code == 2 and len(err) == 1 and "output directory is not writable" in err[0] and str(blocker) in err[0]


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


def test_outputs_never_replace_inputs_and_bad_options_are_refused_before_any_work(capsys, tuned_folder):
    root = tuned_folder
    enc, dec, data, rmap = (str(root / n) for n in ("encoder.onnx", "decoder.onnx", "data", "map.json"))
    rmap_text = Path(rmap).read_text()
    tune = ["tune", "--encoder", enc, "--decoder", dec, "--data", data, "--out", str(root / "out"),
            "--cache-dir", str(root / "cache"), "--no-progress", "--evidence", "given", "--top-pairs", "2"]
    cases = {
        "apply over its encoder": (["apply", enc, rmap, "--out", enc], f"--out {enc}: is an input of this command"),
        "apply over its map": (["apply", enc, rmap, "--out", rmap], f"--out {rmap}: is an input of this command"),
        "apply into a folder": (["apply", enc, rmap, "--out", str(root)], f"--out {root}: is a folder, not a file"),
        "apply into a missing folder": (["apply", enc, rmap, "--out", str(root / "nowhere" / "e.onnx")],
                                        "does not exist"),
        "negative overlays": (tune + ["--overlays", "-1"], "--overlays must be 0 or more"),
        "backwards range": (tune + ["--targets", "5-2"], "range 5-2 runs backwards (write 2-5)"),
        "negative tolerance": (["verify", enc, "--reference", enc, "--atol", "-1"], "--atol -1: a tolerance must be"),
        "evaluate json into a folder": (["evaluate", "--encoder", enc, "--decoder", dec, "--data", data,
                                         "--no-progress", "--cache-dir", str(root / "cache"), "--json", str(root)],
                                        f"--json {root}: is a folder, not a file to write"),
    }
    listed, fractional, tuned, bad_sidecar = (root / n for n in ("list.json", "half.json", "tuned.onnx", "e.engine"))
    listed.write_text("[[2, 5]]")
    fractional.write_text(rmap_text.replace("[\n          2,", "[\n          2.5,"))
    bad_sidecar.write_bytes(b"engine")
    Path(f"{bad_sidecar}.json").write_text("{not json")
    if not tuned.exists():
        assert main(["apply", enc, rmap, "--out", str(tuned)]) == 0
    cases.update({
        "a map that is a list": (["apply", enc, str(listed), "--out", str(root / "x.onnx")], "a JSON list"),
        "a fractional channel": (["apply", enc, str(fractional), "--out", str(root / "x.onnx")],
                                 "malformed site entry (2.5 is not an integer)"),
        "a map on a tuned encoder": (["apply", str(tuned), rmap, "--out", str(root / "x.onnx")],
                                     "reuse map was made for another model"),
        "the encoder as decoder": (_with(tune, "--decoder", enc),
                                   "encoder.onnx: not a SAM decoder exported by export-and-tune"),
        "tuning a tuned encoder": (_with(tune, "--encoder", str(tuned)), "already rewritten by a reuse map"),
        "a cache that is a file": (_with(tune, "--cache-dir", rmap), "is a file, not a folder"),
        "sites of a decoder": (["sites", dec], "decoder.onnx: no channel site"),
        "opset 5": (["export", "--model-type", "test_vit_t", "--opset", "5", "--out", str(root / "exp")],
                    "--opset 5: not an opset torch can export to"),
        "sidecar not JSON": (["verify-engine", str(bad_sidecar)], "e.engine.json: not a valid engine sidecar"),
        "run with an unknown precision": (["run", "--model-type", "test_vit_t", "--out", str(root), "--engines",
                                           "fp8"], "--engines: unknown precision fp8"),
        "run with half a model pair": (["run", "--encoder", enc, "--out", str(root)],
                                       "--encoder and --decoder go together"),
    })
    for name, (argv, message) in cases.items():
        before = _tree(root)
        code, err = _run(capsys, *argv)
        assert code == 2 and len(err) == 1 and message in err[0], (name, err)
        after = {k: v for k, v in _tree(root).items() if not k.startswith("cache/")}
        assert after == {k: v for k, v in before.items() if not k.startswith("cache/")}, name


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
                 "notes.txt"):
        (out / name).write_text("earlier")
    code, _ = _run(capsys, "export", "--model-type", "test_vit_t", "--out", str(out), "--verify-images", "1")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "export.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "earlier" and (out / "encoder.onnx").read_bytes() != b"earlier"


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu"], "--device tpu: not a torch device"),
    (["--device", "meta"], "--device meta: adapters train on cpu or cuda only"),
    (["--blocks", "nosuch"], "--blocks: expected 'all', 'last:N'"),
])
def test_peft_train_refuses_bad_options_before_writing(capsys, tmp_path, extra, message):
    from tests.conftest import SAMPLES

    out = tmp_path / "adapters"
    code, err = _run(capsys, "peft-train", "--model-type", "test_vit_t", "--method", "lora", "--data", str(SAMPLES),
                     "--search-images", "2", "--holdout-images", "2", "--epochs", "1", "--out", str(out),
                     "--no-progress", *extra)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()
