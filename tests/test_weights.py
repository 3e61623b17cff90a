"""Weight verification: size and sha256 are enforced before a checkpoint is used."""

from __future__ import annotations

import pytest

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import sha256_file
from sam_reuse.exporter.weights import WEIGHT_SOURCES, cached_weight_path, fetch_weights, verify_weight_file


def test_cached_mobilesam_verifies(mobilesam_checkpoint):
    source = WEIGHT_SOURCES["mobilesam"]
    assert mobilesam_checkpoint.stat().st_size == 40_728_226
    assert sha256_file(mobilesam_checkpoint) == source.sha256
    assert fetch_weights("mobilesam") == mobilesam_checkpoint  # cached: no download


def test_wrong_size_and_hash_are_rejected(tmp_path):
    source = WEIGHT_SOURCES["mobilesam"]
    short = tmp_path / "short.pt"
    short.write_bytes(b"0" * 10)
    with pytest.raises(SamReuseError, match="short.pt: size 10 bytes, expected 40728226"):
        verify_weight_file(short, source)
    same_size = tmp_path / "same.pt"
    with open(same_size, "wb") as f:
        f.truncate(source.size)
    with pytest.raises(SamReuseError, match="same.pt: sha256 .* does not match"):
        verify_weight_file(same_size, source)


def test_corrupt_cache_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_REUSE_CACHE", str(tmp_path))
    path = cached_weight_path("mobilesam")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"broken")
    with pytest.raises(SamReuseError, match="mobile_sam.pt: size 6 bytes"):
        fetch_weights("mobilesam")


def test_unknown_weights_name():
    with pytest.raises(SamReuseError, match="unknown weights 'sam_vit_h'"):
        fetch_weights("sam_vit_h")
