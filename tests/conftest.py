"""Shared fixtures: bundled real data, exported tiny models, and real MobileSAM when fetched."""

from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "data" / "isic2016"
SHARED_DATA = REPO.parent / "shared" / "data"

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="Overwriting tiny_vit")


@pytest.fixture(scope="session")
def sample_records():
    from sam_reuse.calibrate.data import read_manifest

    return read_manifest(SAMPLES)


@pytest.fixture(scope="session")
def mobilesam_checkpoint() -> Path:
    """The real MobileSAM weights; `make test` fetches them before pytest runs."""
    from sam_reuse.exporter.weights import cached_weight_path

    path = cached_weight_path("mobilesam")
    if not path.exists():
        pytest.skip(f"real MobileSAM weights not fetched ({path}); run `export-and-tune fetch-weights`")
    return path


def _session_root(tmp_path_factory) -> Path:
    """This test run's temporary folder, shared by all xdist workers (each has its own basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _export(tmp_path_factory, model_type: str, records, checkpoint=None, exporter="legacy"):
    """One export per test run: the first worker to ask writes it, the others wait on its lock and reuse it."""
    from sam_reuse.exporter.onnx_export import existing_export, export_model

    root = _session_root(tmp_path_factory)
    out = root / f"export-{model_type}-{exporter}"
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return (existing_export(out, model_type, checkpoint, exporter)
                or export_model(model_type, out, checkpoint, records[:1], exporter=exporter))


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, sample_records):
    """Legacy-exporter ONNX pairs of both tiny encoder families."""
    return {mt: _export(tmp_path_factory, mt, sample_records) for mt in ("test_vit_t", "test_vit_b")}


@pytest.fixture(scope="session")
def sam2_exports(tmp_path_factory, sample_records):
    """Legacy-exporter ONNX pairs of the tiny SAM 2 configs (one per size's code path)."""
    return {mt: _export(tmp_path_factory, mt, sample_records) for mt in ("test_sam2", "test_sam2_b+", "test_sam2_l")}


@pytest.fixture(scope="session")
def mobilesam_export(tmp_path_factory, sample_records, mobilesam_checkpoint):
    return _export(tmp_path_factory, "vit_t", sample_records, mobilesam_checkpoint)


def pytest_configure(config):
    """Pin ONNX Runtime's and torch's threads: 2, or with xdist the cores shared out among the workers (ONNX
    Runtime's threads spin while they wait, so more threads than cores slows every worker down)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, (os.cpu_count() or 2) // workers))
    os.environ.setdefault("SAM_REUSE_THREADS", str(threads))
    if workers > 1:
        import torch

        torch.set_num_threads(threads)


# The slowest test files, slowest first (`pytest --durations`, 2026-12-03). xdist's loadfile hands files to the
# workers in collection order, so starting these first keeps one long file from running alone at the end.
SLOWEST_FIRST = ("test_finetune.py", "test_quantize.py", "test_tune.py", "test_first_order.py", "test_sam2.py",
                 "test_graphops.py", "test_engine.py", "test_export.py", "test_package.py", "test_app_decoder.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
