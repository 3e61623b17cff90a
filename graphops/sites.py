"""Channel sites of an exported SAM encoder, found by graph structure.

* ``embedding``: the 256-channel image embedding (graph output
  ``image_embeddings``, channel axis 1), the site of the reference method;
* ``mlp.<i>``: the hidden activation (after GELU, before fc2) of the i-th
  transformer block's MLP, in graph order (channel axis -1). The pattern
  MatMul -> bias Add -> Div/Erf/Add/Mul/Mul -> MatMul is what both the
  TorchScript and the dynamo exporter emit for SAM's and TinyViT's MLPs;
* any tensor a user names, with its channel axis (``user_site``).

Each site lists the rewrite strategies that are exact there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from sam_reuse.base.contract import EMBEDDING
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.runtime import load_model
from sam_reuse.graphops.chain import NotChannelwise, linear_consumers, trace_producer
from sam_reuse.graphops.graph import constant_value, load_graph

_MODULE_PATH = re.compile(r"((?:layers\.\d+\.)?blocks\.\d+)")


@dataclass
class Site:
    name: str
    tensor: str
    axis: int
    channels: int
    producer: str = ""
    consumers: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)  # strategy -> why it is not exact here
    module: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "axis": self.axis, "channels": self.channels, "producer": self.producer,
                "consumers": self.consumers, "strategies": self.strategies, "blocked": self.blocked,
                "module": self.module}


def _describe(graph: gs.Graph, name: str, tensor: gs.Variable, axis: int) -> Site:
    rank = len(tensor.shape) if tensor.shape is not None else None
    if rank is None:
        raise SamReuseError(f"tensor '{tensor.name}' has no shape information; run shape inference first")
    channels = tensor.shape[axis]
    if not isinstance(channels, int):
        raise SamReuseError(f"tensor '{tensor.name}' has a symbolic size on axis {axis}")
    producer = tensor.inputs[0] if tensor.inputs else None
    site = Site(name=name, tensor=tensor.name, axis=axis, channels=channels,
                producer=f"{producer.op}:{producer.name}" if producer else "graph input",
                consumers=[f"{n.op}:{n.name}" for n in tensor.outputs] + (
                    ["graph output"] if tensor in graph.outputs else []),
                strategies=["gather"])
    try:
        trace_producer(tensor, axis, rank)
        site.strategies.append("fold")
    except NotChannelwise as exc:
        site.blocked["fold"] = str(exc)
        site.blocked["prune"] = str(exc)
        return site
    if tensor in graph.outputs:
        site.blocked["prune"] = f"'{tensor.name}' is a graph output; its consumers live in another model"
        return site
    try:
        linear_consumers(tensor, axis, rank)
        site.strategies.append("prune")
    except NotChannelwise as exc:
        site.blocked["prune"] = str(exc)
    return site


def _is_gelu_output(tensor: gs.Variable) -> bool:
    """True for the last Mul of SAM's exported erf-GELU (or a Gelu op)."""
    if not tensor.inputs:
        return False
    node = tensor.inputs[0]
    if node.op == "Gelu":
        return True
    ops_upstream: set[str] = set()
    frontier, depth = [node], 0
    while frontier and depth < 5:
        nxt = []
        for n in frontier:
            ops_upstream.add(n.op)
            nxt.extend(t.inputs[0] for t in n.inputs if t.inputs and constant_value(t) is None)
        frontier, depth = nxt, depth + 1
    return node.op == "Mul" and "Erf" in ops_upstream


def _module_of(node: gs.Node) -> str:
    """Module path such as ``blocks.3`` from a TorchScript-exported node name ("" for dynamo names)."""
    match = _MODULE_PATH.findall(node.name.replace("/", "."))
    return match[-1] if match else ""


def find_sites(graph: gs.Graph) -> dict[str, Site]:
    """All built-in sites of an encoder graph, by name."""
    sites: dict[str, Site] = {}
    outputs = {t.name: t for t in graph.outputs}
    if EMBEDDING in outputs:
        sites["embedding"] = _describe(graph, "embedding", outputs[EMBEDDING], 1)
    index = 0
    for node in graph.nodes:  # exporters emit nodes in execution order
        if node.op != "MatMul" or constant_value(node.inputs[1]) is None:
            continue
        hidden = node.inputs[0]
        if not _is_gelu_output(hidden) or hidden.shape is None:
            continue
        site = _describe(graph, f"mlp.{index}", hidden, -1)
        site.module = _module_of(node)
        sites[site.name] = site
        index += 1
    return sites


def user_site(graph: gs.Graph, name: str, tensor_name: str, axis: int) -> Site:
    """A site on any named tensor of the graph."""
    tensors = graph.tensors()
    if tensor_name not in tensors or isinstance(tensors[tensor_name], gs.Constant):
        raise SamReuseError(f"no activation tensor named '{tensor_name}' in this graph")
    return _describe(graph, name, tensors[tensor_name], axis)


def sites_of(model_path: str | Path) -> dict[str, Site]:
    """Sites of an ONNX file (shape inference included)."""
    path = Path(model_path)
    model = load_model(path)
    sites = find_sites(load_graph(model))
    if not sites:
        raise SamReuseError(f"{path}: no channel site (no '{EMBEDDING}' output and no MLP hidden activation); "
                            "is it an encoder exported by export-and-tune?")
    return sites
