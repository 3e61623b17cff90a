"""The three exact channel-reuse rewrites, and ``apply_reuse_map`` choosing between them.

Each rewrite is a small function ``(graph, site, reuse) -> None`` that edits an
onnx-graphsurgeon graph in place so that the site tensor becomes
``X' = take(X, index, axis)`` with ``index[target] = source``:

* ``gather``: a Gather node after the site; always exact, costs one copy;
* ``fold``: re-index the linear producer's weight (and every per-channel
  constant between it and the site); zero runtime cost;
* ``prune``: fold in the consumers' weights (a target's weight row is added to
  its source's) and delete the channels nothing reads any more from producer
  and consumers: smaller and faster than the original.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sam_reuse.base.contract import REUSE_MAP_PROPERTY
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import ENCODER_KIND, atomic_path, check_output_file, refuse_overwriting
from sam_reuse.base.runtime import load_model
from sam_reuse.graphops.chain import NotChannelwise, ProducerChain, linear_consumers, take, trace_producer
from sam_reuse.graphops.graph import constant_value, finalize, fingerprint, load_graph, with_properties
from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse
from sam_reuse.graphops.sites import Site, find_sites, user_site

_names = itertools.count()


def _constant(base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(f"{base}/reuse_{next(_names)}", np.ascontiguousarray(values))


def _site_tensor(graph: gs.Graph, site: Site) -> gs.Variable:
    return graph.tensors()[site.tensor]


def _rank(tensor: gs.Variable) -> int:
    if tensor.shape is None:
        raise SamReuseError(f"tensor '{tensor.name}' has no shape information")
    return len(tensor.shape)


def insert_gather(graph: gs.Graph, tensor: gs.Variable, axis: int, index: gs.Tensor) -> gs.Node:
    """Route every reader of ``tensor`` (graph outputs too, by name) through a Gather."""
    gathered = gs.Variable(f"{tensor.name}/reused", dtype=tensor.dtype, shape=tensor.shape)
    if tensor in graph.outputs:
        # The output keeps its public name; the original tensor is renamed.
        public = tensor.name
        tensor.name = f"{public}/before_reuse"
        gathered.name = public
        graph.outputs[graph.outputs.index(tensor)] = gathered
    for consumer in list(tensor.outputs):
        for slot, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[slot] = gathered
    node = gs.Node("Gather", name=f"{gathered.name}/gather", inputs=[tensor, index], outputs=[gathered],
                   attrs={"axis": axis})
    graph.nodes.append(node)
    return node


def gather(graph: gs.Graph, site: Site, reuse: SiteReuse) -> None:
    tensor = _site_tensor(graph, site)
    insert_gather(graph, tensor, site.axis, _constant(tensor.name, reuse.index()))


def _reindex_producer(chain: ProducerChain, index: np.ndarray) -> None:
    """Make the producer and the per-channel constants after it emit ``channels[index]``."""
    node = chain.producer
    node.inputs[1] = _constant(node.name, take(constant_value(node.inputs[1]), index, chain.weight_axis))
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] > 1:
        node.inputs[2] = _constant(node.name, take(bias, index, bias.ndim - 1))
    for consumer, slot, dim in chain.per_channel:
        consumer.inputs[slot] = _constant(consumer.name, take(constant_value(consumer.inputs[slot]), index, dim))


def fold(graph: gs.Graph, site: Site, reuse: SiteReuse) -> None:
    tensor = _site_tensor(graph, site)
    try:
        chain = trace_producer(tensor, site.axis, _rank(tensor))
    except NotChannelwise as exc:
        raise SamReuseError(f"fold is not exact at site '{site.name}': {exc}") from None
    _reindex_producer(chain, reuse.index())


def prune(graph: gs.Graph, site: Site, reuse: SiteReuse) -> None:
    tensor = _site_tensor(graph, site)
    rank = _rank(tensor)
    try:
        chain = trace_producer(tensor, site.axis, rank)
        if tensor in graph.outputs:
            raise NotChannelwise(f"'{tensor.name}' is a graph output")
        readers = linear_consumers(tensor, site.axis, rank)
    except NotChannelwise as exc:
        raise SamReuseError(f"prune is not exact at site '{site.name}': {exc}") from None
    index = reuse.index()
    keep = np.unique(index)
    position = {channel: i for i, channel in enumerate(keep)}
    for node, weight_axis in readers:
        weight = np.moveaxis(constant_value(node.inputs[1]), weight_axis, 0)
        merged = np.zeros((len(keep),) + weight.shape[1:], dtype=weight.dtype)
        for reader_channel, source in enumerate(index):
            merged[position[source]] += weight[reader_channel]
        node.inputs[1] = _constant(node.name, np.moveaxis(merged, 0, weight_axis))
    _reindex_producer(chain, keep)
    for t in chain.chain_tensors:  # channel count changed: let shape inference recompute
        t.shape = None


Rewrite = Callable[[gs.Graph, Site, SiteReuse], None]
STRATEGIES: dict[str, Rewrite] = {"gather": gather, "fold": fold, "prune": prune}
PREFERENCE = ("prune", "fold", "gather")  # cheapest exact rewrite first


def resolve_sites(graph: gs.Graph, reuse_map: ReuseMap | None = None) -> dict[str, Site]:
    """Built-in sites plus the user-named sites a map refers to."""
    sites = find_sites(graph)
    tensors = graph.tensors()
    for name, reuse in (reuse_map.sites.items() if reuse_map else ()):
        if name not in sites and reuse.tensor in tensors:
            sites[name] = user_site(graph, name, reuse.tensor, reuse.axis)
    return sites


def choose_strategy(site: Site, requested: str) -> str:
    if requested == "auto":
        return next(s for s in PREFERENCE if s in site.strategies)
    if requested not in STRATEGIES:
        raise SamReuseError(f"unknown strategy '{requested}'; choose from auto, {', '.join(STRATEGIES)}")
    if requested not in site.strategies:
        raise SamReuseError(f"{requested} is not exact at site '{site.name}': {site.blocked.get(requested, '')}")
    return requested


def apply_reuse_map(model: str | Path | onnx.ModelProto, reuse_map: ReuseMap, strategy: str = "auto",
                    check_fingerprint: bool = True) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Rewrite ``model`` by ``reuse_map``; returns the checked model and the strategy used per site."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = load_graph(proto)
    sites = resolve_sites(graph, reuse_map)
    reuse_map.validate(sites, fingerprint(proto) if check_fingerprint else None)
    applied: dict[str, str] = {}
    for name, reuse in sorted(reuse_map.sites.items()):
        if not reuse.pairs:
            continue
        applied[name] = choose_strategy(sites[name], strategy)
        STRATEGIES[applied[name]](graph, sites[name], reuse)
    result = finalize(graph)
    with_properties(proto, result, **{REUSE_MAP_PROPERTY: json.dumps(reuse_map.to_json(), sort_keys=True),
                                      "sam_reuse.strategies": json.dumps(applied, sort_keys=True)})
    return result, applied


def require_original(model: onnx.ModelProto, where: str | Path, what: str) -> None:
    """Refuse an encoder a map already rewrote: its metadata would be overwritten by the new map and its pairs
    lost from every record (``verify`` compares the original plus one map)."""
    recorded = next((p.value for p in model.metadata_props if p.key == REUSE_MAP_PROPERTY), None)
    if recorded is not None and ReuseMap.from_json(json.loads(recorded)).num_pairs:
        raise SamReuseError(f"{where}: already rewritten by a reuse map (see its metadata '{REUSE_MAP_PROPERTY}'); "
                            f"{what} the original encoder")


def apply_reuse_map_file(encoder: str | Path, reuse_map_path: str | Path, out: str | Path,
                         strategy: str = "auto") -> dict[str, str]:
    """``apply_reuse_map`` from files to a file, written atomically; returns the strategy per site."""
    refuse_overwriting(out, encoder, reuse_map_path)
    check_output_file(out, "--out", kind=ENCODER_KIND)  # never over a decoder or a record
    model = load_model(encoder, "encoder ONNX")
    require_original(model, encoder, "apply maps to")
    model, applied = apply_reuse_map(model, ReuseMap.load(reuse_map_path), strategy)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return applied
