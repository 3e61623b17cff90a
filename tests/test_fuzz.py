"""Generated bad input: whatever a manifest line, a reuse map or an image file holds, the answer is a result or
one ``SamReuseError`` naming the problem, never another exception."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sam_reuse.base import imaging
from sam_reuse.base.errors import SamReuseError
from sam_reuse.calibrate.data import read_manifest
from sam_reuse.graphops.reuse_map import ReuseMap

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
scalars = st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
record_fields = st.fixed_dictionaries({}, optional={
    "image": json_values | st.just("a.png"), "mask": json_values | st.just("a_mask.png"),
    "points": json_values | st.just([[1, 2]]), "labels": json_values, "box": json_values, "id": json_values})


@FUZZ
@given(lines=st.lists(record_fields | json_values, min_size=1, max_size=3))
def test_any_manifest_reads_or_says_which_line_is_wrong(tmp_path, lines):
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    try:
        records = read_manifest(tmp_path)
    except SamReuseError as exc:
        assert str(exc).startswith(str(tmp_path / "manifest.jsonl")) and "\n" not in str(exc)
        return
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)) and all("/" not in k and k not in (".", "..") for k in keys)


@FUZZ
@given(raw=st.binary(max_size=64))
def test_manifest_bytes_that_are_not_utf8_are_one_error(tmp_path, raw):
    (tmp_path / "manifest.jsonl").write_bytes(raw)
    try:
        records = read_manifest(tmp_path)
    except SamReuseError as exc:
        assert str(exc).startswith(str(tmp_path / "manifest.jsonl"))
        return
    assert records  # bytes that happen to be a valid manifest


reuse_maps = st.fixed_dictionaries({"format": st.just("sam-reuse/reuse-map@1") | json_values}, optional={
    "model_fingerprint": json_values, "meta": json_values,
    "sites": st.dictionaries(st.text(max_size=6), st.fixed_dictionaries({}, optional={
        "tensor": json_values, "axis": json_values, "channels": json_values,
        "pairs": st.lists(st.lists(scalars, max_size=3), max_size=3) | json_values}), max_size=2) | json_values})


@FUZZ
@given(data=reuse_maps | json_values)
def test_any_reuse_map_json_loads_or_is_refused(data):
    try:
        loaded = ReuseMap.from_json(data, "map.json")
    except SamReuseError as exc:
        assert str(exc).startswith("map.json: ")
        return
    for site in loaded.sites.values():
        assert all(isinstance(c, int) and not isinstance(c, bool) for pair in site.pairs for c in pair)


@FUZZ
@given(mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA"]),
       size=st.tuples(st.integers(1, 9), st.integers(1, 9)), seed=st.integers(0, 2**16),
       cut=st.integers(0, 400), form=st.sampled_from(["PNG", "TIFF"]))
def test_any_image_file_becomes_8_bit_rgb_or_one_error(tmp_path, mode, size, seed, cut, form):
    rng = np.random.default_rng(seed)
    image = Image.frombytes("RGB", size, rng.integers(0, 256, size=size[0] * size[1] * 3, dtype=np.uint8).tobytes())
    try:
        image = image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format=form)
    except (OSError, ValueError):  # a mode this format cannot hold: nothing to test
        return
    data = buffer.getvalue()
    path = tmp_path / f"x.{form.lower()}"
    path.write_bytes(data[:-cut] if cut else data)  # cut: a file truncated by a failed copy
    try:
        rgb = imaging.load_image_rgb(path)
    except SamReuseError as exc:
        assert str(exc).startswith(str(path))
        return
    assert rgb.dtype == np.uint8 and rgb.shape == (size[1], size[0], 3)


def test_fuzzing_found_these_by_hand_too(tmp_path):
    """The cases the generators above found first, kept as plain examples."""
    (tmp_path / "manifest.jsonl").write_text('{"image": 5, "mask": "m.png"}\n')
    with pytest.raises(SamReuseError, match=r"manifest.jsonl:1: .*'image' must be a path string, not 5"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png", "mask": "m.png", "id": "../../etc"}\n')
    with pytest.raises(SamReuseError, match=r"id '../../etc' is not a plain file name"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_bytes(b'{"image": "\xff.png", "mask": "m.png"}\n')
    with pytest.raises(SamReuseError, match="not UTF-8 text"):
        read_manifest(tmp_path)
    with pytest.raises(SamReuseError, match=r"map.json: not a reuse map \(a JSON list"):
        ReuseMap.from_json([[2, 5]], "map.json")
