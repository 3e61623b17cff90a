"""Every rewrite equals a numpy reference of the reuse map; maps are validated; probes are exact."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.runtime import ort_session
from sam_reuse.graphops import ReuseMap, SiteReuse, apply_reuse_map
from sam_reuse.graphops.graph import fingerprint, load_graph
from sam_reuse.graphops.probe import cut, expose, index_input_name, with_index_input, without_mask_prompt
from sam_reuse.graphops.sites import find_sites, user_site
from tests import graphs


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort_session(model.SerializeToString(), threads=1).run(None, feeds)[0]


def _map(model, site_name, tensor, axis, channels, pairs) -> ReuseMap:
    return ReuseMap(fingerprint(model), {site_name: SiteReuse(tensor, axis, channels, tuple(pairs))})


@st.composite
def reuse_pairs(draw, channels: int):
    targets = draw(st.lists(st.integers(0, channels - 1), min_size=1, max_size=channels, unique=True))
    pairs = []
    for target in targets:
        source = draw(st.integers(0, channels - 2))
        pairs.append((target, source if source < target else source + 1))  # never target == source
    return pairs


MLP, MLP_W = graphs.mlp_graph()
CONV, CONV_W = graphs.conv_graph()
X_MLP = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
X_CONV = np.random.default_rng(2).standard_normal((2, 5, 6, 6)).astype(np.float32)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=reuse_pairs(10))
def test_mlp_site_gather_fold_prune_equal_numpy(pairs):
    reuse_map = _map(MLP, "hidden", "hidden", -1, 10, pairs)
    expected = graphs.mlp_reference(X_MLP, MLP_W, reuse_map.sites["hidden"].index())
    for strategy in ("gather", "fold", "prune"):
        model, applied = apply_reuse_map(MLP, reuse_map, strategy)
        assert applied == {"hidden": strategy}
        np.testing.assert_allclose(_run(model, {"x": X_MLP}), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=reuse_pairs(8))
def test_conv_site_gather_fold_prune_equal_numpy(pairs):
    reuse_map = _map(CONV, "h", "h", 1, 8, pairs)
    expected = graphs.conv_reference(X_CONV, CONV_W, reuse_map.sites["h"].index())
    for strategy in ("gather", "fold", "prune"):
        model, _ = apply_reuse_map(CONV, reuse_map, strategy)
        np.testing.assert_allclose(_run(model, {"x": X_CONV}), expected, rtol=1e-5, atol=1e-4)


def test_prune_removes_channels_nothing_reads():
    pairs = [(0, 3), (1, 3), (2, 0)]  # channel 0 stays read (by target 2), channels 1 and 2 are not
    model, applied = apply_reuse_map(MLP, _map(MLP, "hidden", "hidden", -1, 10, pairs), "auto")
    assert applied == {"hidden": "prune"}
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert sorted(w.shape for w in weights.values() if w.ndim == 2) == [(6, 8), (8, 6)]
    hidden = next(v for v in model.graph.value_info if v.name == "hidden")
    assert hidden.type.tensor_type.shape.dim[-1].dim_value == 8


def test_output_site_keeps_its_name_and_equals_numpy():
    """A site that is a graph output (like image_embeddings) is gathered and keeps its public name."""
    model = graphs.mlp_graph()[0]
    graph = load_graph(model)
    site = user_site(graph, "out", "y", -1)
    assert site.strategies == ["gather", "fold"] and "graph output" in site.blocked["prune"]
    original = _run(model, {"x": X_MLP})
    for strategy in ("gather", "fold"):
        rewritten, _ = apply_reuse_map(model, _map(model, "out", "y", -1, 6, [(0, 5), (5, 1)]), strategy)
        assert [o.name for o in rewritten.graph.output] == ["y"]
        np.testing.assert_allclose(_run(rewritten, {"x": X_MLP}), original[..., [5, 1, 2, 3, 4, 1]], rtol=1e-6)


def test_fold_refuses_across_layernorm_naming_the_node():
    model = graphs.layernorm_graph()
    graph = load_graph(model)
    site = user_site(graph, "h", "h", -1)
    assert site.strategies == ["gather"]
    assert "LayerNormalization node 'norm' mixes channels" in site.blocked["fold"]
    with pytest.raises(SamReuseError, match="fold is not exact at site 'h'.*LayerNormalization node 'norm'"):
        apply_reuse_map(model, _map(model, "h", "h", -1, 6, [(0, 1)]), "fold")


class TestValidation:
    def _validate(self, pairs, **overrides):
        graph = load_graph(MLP)
        sites = {"hidden": user_site(graph, "hidden", "hidden", -1)}
        fields = dict(tensor="hidden", axis=-1, channels=10)
        fields.update(overrides)
        reuse_map = ReuseMap(fingerprint(MLP), {"hidden": SiteReuse(pairs=tuple(pairs), **fields)})
        reuse_map.validate(sites, fingerprint(MLP))

    def test_valid_map_passes(self):
        self._validate([(0, 1), (1, 0), (2, 1)])

    @pytest.mark.parametrize("pairs,message", [
        ([(10, 1)], "target 10 out of range 0..9"),
        ([(1, -1)], "source -1 out of range"),
        ([(3, 3)], r"pair \(3, 3\) copies a channel onto itself"),
        ([(2, 1), (2, 4)], "target 2 is listed twice"),
    ])
    def test_bad_pairs(self, pairs, message):
        with pytest.raises(SamReuseError, match=message):
            self._validate(pairs)

    def test_wrong_channel_count(self):
        with pytest.raises(SamReuseError, match="10 channels.*the map says"):
            self._validate([(0, 1)], channels=12)

    def test_unknown_site_and_other_model(self):
        reuse_map = ReuseMap(fingerprint(MLP), {"mlp.99": SiteReuse("nope", -1, 10, ((0, 1),))})
        with pytest.raises(SamReuseError, match="unknown site 'mlp.99'"):
            apply_reuse_map(MLP, reuse_map)
        other = graphs.mlp_graph(seed=1)[0]
        with pytest.raises(SamReuseError, match="made for another model"):
            apply_reuse_map(other, _map(MLP, "hidden", "hidden", -1, 10, [(0, 1)]))


def test_reuse_map_json_round_trip(tmp_path):
    reuse_map = _map(MLP, "hidden", "hidden", -1, 10, [(4, 1), (0, 2)])
    reuse_map.meta["strategy"] = "test"
    path = tmp_path / "map.json"
    reuse_map.save(path)
    data = json.loads(path.read_text())
    assert data["sites"]["hidden"]["pairs"] == [[0, 2], [4, 1]]  # readable, sorted by target
    loaded = ReuseMap.load(path)
    assert loaded.sites == {"hidden": SiteReuse("hidden", -1, 10, ((0, 2), (4, 1)))}
    assert loaded.model_fingerprint == reuse_map.model_fingerprint and loaded.meta == {"strategy": "test"}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SamReuseError, match="bad.json: not a JSON reuse map"):
        ReuseMap.load(tmp_path / "bad.json")


def test_sources_read_the_original_tensor():
    """(0 <- 1) and (1 <- 0) swap the channels rather than copying one twice."""
    np.testing.assert_array_equal(SiteReuse("t", 1, 4, ((0, 1), (1, 0))).index(), [1, 0, 2, 3])


# --- exported encoders: tiny configs of both families and real MobileSAM ---------------------------------

def _encoder_reference(model: onnx.ModelProto, site, index: np.ndarray, image: np.ndarray) -> np.ndarray:
    """numpy reference of the map: original prefix, take(index) on the site, original suffix."""
    prefix, suffix, names = cut(model, site.tensor)
    activations = _run_all(prefix, {"image": image})
    activations[0] = np.take(activations[0], index, axis=site.axis)
    return _run(suffix, dict(zip(names, activations)))


def _run_all(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort_session(model.SerializeToString()).run(None, feeds)


def _random_pairs(channels: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    targets = rng.choice(channels, count, replace=False)
    return [(int(t), int((t + 1 + rng.integers(channels - 1)) % channels)) for t in targets]


def _check_encoder(path, image, site_names):
    model = onnx.load(str(path))
    graph = load_graph(model)
    sites = find_sites(graph)
    for name in site_names:
        site = sites[name]
        reuse_map = _map(model, name, site.tensor, site.axis, site.channels, _random_pairs(site.channels, 16, 0))
        expected = _encoder_reference(model, site, reuse_map.sites[name].index(), image)
        scale = np.abs(expected).max()
        for strategy in site.strategies:
            rewritten, _ = apply_reuse_map(model, reuse_map, strategy)
            got = _run(rewritten, {"image": image})
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{name}/{strategy}")
    return sites


@pytest.fixture(scope="module")
def image(sample_records):
    from sam_reuse.base import imaging

    return imaging.preprocess(imaging.load_image_rgb(sample_records[0].image))


@pytest.mark.parametrize("model_type,expected_mlps", [("test_vit_t", 4), ("test_vit_b", 2)])
def test_tiny_encoder_sites_and_rewrites(tiny_exports, image, model_type, expected_mlps):
    path = tiny_exports[model_type].encoder
    sites = _check_encoder(path, image, ["embedding", "mlp.0", f"mlp.{expected_mlps - 1}"])
    assert sorted(sites) == ["embedding"] + [f"mlp.{i}" for i in range(expected_mlps)]
    assert sites["embedding"].channels == 256 and sites["embedding"].axis == 1
    assert sites["embedding"].strategies == ["gather"]
    assert "ReduceMean" in sites["embedding"].blocked["fold"]  # the neck's decomposed LayerNorm2d
    assert all(sites[f"mlp.{i}"].strategies == ["gather", "fold", "prune"] for i in range(expected_mlps))


def test_every_rewrite_is_exact_at_every_site_of_a_sam2_encoder(sam2_exports, sample_records):
    """Hiera's MLP sites take gather, fold and prune; each rewrite equals the reference on all three outputs (the
    high-resolution features change only when the site lies before them)."""
    from sam_reuse.base import imaging

    image = imaging.preprocess(imaging.load_image_rgb(sample_records[0].image), convention=imaging.SAM2)
    model = onnx.load(str(sam2_exports["test_sam2"].encoder))
    sites = find_sites(load_graph(model))
    assert sorted(sites) == ["embedding"] + [f"mlp.{i}" for i in range(6)]
    original = _run_all(model, {"image": image})
    for name, site in sites.items():
        assert site.strategies == (["gather"] if name == "embedding" else ["gather", "fold", "prune"]), name
    for name in ("embedding", "mlp.0", "mlp.5"):  # the first block feeds every output, the last one only one
        site = sites[name]
        reuse_map = _map(model, name, site.tensor, site.axis, site.channels, _random_pairs(site.channels, 8, 1))
        expected = _encoder_reference(model, site, reuse_map.sites[name].index(), image)
        by_gather = _run_all(apply_reuse_map(model, reuse_map, "gather")[0], {"image": image})
        np.testing.assert_allclose(by_gather[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        assert np.abs(by_gather[0] - original[0]).max() > 0, name  # the map changed the embedding
        for strategy in site.strategies:
            got = _run_all(apply_reuse_map(model, reuse_map, strategy)[0], {"image": image})
            for output, value in enumerate(got):
                np.testing.assert_allclose(value, by_gather[output], rtol=1e-5,
                                           atol=1e-5 * np.abs(by_gather[output]).max(),
                                           err_msg=f"{name}/{strategy}/output {output}")
    # a site in the last stage leaves the high-resolution features exactly as they were
    np.testing.assert_array_equal(by_gather[1], original[1])


def test_dynamo_export_has_the_same_sites(tmp_path, sample_records):
    from sam_reuse.exporter.models import build_sam
    from sam_reuse.exporter.onnx_export import export_encoder

    path = tmp_path / "encoder.onnx"
    export_encoder(build_sam("test_vit_b"), path, exporter="dynamo", opset=18)
    graph = load_graph(onnx.load(str(path)))
    sites = find_sites(graph)
    assert sorted(sites) == ["embedding", "mlp.0", "mlp.1"]
    assert sites["mlp.1"].strategies == ["gather", "fold", "prune"] and sites["mlp.1"].channels == 192


def test_real_mobilesam_sites_and_rewrites(mobilesam_export, image):
    sites = _check_encoder(mobilesam_export.encoder, image, ["embedding", "mlp.9"])
    assert len([s for s in sites if s.startswith("mlp.")]) == 10
    assert sites["mlp.9"].channels == 1280 and sites["mlp.9"].module == "layers.3.blocks.1"


def test_probe_index_input_evaluates_any_map(tiny_exports, image):
    model = onnx.load(str(tiny_exports["test_vit_t"].encoder))
    graph = load_graph(model)
    site = find_sites(graph)["mlp.2"]
    probe = ort_session(with_index_input(model, site.tensor, site.axis, site.channels).SerializeToString())
    feed_name = index_input_name(site.tensor)
    identity = probe.run(None, {"image": image, feed_name: np.arange(site.channels)})[0]
    np.testing.assert_array_equal(identity, _run(model, {"image": image}))
    reuse_map = _map(model, "mlp.2", site.tensor, site.axis, site.channels, _random_pairs(site.channels, 8, 3))
    rewritten, _ = apply_reuse_map(model, reuse_map, "gather")
    index = reuse_map.sites["mlp.2"].index()
    np.testing.assert_array_equal(probe.run(None, {"image": image, feed_name: index})[0],
                                  _run(rewritten, {"image": image}))


def test_probe_zero_channel_ablates_channels(tiny_exports, image):
    """Index value C reads an all-zero channel: equal to zeroing those channels between prefix and suffix."""
    model = onnx.load(str(tiny_exports["test_vit_b"].encoder))
    site = find_sites(load_graph(model))["mlp.1"]
    probe = ort_session(with_index_input(model, site.tensor, site.axis, site.channels,
                                         zero_channel=True).SerializeToString())
    feed_name = index_input_name(site.tensor)
    index = np.arange(site.channels)
    np.testing.assert_array_equal(probe.run(None, {"image": image, feed_name: index})[0], _run(model, {"image": image}))
    index[[3, 17, 40]] = site.channels
    index[5] = 9
    prefix, suffix, names = cut(model, site.tensor)
    activations = _run_all(prefix, {"image": image})
    zeroed = np.concatenate([activations[0], np.zeros_like(activations[0][..., :1])], axis=site.axis)
    activations[0] = np.take(zeroed, index, axis=site.axis)
    expected = _run(suffix, dict(zip(names, activations)))
    got = probe.run(None, {"image": image, feed_name: index})[0]
    assert np.abs(got - _run(model, {"image": image})).max() > 1e-3  # the ablation changes the output
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_expose_adds_site_output_with_shape(tiny_exports, image):
    model = onnx.load(str(tiny_exports["test_vit_b"].encoder))
    site = find_sites(load_graph(model))["mlp.1"]
    exposed = expose(model, [site.tensor])
    output = exposed.graph.output[-1]
    assert output.name == site.tensor
    assert output.type.tensor_type.shape.dim[-1].dim_value == 192
    outs = _run_all(exposed, {"image": image})
    assert outs[1].shape[-1] == 192
    np.testing.assert_array_equal(outs[0], _run(model, {"image": image}))


def test_cli_sites_and_apply(tiny_exports, image, tmp_path, capsys):
    from sam_reuse.cli import main

    encoder = tiny_exports["test_vit_b"].encoder
    assert main(["sites", str(encoder), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["mlp.1"]["strategies"] == ["gather", "fold", "prune"]
    sidecar = json.loads(tiny_exports["test_vit_b"].sidecar.read_text())
    assert sidecar["sites"] == listed  # export.json records the same sites

    model = onnx.load(str(encoder))
    reuse_map = _map(model, "mlp.1", listed["mlp.1"]["tensor"], -1, 192, [(0, 5), (7, 1)])
    reuse_map.sites["embedding"] = SiteReuse("image_embeddings", 1, 256, ((3, 4),))
    reuse_map.save(tmp_path / "map.json")
    out = tmp_path / "encoder.tuned.onnx"
    assert main(["apply", str(encoder), str(tmp_path / "map.json"), "--out", str(out)]) == 0
    assert "embedding: gather, mlp.1: prune" in capsys.readouterr().out
    expected, _ = apply_reuse_map(model, reuse_map, "gather")
    np.testing.assert_allclose(_run(onnx.load(str(out)), {"image": image}), _run(expected, {"image": image}),
                               rtol=1e-5, atol=1e-5)

    assert main(["apply", str(encoder), str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "missing.json: reuse map not found" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_a_decoder_without_mask_prompt_gives_the_decoder_s_values(tiny_exports, sam2_exports):
    """The search's decoder: the mask-prompt inputs become constants (no mask); masks and IoUs are unchanged."""
    from sam_reuse.base.contract import HIGH_RES_FEATURES, decoder_feeds

    for export in (tiny_exports["test_vit_t"], sam2_exports["test_sam2"]):
        model = onnx.load(str(export.decoder))
        folded = without_mask_prompt(model)
        assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input
                                                         if i.name not in ("mask_input", "has_mask_input")]
        rng = np.random.default_rng(0)
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim][1:] for i in model.graph.input}
        high_res = [rng.normal(size=(3, *shapes[name])) for name in HIGH_RES_FEATURES if name in shapes]
        feeds = decoder_feeds(rng.normal(size=(3, 256, 64, 64)), rng.uniform(0, 1024, (3, 2, 2)),
                              np.array([[1.0, -1.0], [1.0, 0.0], [2.0, 3.0]]), high_res=high_res)
        expected = ort_session(model.SerializeToString()).run(None, feeds)
        ours = ort_session(folded.SerializeToString()).run(None, {k: v for k, v in feeds.items() if k in shapes
                                                                  and k not in ("mask_input", "has_mask_input")})
        for got, want in zip(ours, expected):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(SamReuseError, match="the decoder has no input named 'mask_input'"):
        without_mask_prompt(onnx.load(str(tiny_exports["test_vit_t"].encoder)))
