"""The PEFT stage: adapters start as the identity, merge exactly, export with parity, train, round-trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam_reuse.base.contract import FIRST_ORDER_SCORER
from sam_reuse.base.errors import SamReuseError
from sam_reuse.cli import main
from sam_reuse.exporter.models import build_sam
from sam_reuse.finetune.adapters import CobotGroup, SalientChannelResidual, quaternion_matrix
from sam_reuse.finetune.blocks import attention_blocks, encoder_steps, run_steps
from sam_reuse.finetune.checkpoint import FINAL, PARTIAL, import_lora, read_adapters
from sam_reuse.finetune.config import METHODS, PeftConfig, TrainSettings
from sam_reuse.finetune.export import export_finetuned, load_finetuned
from sam_reuse.finetune.methods import adapter_parameters, attach, merge_adapters
from sam_reuse.finetune.train import Trainer, train

FAMILIES = ("test_vit_t", "test_vit_b")
SALIENT = {"test_vit_t": {"layers.3.blocks.0": [0, 5, 7, 300]}, "test_vit_b": {"blocks.1": [1, 2, 40]}}


def _image(sample_records) -> torch.Tensor:
    from sam_reuse.base import imaging

    return torch.from_numpy(imaging.preprocess(imaging.load_image_rgb(sample_records[0].image)))


def _config(model_type: str, method: str, **changes) -> PeftConfig:
    fields = dict(method=method, blocks="last:1", sfa_external="last:1")
    if method == "sct":
        fields["salient_channels"] = SALIENT[model_type]
    fields.update(changes)
    return PeftConfig(**fields)


def _randomise(sam, seed: int = 3) -> None:
    """Give every adapter parameter non-trivial values, so merging has something to merge."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_parameters(sam).items():
            if name.endswith("relation") or name.endswith("quaternion"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def image(sample_records):
    return _image(sample_records)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_encoder_steps_compose_to_the_encoder(model_type, image):
    sam = build_sam(model_type)
    with torch.no_grad():
        assert torch.equal(run_steps(encoder_steps(sam), image), sam.image_encoder(image))


@pytest.fixture(scope="module")
def sam2_image(sample_records):
    from sam_reuse.base import imaging

    return torch.from_numpy(imaging.preprocess(imaging.load_image_rgb(sample_records[0].image),
                                               convention=imaging.SAM2))


def _sam2_outputs(sam, image) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return run_steps(encoder_steps(sam), image)


@pytest.fixture(scope="module")
def sam2_reference(sam2_image) -> tuple[torch.Tensor, ...]:
    """The base test_sam2's three encoder outputs, run as steps (checked equal to the exported encoder)."""
    from sam_reuse.exporter.sam2_wrappers import Sam2ImageEncoder

    sam = build_sam("test_sam2")
    outputs = _sam2_outputs(sam, sam2_image)
    with torch.no_grad():
        exported = Sam2ImageEncoder(sam)(sam2_image)
    assert len(outputs) == 3 and all(torch.equal(a, b) for a, b in zip(outputs, exported))
    return outputs


@pytest.mark.parametrize("method", METHODS)
def test_sam2_adapters_start_as_the_identity_act_and_merge_exactly(method, sam2_image, sam2_reference):
    """On Hiera: adapters leave all three outputs unchanged until trained, then act, and merge exactly."""
    sam, reference = build_sam("test_sam2"), sam2_reference
    blocks = attention_blocks(sam.image_encoder)
    assert [b.name for b in blocks[-2:]] == ["trunk.blocks.4", "trunk.blocks.5"] and blocks[-1].dim == 128
    salient = {"trunk.blocks.4": [0, 3, 60], "trunk.blocks.5": [1, 2, 100]}
    attach(sam, PeftConfig(method=method, blocks="last:2", sfa_external="last:1", salient_channels=salient))
    assert all(torch.equal(a, b) for a, b in zip(_sam2_outputs(sam, sam2_image), reference))
    _randomise(sam)
    adapted = _sam2_outputs(sam, sam2_image)
    assert (adapted[0] - reference[0]).abs().max() > 1e-3  # the randomised adapters do act
    pieces = merge_adapters(sam)
    for merged, unmerged in zip(_sam2_outputs(sam, sam2_image), adapted):
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert pieces == {"merged_linears": 0 if method == "sct" else 4,
                      "graph_adapters": {"sct": 2, "sfa": 1}.get(method, 0)}


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_untrained_adapters_are_the_identity_and_merging_is_exact(model_type, method, image):
    sam = build_sam(model_type)
    with torch.no_grad():
        reference = sam.image_encoder(image)
        attach(sam, _config(model_type, method, blocks="last:1" if method == "sct" else "all"))
        assert torch.allclose(sam.image_encoder(image), reference, atol=1e-6)
        _randomise(sam)
        adapted = sam.image_encoder(image)
        assert (adapted - reference).abs().max() > 1e-3  # the randomised adapters do act
        pieces = merge_adapters(sam)
        assert torch.allclose(sam.image_encoder(image), adapted, atol=1e-5)
    merged_kinds = {"lora": True, "cobot": True, "sfa": True, "sct": False}
    assert (pieces["merged_linears"] > 0) == merged_kinds[method]
    assert (pieces["graph_adapters"] > 0) == (method in ("sct", "sfa"))


def test_cobot_delta_matches_its_formula():
    generator = torch.Generator().manual_seed(0)
    group = CobotGroup(3, 8, 12, rank=4, alpha=8.0, generator=generator)
    with torch.no_grad():
        for param in group.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    A, B, R, Q = (t.detach().numpy().astype(np.float64) for t in (group.A, group.B, group.relation, group.quaternion))
    a, b, c, d = Q[1]
    hamilton = np.block([[a, -b, -c, -d], [b, a, -d, c], [c, d, a, -b], [d, -c, b, a]])
    expected = 2.0 * np.einsum("j,jor->or", R[1], B) @ hamilton @ A[1]
    np.testing.assert_allclose(group.delta_weight(1).detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    identity = torch.zeros(4, 2, 2)
    identity[0] = torch.eye(2)
    assert torch.equal(quaternion_matrix(identity), torch.eye(8))


def test_salient_residual_changes_only_the_salient_channels():
    channels = torch.tensor([1, 4])
    residual = SalientChannelResidual(6, channels)
    with torch.no_grad():
        residual.mix.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
    x = torch.randn(2, 3, 6)
    expected = x.numpy().copy()
    picked = x.numpy()[..., [1, 4]]
    expected[..., [1, 4]] += picked @ residual.mix.detach().numpy().T
    np.testing.assert_allclose(residual(x).detach().numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, sample_records):
    """Bundled images whose 'lesion' is planted as the left third of the image, a task SAM does not know."""
    root = tmp_path_factory.mktemp("planted")
    lines = []
    for record in sample_records[:6]:
        shutil.copy(record.image, root / record.image.name)
        width, height = Image.open(record.image).size
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, : width // 3] = 255
        Image.fromarray(mask).save(root / f"{record.key}.png")
        lines.append(json.dumps({"id": record.key, "image": record.image.name, "mask": f"{record.key}.png",
                                 "points": [[width // 6, height // 2]], "labels": [1]}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _settings(**changes) -> TrainSettings:
    return TrainSettings(**{**dict(epochs=6, lr=1e-2, batch_size=1, search_images=2, holdout_images=2,
                                   progress=False), **changes})


@pytest.mark.parametrize("method", METHODS)
def test_training_on_a_planted_task_lowers_the_loss(method, planted, tmp_path, sample_records):
    record = train("test_vit_t", None, planted, tmp_path, PeftConfig(method=method, blocks="last:2",
                                                                      sfa_external="last:1"), _settings())
    # Untouched adapters would leave the loss exactly where it started; measured ratios are 0.86-0.95.
    assert record["final_loss"] < 0.97 * record["initial_loss"], record["history"]
    assert (tmp_path / FINAL).exists() and not (tmp_path / PARTIAL).exists()
    assert record["images"] == [r.key for r in sample_records[:2]]  # the search split only
    if method == "sfa":
        budget = record["sfa_pruning"]["candidates"] * 0.005
        assert record["sfa_pruning"]["kept"] == max(1, int(budget))
    if method == "sct":
        channels = record["config"]["salient_channels"]
        dims = {b.name: b.dim for b in attention_blocks(build_sam("test_vit_t").image_encoder)[-2:]}
        assert {name: len(v) for name, v in channels.items()} == {n: round(d / 8) for n, d in dims.items()}


def test_interrupted_training_resumes_to_the_same_adapters(planted, tmp_path, monkeypatch):
    config = PeftConfig(method="lora", blocks="last:2")
    whole = train("test_vit_t", None, planted, tmp_path / "whole", config, _settings(epochs=2))
    original = Trainer.run_epoch

    def interrupted(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train("test_vit_t", None, planted, tmp_path / "resumed", config, _settings(epochs=2))
    assert (tmp_path / "resumed" / PARTIAL).exists()
    epochs_run = []

    def counted(self, epoch):
        epochs_run.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", counted)
    resumed = train("test_vit_t", None, planted, tmp_path / "resumed", config, _settings(epochs=2))
    assert epochs_run == [1]  # epoch 0 came from the partial checkpoint
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    _, first, _ = read_adapters(tmp_path / "whole" / FINAL)
    _, second, _ = read_adapters(tmp_path / "resumed" / FINAL)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)


# Each method once, on alternating families: every method's merge and every family's export are covered.
@pytest.mark.parametrize("model_type,method", [(FAMILIES[i % 2], m) for i, m in enumerate(METHODS)])
def test_merged_export_matches_the_unmerged_torch_model(model_type, method, sample_records, tmp_path, image):
    sam = build_sam(model_type)
    config = _config(model_type, method)
    attach(sam, config)
    _randomise(sam)
    from sam_reuse.finetune.checkpoint import save_checkpoint
    from sam_reuse.finetune.methods import adapter_state

    save_checkpoint(tmp_path / FINAL, {}, config, adapter_state(sam), None, {"record": {}})
    loaded, _, _ = load_finetuned(model_type, None, tmp_path / FINAL)  # checkpoint round trip
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_encoder(image), sam.image_encoder(image), rtol=0, atol=0)
    result = export_finetuned(model_type, tmp_path / FINAL, tmp_path / "export", verify_records=sample_records[:1])
    parity, peft = result.info["parity"], result.info["peft"]
    assert parity["encoder_max_abs_diff"] < 1e-4 and parity["min_mask_iou"] > 0.999
    assert peft["merge_max_abs_diff"] < 1e-4
    from sam_reuse.base.runtime import ort_session

    onnx_embedding = ort_session(result.encoder).run(None, {"image": image.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_embedding, sam.image_encoder(image).numpy(), atol=1e-4)
        base = build_sam(model_type).image_encoder(image).numpy()
    assert np.abs(onnx_embedding - base).max() > 1e-3  # the export carries the adapters


def _external_lora(model_type: str, path: Path, rank: int = 2) -> dict[str, torch.Tensor]:
    state = build_sam(model_type).state_dict()
    generator = torch.Generator().manual_seed(7)
    for block in attention_blocks(build_sam(model_type).image_encoder)[-2:]:
        for linear in ("qkv", "proj"):
            weight = state[f"image_encoder.{block.name}.attn.{linear}.weight"]
            state[f"image_encoder.{block.name}.attn.{linear}.lora_A"] = torch.randn(rank, weight.shape[1],
                                                                                   generator=generator) * 0.1
            state[f"image_encoder.{block.name}.attn.{linear}.lora_B"] = torch.randn(weight.shape[0], rank,
                                                                                   generator=generator) * 0.1
    state["lora_alpha"] = torch.tensor(4.0)
    torch.save(state, path)
    return state


def test_imported_lora_exports_as_the_hand_merged_model(tmp_path, sample_records, image):
    state = _external_lora("test_vit_t", tmp_path / "external.pt")
    adapters, base = import_lora(tmp_path / "external.pt", tmp_path / "imported")
    config, _, _ = read_adapters(adapters)
    assert config.rank == 2 and config.alpha == 4.0 and config.linears == ("proj", "qkv")
    merged_by_hand = {k: v for k, v in state.items() if ".lora_" not in k and k != "lora_alpha"}
    for key in [k for k in state if k.endswith(".lora_A")]:
        linear = key[: -len(".lora_A")]
        merged_by_hand[f"{linear}.weight"] = state[f"{linear}.weight"] + 2.0 * state[f"{linear}.lora_B"] @ state[key]
    torch.save(merged_by_hand, tmp_path / "merged.pt")
    result = export_finetuned("test_vit_t", adapters, tmp_path / "export", base, sample_records[:1])
    from sam_reuse.base.runtime import ort_session

    onnx_embedding = ort_session(result.encoder).run(None, {"image": image.numpy()})[0]
    with torch.no_grad():
        expected = build_sam("test_vit_t", tmp_path / "merged.pt").image_encoder(image).numpy()
    np.testing.assert_allclose(onnx_embedding, expected, atol=1e-4)


def test_import_errors_name_the_file_and_the_key(tmp_path):
    state = _external_lora("test_vit_t", tmp_path / "external.pt")
    del state["image_encoder.layers.3.blocks.0.attn.qkv.lora_B"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(SamReuseError, match=r"broken\.pt: layers\.3\.blocks\.0\.attn\.qkv has lora_A but not"):
        import_lora(tmp_path / "broken.pt", tmp_path / "out")
    assert not (tmp_path / "out" / FINAL).exists()
    torch.save(build_sam("test_vit_t").state_dict(), tmp_path / "plain.pt")
    with pytest.raises(SamReuseError, match="plain.pt: no LoRA factors"):
        import_lora(tmp_path / "plain.pt", tmp_path / "out")


def test_cli_trains_and_exports_sam2_adapters(planted, tmp_path, capsys, sam2_image, sam2_reference):
    """SFA on Hiera: trained (the loss falls), merged into two linears plus a graph piece, exported with parity."""
    assert main(["peft-train", "--model-type", "test_sam2", "--method", "sfa", "--blocks", "last:1",
                 "--data", str(planted), "--out", str(tmp_path / "adapters"), "--epochs", "4", "--lr", "0.01",
                 "--batch-size", "1", "--search-images", "2", "--holdout-images", "2", "--no-progress"]) == 0
    record = json.loads((tmp_path / "adapters" / "train.json").read_text())
    assert record["final_loss"] < 0.99 * record["initial_loss"], record["history"]
    assert main(["peft-export", str(tmp_path / "adapters" / FINAL), "--model-type", "test_sam2",
                 "--out", str(tmp_path / "export"), "--verify-images", "1"]) == 0
    out = capsys.readouterr().out
    assert "merged 2 linears, 1 adapters stay" in out and "first-order scorer not exported: SAM 2" in out
    assert not (tmp_path / "export" / FIRST_ORDER_SCORER).exists()
    info = json.loads((tmp_path / "export" / "export.json").read_text())
    parity = info["parity"]
    assert parity["reference"] == "SAM2ImagePredictor" and parity["min_mask_iou"] > 0.999
    assert parity["encoder_max_abs_diff"] < 1e-4 and info["peft"]["merge_max_abs_diff"] < 1e-4
    from sam_reuse.base.runtime import ort_session

    onnx_outputs = ort_session(tmp_path / "export" / "encoder.onnx").run(None, {"image": sam2_image.numpy()})
    trained, _, _ = load_finetuned("test_sam2", None, tmp_path / "adapters" / FINAL)
    for onnx_output, torch_output in zip(onnx_outputs, _sam2_outputs(trained, sam2_image)):
        np.testing.assert_allclose(onnx_output, torch_output.numpy(), atol=1e-4)
    assert np.abs(onnx_outputs[0] - sam2_reference[0].numpy()).max() > 1e-3  # the export carries the adapters
    assert main(["peft-export", str(tmp_path / "adapters" / FINAL), "--model-type", "test_vit_t",
                 "--out", str(tmp_path / "mismatched"), "--verify-images", "1"]) == 2
    assert "adapters.pt: trained on test_sam2, not test_vit_t" in capsys.readouterr().err
    assert not (tmp_path / "mismatched").exists()


def test_cli_trains_and_exports_and_reports_bad_options(planted, tmp_path, capsys):
    assert main(["peft-train", "--model-type", "test_vit_t", "--method", "cobot", "--data", str(planted),
                 "--out", str(tmp_path / "adapters"), "--epochs", "1", "--search-images", "4",
                 "--holdout-images", "2", "--no-progress"]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    assert main(["peft-export", str(tmp_path / "adapters" / FINAL), "--model-type", "test_vit_t",
                 "--out", str(tmp_path / "export"), "--verify-images", "1"]) == 0
    out = capsys.readouterr().out
    assert "merged 4 linears, 0 adapters stay" in out  # qkv + proj of the last 2 blocks
    assert f"{tmp_path / 'export' / FIRST_ORDER_SCORER}" in out  # so a tune of it searches first-order
    info = json.loads((tmp_path / "export" / "export.json").read_text())
    assert info["peft"]["method"] == "cobot" and info["parity"]["min_mask_iou"] > 0.999
    assert info["models"]["first_order"]["max_rel_diff_vs_torch"] < 1e-3
    assert (tmp_path / "export" / FIRST_ORDER_SCORER).is_file()
    assert main(["peft-export", str(tmp_path / "adapters" / FINAL), "--model-type", "test_vit_t", "--seed", "7",
                 "--out", str(tmp_path / "other-base"), "--verify-images", "1"]) == 2
    assert "initialised with seed 0, not 7 (pass --seed 0)" in capsys.readouterr().err
    assert not (tmp_path / "other-base").exists()
    assert main(["peft-train", "--model-type", "test_vit_t", "--method", "lora", "--blocks", "last:9",
                 "--data", str(planted), "--out", str(tmp_path / "bad")]) == 2
    assert "--blocks" in capsys.readouterr().err and not (tmp_path / "bad" / FINAL).exists()
    assert main(["peft-export", str(planted / "manifest.jsonl"), "--model-type", "test_vit_t",
                 "--out", str(tmp_path / "bad-export")]) == 2
    assert "manifest.jsonl: not a readable adapter checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "bad-export").exists()
