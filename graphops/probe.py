"""Search-time variants of a graph: any reuse map in one session, and cached activations.

* ``with_index_input``: a Gather at a site whose indices are a graph input
  (``reuse_index.<site>``, int64 [channels]); one ONNX Runtime session then
  evaluates any map at that site - the identity index gives the original.
  With ``zero_channel`` the index may also name channel ``channels``, an
  all-zero channel, so the same session scores channel ablation.
* ``without_mask_prompt``: a decoder whose mask-prompt inputs are constants
  (no mask), so ONNX Runtime computes the mask branch once, at load.
* ``expose``: the site tensor as an extra graph output, with its shape.
* ``cut``: split a graph at a site into a prefix (inputs -> every tensor the
  rest still needs) and a suffix (those tensors -> outputs), so activations
  are computed once and candidates rerun only the suffix. An MLP site's
  suffix also needs the block's residual input: the frontier lists every
  tensor that crosses the cut, site first.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sam_reuse.base.errors import SamReuseError
from sam_reuse.graphops.graph import constant_value, finalize, load_graph
from sam_reuse.graphops.rewrites import insert_gather


def index_input_name(tensor_name: str) -> str:
    return f"reuse_index.{tensor_name}"


def _tensor(graph: gs.Graph, name: str) -> gs.Variable:
    tensor = graph.tensors().get(name)
    if tensor is None or isinstance(tensor, gs.Constant):
        raise SamReuseError(f"no activation tensor named '{name}' in this graph")
    return tensor


def with_index_input(model: onnx.ModelProto, tensor_name: str, axis: int, channels: int,
                     zero_channel: bool = False) -> onnx.ModelProto:
    """Model whose ``tensor_name`` is gathered along ``axis`` by a runtime index input.

    ``zero_channel`` appends an all-zero channel to the gathered tensor, so
    index value ``channels`` zeroes a channel (the ablation screening uses).
    """
    graph = load_graph(model)
    tensor = _tensor(graph, tensor_name)
    index = gs.Variable(index_input_name(tensor_name), dtype=np.int64, shape=[channels])
    graph.inputs.append(index)
    gather = insert_gather(graph, tensor, axis, index)
    if zero_channel:
        gather.inputs[0] = _with_zero_channel(graph, tensor, axis)
    return finalize(graph)


def _with_zero_channel(graph: gs.Graph, tensor: gs.Variable, axis: int) -> gs.Variable:
    """Concat(tensor, 0 * tensor[first channel]) along ``axis``: channel ``C`` reads zeros."""
    name = tensor.name
    first = gs.Variable(f"{name}/first_channel", dtype=tensor.dtype)
    zeros = gs.Variable(f"{name}/zero_channel", dtype=tensor.dtype)
    padded = gs.Variable(f"{name}/with_zero_channel", dtype=tensor.dtype)
    starts, ends, axes = (gs.Constant(f"{name}/slice_{label}", np.array([value], dtype=np.int64))
                          for label, value in (("start", 0), ("end", 1), ("axis", axis)))
    zero = gs.Constant(f"{name}/zero", np.zeros((), dtype=tensor.dtype))
    graph.nodes += [
        gs.Node("Slice", inputs=[tensor, starts, ends, axes], outputs=[first]),
        gs.Node("Mul", inputs=[first, zero], outputs=[zeros]),
        gs.Node("Concat", inputs=[tensor, zeros], outputs=[padded], attrs={"axis": axis}),
    ]
    return padded


def without_mask_prompt(model: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder with ``mask_input`` and ``has_mask_input`` replaced by constants meaning "no mask prompt".

    The search never gives a mask prompt, yet the decoder's mask branch (SAM's ``mask_downscaling``
    convolutions, multiplied by ``has_mask_input`` = 0) ran on zeros at every call; as constants, ONNX
    Runtime's constant folding computes the branch once when the session loads. Same values; the model's
    other inputs are unchanged.
    """
    graph = load_graph(model)
    for name in ("mask_input", "has_mask_input"):
        tensor = graph.tensors().get(name)
        if tensor is None or tensor not in graph.inputs:
            raise SamReuseError(f"the decoder has no input named '{name}'")
        shape = [1 if not isinstance(dim, int) else dim for dim in tensor.shape]  # the batch axis: one prompt
        constant = gs.Constant(f"{name}/no_mask_prompt", np.zeros(shape, dtype=np.float32))
        for node in list(tensor.outputs):
            node.inputs = [constant if value is tensor else value for value in node.inputs]
        graph.inputs.remove(tensor)
    return finalize(graph)


def expose(model: onnx.ModelProto, tensor_names: list[str]) -> onnx.ModelProto:
    """Model with the named tensors as extra outputs."""
    graph = load_graph(model)
    for name in tensor_names:
        tensor = _tensor(graph, name)
        if tensor not in graph.outputs:
            graph.outputs.append(tensor)
    return finalize(graph)


def _downstream_nodes(tensor: gs.Variable) -> list[gs.Node]:
    found: dict[int, gs.Node] = {}
    frontier = list(tensor.outputs)
    while frontier:
        node = frontier.pop()
        if id(node) in found:
            continue
        found[id(node)] = node
        for out in node.outputs:
            frontier.extend(out.outputs)
    return list(found.values())


def cut(model: onnx.ModelProto, tensor_name: str) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """(prefix, suffix, frontier tensor names) with ``suffix(*prefix(x)) == model(x)``."""
    graph = load_graph(model)
    site = _tensor(graph, tensor_name)
    suffix_nodes = _downstream_nodes(site)
    inside = {id(n) for n in suffix_nodes}
    frontier: list[gs.Variable] = [site]
    for node in suffix_nodes:
        for tensor in node.inputs:
            if constant_value(tensor) is not None or tensor in frontier:
                continue  # constants stay in the suffix with their Constant/Identity nodes
            if not tensor.inputs or id(tensor.inputs[0]) not in inside:
                if tensor.name:  # empty name: an omitted optional input
                    frontier.append(tensor)
    for output in graph.outputs:  # outputs the site does not reach (SAM 2's high-res features) pass through
        if output not in frontier and (not output.inputs or id(output.inputs[0]) not in inside):
            frontier.append(output)
    names = [t.name for t in frontier]

    prefix_graph = graph.copy()
    prefix_tensors = prefix_graph.tensors()
    prefix_graph.outputs = [prefix_tensors[n] for n in names]

    suffix_graph = graph.copy()
    suffix_tensors = suffix_graph.tensors()
    boundary = [suffix_tensors[n] for n in names]
    for tensor in boundary:
        tensor.inputs.clear()
    suffix_graph.inputs = boundary
    return finalize(prefix_graph), finalize(suffix_graph), names
