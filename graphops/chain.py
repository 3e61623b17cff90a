"""Which nodes a channel permutation can be pushed through, exactly.

``trace_producer`` walks upstream from a site tensor through ops that act on
each channel independently (unary elementwise ops, binary elementwise ops
whose other operand is a scalar or per-channel constant, the decomposed GELU)
to the last linear node (MatMul/Gemm/Conv with a constant weight). Indexing
that node's output channels - and every per-channel constant on the way -
then produces exactly ``X[..., index]`` at the site. ``linear_consumers``
checks the other side: every consumer is linear in the site's channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from sam_reuse.graphops.graph import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, constant_value


class NotChannelwise(Exception):
    """A node between the site and its producer mixes channels (message names the node)."""


@dataclass
class ProducerChain:
    """The linear producer of a site and the channel-wise nodes after it."""

    producer: gs.Node
    weight_axis: int  # axis of the producer weight that indexes output channels
    chain_nodes: list[gs.Node] = field(default_factory=list)
    chain_tensors: list[gs.Variable] = field(default_factory=list)  # producer output .. site, topological
    per_channel: list[tuple[gs.Node, int, int]] = field(default_factory=list)  # (node, input slot, channel dim)


def _normalise_axis(axis: int, rank: int) -> int:
    return axis - rank if axis >= 0 else axis


def _linear_output_axis(node: gs.Node, rank: int) -> tuple[int, int] | None:
    """(output channel axis as a negative index, weight axis) for a linear node with a constant weight."""
    if node.op == "MatMul" and len(node.inputs) == 2 and constant_value(node.inputs[1]) is not None:
        weight = constant_value(node.inputs[1])
        return (-1, weight.ndim - 1) if weight.ndim >= 2 else None
    if node.op == "Gemm" and constant_value(node.inputs[1]) is not None:
        return -1, (0 if node.attrs.get("transB", 0) else 1)
    if node.op == "Conv" and constant_value(node.inputs[1]) is not None and node.attrs.get("group", 1) == 1:
        return 1 - rank, 0
    return None


def trace_producer(site: gs.Variable, axis: int, rank: int) -> ProducerChain:
    """Find the linear producer of ``site`` through channel-wise ops, or raise ``NotChannelwise``."""
    axis = _normalise_axis(axis, rank)
    chain_nodes: list[gs.Node] = []
    tensors: list[gs.Variable] = []
    per_channel: list[tuple[gs.Node, int, int]] = []
    producer: gs.Node | None = None
    weight_axis = 0
    stack = [site]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        tensors.append(tensor)
        if not tensor.inputs:
            raise NotChannelwise(f"tensor '{tensor.name}' is a graph input, no producer to fold into")
        node = tensor.inputs[0]
        linear = _linear_output_axis(node, rank)
        if linear is not None:
            if linear[0] != axis:
                raise NotChannelwise(f"{node.op} node '{node.name}' produces channels on axis {linear[0]}, "
                                     f"the site's axis is {axis}")
            if producer is not None and producer is not node:
                raise NotChannelwise(f"site depends on two linear producers ('{producer.name}', '{node.name}')")
            producer, weight_axis = node, linear[1]
            continue
        chain_nodes.append(node)
        if node.op in ELEMENTWISE_UNARY:
            stack.append(node.inputs[0])
        elif node.op in ELEMENTWISE_BINARY:
            for slot, operand in enumerate(node.inputs):
                value = constant_value(operand)
                if value is None:
                    stack.append(operand)
                    continue
                channel_dim = axis + value.ndim if value.ndim >= -axis else None
                if channel_dim is not None and value.shape[channel_dim] > 1:
                    if node.op == "Pow" and slot == 1:
                        raise NotChannelwise(f"Pow node '{node.name}' has a per-channel exponent")
                    per_channel.append((node, slot, channel_dim))
        else:
            raise NotChannelwise(f"{node.op} node '{node.name}' mixes channels")
    if producer is None:
        raise NotChannelwise(f"no linear producer found upstream of '{site.name}'")
    _check_no_side_consumers(producer, chain_nodes, site)
    return ProducerChain(producer, weight_axis, chain_nodes, tensors, per_channel)


def _check_no_side_consumers(producer: gs.Node, chain_nodes: list[gs.Node], site: gs.Variable) -> None:
    """Re-indexing the producer is only exact if nothing outside the chain reads its channels."""
    inside = {id(n) for n in chain_nodes}
    for node in [producer, *chain_nodes]:
        for out in node.outputs:
            if out is site:
                continue
            for consumer in out.outputs:
                if id(consumer) not in inside:
                    raise NotChannelwise(f"tensor '{out.name}' is also read by {consumer.op} node '{consumer.name}'")


def linear_consumers(site: gs.Variable, axis: int, rank: int) -> list[tuple[gs.Node, int]]:
    """Consumers of ``site`` with the weight axis that multiplies its channels, or raise ``NotChannelwise``."""
    axis = _normalise_axis(axis, rank)
    found = []
    for node in site.outputs:
        if node.inputs[0] is not site or (len(node.inputs) > 1 and node.inputs[1] is site):
            raise NotChannelwise(f"{node.op} node '{node.name}' does not read the site as its data input")
        weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            raise NotChannelwise(f"{node.op} node '{node.name}' is not linear in the site's channels")
        if node.op == "MatMul" and axis == -1 and weight.ndim == 2:
            found.append((node, 0))
        elif node.op == "Gemm" and axis == -1 and not node.attrs.get("transA", 0):
            found.append((node, 1 if node.attrs.get("transB", 0) else 0))
        elif node.op == "Conv" and axis == 1 - rank and node.attrs.get("group", 1) == 1:
            found.append((node, 1))
        else:
            raise NotChannelwise(f"{node.op} node '{node.name}' is not linear in the site's channels")
    if not found:
        raise NotChannelwise(f"tensor '{site.name}' has no consumer in this graph")
    return found


def take(values: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(values, index, axis=axis))
