"""ONNX Runtime thread count: every physical core by default, SAM_REUSE_THREADS and --threads override."""

from __future__ import annotations

import os

import pytest

from sam_reuse.base import runtime
from sam_reuse.base.errors import SamReuseError
from sam_reuse.cli import main


def test_default_is_every_physical_core_and_the_variable_overrides_it(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
    cores = runtime.physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1) and runtime.default_threads() == cores
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "3")
    assert runtime.default_threads() == 3
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "many")
    with pytest.raises(SamReuseError, match="SAM_REUSE_THREADS='many': expected a number of threads"):
        runtime.default_threads()


def test_threads_option_sets_the_sessions_thread_count(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(runtime.THREADS_VARIABLE, "2")
    assert main(["--threads", "0", "sites", str(tmp_path / "x.onnx")]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(runtime, "physical_cores", lambda: seen.append("asked") or 1)
    main(["--threads", "1", "sites", str(tmp_path / "missing.onnx")])  # fails on the file; the option is set first
    assert os.environ[runtime.THREADS_VARIABLE] == "1" and runtime.default_threads() == 1 and not seen
