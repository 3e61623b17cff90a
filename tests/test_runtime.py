"""ONNX Runtime threads (every physical core by default, SAM_REUSE_THREADS and --threads override) and devices
(--device cuda on onnxruntime-gpu, else one warning and the CPU)."""

from __future__ import annotations

import json
import os

import pytest

from sam_reuse.base import runtime
from sam_reuse.base.errors import SamReuseError
from sam_reuse.cli import main


def test_default_is_every_physical_core_and_the_variable_overrides_it(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    cores = runtime.physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1) and runtime.default_threads() == cores
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "1")
    assert runtime.default_threads() == 1
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "many")
    with pytest.raises(SamReuseError, match="SAM_REUSE_THREADS='many': expected a number of threads"):
        runtime.default_threads()


def test_more_threads_than_cpus_run_as_many_as_there_are_cpus_with_one_warning(monkeypatch, tmp_path, capsys):
    usable = len(os.sched_getaffinity(0))
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "5000")
    with pytest.warns(runtime.ThreadsCappedWarning, match=f"SAM_REUSE_THREADS=5000 .*more threads than the {usable} "
                                                          f"CPUs this process may use; {usable} run"):
        assert runtime.default_threads() == usable
    assert runtime.default_threads() == usable  # warned once
    monkeypatch.setenv(runtime.THREADS_VARIABLE, str(10 ** 30))
    main(["--threads", str(10 ** 30), "sites", str(tmp_path / "missing.onnx")])  # set before the file fails
    with pytest.warns(runtime.ThreadsCappedWarning, match=f"={10 ** 30} "):
        assert runtime.default_threads() == usable


def test_threads_option_sets_the_sessions_thread_count(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "2")
    assert main(["--threads", "0", "sites", str(tmp_path / "x.onnx")]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(runtime, "physical_cores", lambda: seen.append("asked") or 1)
    main(["--threads", "1", "sites", str(tmp_path / "missing.onnx")])  # fails on the file; the option is set first
    assert os.environ[runtime.THREADS_VARIABLE] == "1" and runtime.default_threads() == 1 and not seen


CUDA_AVAILABLE = "CUDAExecutionProvider" in runtime.ort.get_available_providers()


def test_cuda_runs_on_the_cuda_provider_when_onnxruntime_has_it(monkeypatch):
    monkeypatch.setattr(runtime.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with runtime.on_device("cuda") as providers:
        assert providers == runtime.active_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.active_providers() == ["CPUExecutionProvider"]
    with pytest.raises(SamReuseError, match="--device tpu: choose from cpu, cuda"):
        runtime.execution_providers("tpu")


def test_cuda_without_the_provider_warns_once_and_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.warns(runtime.DeviceFallbackWarning, match="no CUDA execution provider .* running on the CPU"):
        assert runtime.execution_providers("cuda") == ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def synthetic_task(tmp_path_factory):
    from tests import synthetic

    root = tmp_path_factory.mktemp("device")
    encoder, decoder = synthetic.write_models(root)
    return encoder, decoder, synthetic.write_dataset(root / "data", 8)


@pytest.mark.skipif(CUDA_AVAILABLE, reason="this ONNX Runtime has CUDA: the fallback cannot be seen here")
def test_tune_on_cuda_without_the_provider_says_so_in_one_line_and_gives_the_cpu_result(synthetic_task, tmp_path,
                                                                                          capsys):
    encoder, decoder, data = synthetic_task
    argv = ["tune", "--encoder", str(encoder), "--decoder", str(decoder), "--data", str(data), "--no-progress",
            "--evidence", "given", "--top-pairs", "2", "--overlays", "0", "--cache-dir", str(tmp_path / "cache")]
    reports = {}
    for device in ("cpu", "cuda"):
        assert main([*argv, "--out", str(tmp_path / device), "--device", device]) in (0, 3)
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ([] if device == "cpu" else ["export-and-tune: warning: --device cuda: this ONNX Runtime has no "
                                                  "CUDA execution provider (pip install 'sam-reuse[gpu]' installs "
                                                  "onnxruntime-gpu in place of onnxruntime); running on the CPU"])
        reports[device] = json.loads((tmp_path / device / "report.json").read_text())
        assert reports[device]["cost"]["execution_providers"] == ["CPUExecutionProvider"]
    assert reports["cuda"]["curve"] == reports["cpu"]["curve"]


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs onnxruntime-gpu and an NVIDIA GPU (pip install 'sam-reuse[gpu]')")
def test_evaluation_on_cuda_agrees_with_the_cpu(synthetic_task, tmp_path):
    from sam_reuse.calibrate.tune import TuneSettings, evaluate

    encoder, decoder, data = synthetic_task
    results = {device: evaluate(encoder, decoder, data, "all", TuneSettings(progress=False, device=device,
                                                                            cache_dir=str(tmp_path / device)))
               for device in ("cpu", "cuda")}  # one cache each, so the encoder runs on each device
    assert abs(results["cuda"].miou - results["cpu"].miou) < 0.05  # mIoU points: TF32/cuDNN kernels differ slightly
