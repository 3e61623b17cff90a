"""Which of SAM's mask tokens a decoder returns: a rewrite of two Slices, no weight trained.

SAM's mask decoder makes four masks per prompt, one per mask token: token 0
is the single mask (``SamPredictor.predict(multimask_output=False)``),
tokens 1-3 the multimask output, from a part of the object to all of it.
Which one serves a domain differs (on the shared sets token 1 for polyps,
token 3 for COCO's objects, token 0 for skin lesions: benchmarks/README.md,
"Which mask token"). The exported decoders compute every token's
hypernetwork output and IoU prediction and then slice out the tokens they
return (``exporter.wrappers.SingleMaskDecoder``); ``with_mask_token`` moves
both slices to another token. Nothing else changes, so the rewritten
decoder returns SAM's own mask and IoU prediction of that token, at the
original's cost and with the original's inputs and outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sam_reuse.base.contract import MASK_TOKEN_PROPERTY
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import DECODER_KIND, atomic_path, check_output_file, refuse_overwriting
from sam_reuse.base.runtime import load_model
from sam_reuse.graphops.graph import add_node, constant_value, finalize, load_graph, with_properties

MASK_TOKENS = 4
TOKEN_OUTPUTS = ("low_res_masks", "iou_predictions")  # each made from one token Slice


def _token_slice(graph: gs.Graph, output: str, where: str) -> gs.Node:
    """The one Slice before graph output ``output`` that takes a single token of MASK_TOKENS on axis 1."""
    tensors = graph.tensors()
    if output not in tensors:
        raise SamReuseError(f"{where}: no output '{output}' (not a SAM decoder exported by sam-reuse)")
    found, seen, frontier = [], set(), [tensors[output]]
    while frontier:
        tensor = frontier.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        for node in tensor.inputs:
            if node.op == "Slice" and _takes_one_token(node):
                found.append(node)
            else:
                frontier.extend(node.inputs)
    if len(found) != 1:
        raise SamReuseError(f"{where}: {len(found) or 'no'} Slice(s) choosing one of {MASK_TOKENS} mask tokens "
                            f"before '{output}' (decoders exported by sam-reuse before 2026-12-08 compute token 0 "
                            "only: export again)")
    return found[0]


def _takes_one_token(node: gs.Node) -> bool:
    data, starts, ends, *rest = node.inputs
    axes = constant_value(rest[0]) if rest else None
    steps = constant_value(rest[1]) if len(rest) > 1 else None
    values = [constant_value(starts), constant_value(ends)]
    shape = data.shape
    return (axes is not None and list(np.ravel(axes)) == [1] and all(v is not None and v.size == 1 for v in values)
            and (steps is None or list(np.ravel(steps)) == [1]) and shape is not None and len(shape) >= 2
            and shape[1] == MASK_TOKENS and int(values[1].item()) - int(values[0].item()) == 1)


def token_slices(graph: gs.Graph, where: str) -> list[gs.Node]:
    """The Slices choosing the returned token, one per TOKEN_OUTPUTS; refused, naming the output, if not there."""
    return [_token_slice(graph, output, where) for output in TOKEN_OUTPUTS]


def mask_token_of(model: str | Path | onnx.ModelProto, where: str = "decoder") -> int:
    """The mask token a decoder returns (0: SAM's single mask)."""
    tokens = {int(constant_value(node.inputs[1]).item()) for node in token_slices(load_graph(model), where)}
    if len(tokens) != 1:
        raise SamReuseError(f"{where}: its masks and IoU predictions come from different mask tokens {sorted(tokens)}")
    return tokens.pop()


def with_mask_token(model: onnx.ModelProto, token: int, where: str = "decoder") -> onnx.ModelProto:
    """``model`` returning mask token ``token``'s mask and IoU prediction; recorded in the metadata under
    MASK_TOKEN_PROPERTY."""
    if not 0 <= token < MASK_TOKENS:
        raise SamReuseError(f"mask token {token}: SAM's decoder has tokens 0 to {MASK_TOKENS - 1}")
    return with_properties(model, _sliced(model, token, token + 1, where), **{MASK_TOKEN_PROPERTY: str(token)})


def with_every_token(model: onnx.ModelProto, where: str = "decoder") -> onnx.ModelProto:
    """``model`` returning every mask token's mask and IoU prediction (B x MASK_TOKENS x ...), token k at k: one
    decoder run scores them all (``calibrate.token_choice``)."""
    return _sliced(model, 0, MASK_TOKENS, where)


SINGLE_CLICK = "click"  # the single-click rule, where a token number would go (mask-token, app-format)


def with_single_click_rule(model: onnx.ModelProto, where: str = "decoder") -> onnx.ModelProto:
    """``model`` choosing its mask by SAM's single-click rule (``SamOnnxModel``'s ``return_single_mask``, what apps'
    users expect of a single-mask decoder): for a prompt of one click and no box, the multimask mask (tokens 1-3)
    with the highest predicted IoU; otherwise token 0. Recorded as mask token ``click``."""
    graph = load_graph(with_every_token(model, where))
    tensors = graph.tensors()
    masks, iou, labels = tensors["low_res_masks"], tensors["iou_predictions"], tensors["point_labels"]
    masks.name, iou.name = "low_res_masks/every_token", "iou_predictions/every_token"

    def node(op: str, inputs: list, attrs: dict | None = None, dtype=np.float32, out: str = "") -> gs.Variable:
        return add_node(graph, op, inputs, attrs, dtype, prefix="single_click", out=out)

    def const(name: str, values) -> gs.Constant:
        return gs.Constant(f"single_click/{name}", np.asarray(values))

    points_axis = const("points", [1])

    def count(condition: gs.Variable) -> gs.Variable:  # per prompt, how many of its points meet it
        return node("ReduceSum", [node("Cast", [condition], {"to": onnx.TensorProto.FLOAT}), points_axis],
                    {"keepdims": 1})

    clicks = count(node("LessOrEqual", [node("Abs", [node("Sub", [labels, const("half", np.float32(0.5))])]),
                                        const("half_again", np.float32(0.5))], dtype=np.bool_))  # labels 0 and 1
    boxes = count(node("Equal", [labels, const("corner", np.float32(2))], dtype=np.bool_))
    single = node("And", [node("Equal", [clicks, const("one", np.float32(1))], dtype=np.bool_),
                          node("Equal", [boxes, const("none", np.float32(0))], dtype=np.bool_)], dtype=np.bool_)
    bias = node("Where", [single, const("multimask", np.float32([-1000, 0, 0, 0])),
                          const("single", np.float32([1000, 0, 0, 0]))])
    chosen = node("ArgMax", [node("Add", [iou, bias])], {"axis": 1, "keepdims": 1}, np.int64)
    one_hot = node("Cast", [node("Equal", [const("tokens", np.arange(MASK_TOKENS, dtype=np.int64)), chosen],
                                 dtype=np.bool_)], {"to": onnx.TensorProto.FLOAT})
    token_axis = const("token_axis", [1])
    picked_iou = node("ReduceSum", [node("Mul", [iou, one_hot]), token_axis], {"keepdims": 1}, out="iou_predictions")
    weights = node("Unsqueeze", [one_hot, const("pixel_axes", [2, 3])])
    picked_masks = node("ReduceSum", [node("Mul", [masks, weights]), token_axis], {"keepdims": 1},
                        out="low_res_masks")
    graph.outputs = [picked_masks if o is masks else picked_iou if o is iou else o for o in graph.outputs]
    return with_properties(model, finalize(graph), **{MASK_TOKEN_PROPERTY: SINGLE_CLICK})


def _sliced(model: onnx.ModelProto, start: int, stop: int, where: str) -> onnx.ModelProto:
    """Both token Slices set to ``start:stop`` (fresh constants: other nodes may share the old ones)."""
    graph = load_graph(model)
    for node in token_slices(graph, where):
        dtype = constant_value(node.inputs[1]).dtype
        node.inputs[1] = gs.Constant(f"{node.outputs[0].name}/mask_token_start", np.array([start], dtype=dtype))
        node.inputs[2] = gs.Constant(f"{node.outputs[0].name}/mask_token_end", np.array([stop], dtype=dtype))
    for output in graph.outputs:  # the token axis of the outputs follows the slice
        if output.shape is not None and len(output.shape) >= 2:
            output.shape = [output.shape[0], stop - start, *output.shape[2:]]
    return finalize(graph)


def recorded_token(model: onnx.ModelProto) -> str | None:
    """The mask token a rewrite recorded in ``model``'s metadata (a number, or ``click``), None if none."""
    return next((p.value for p in model.metadata_props if p.key == MASK_TOKEN_PROPERTY), None)


def with_mask_token_file(decoder: str | Path, token: int | str, out: str | Path) -> None:
    """``with_mask_token`` from a file to a file, written atomically (the app decoders of ``export --app-decoders``
    switch the same way, so an app gets the token a tune shipped)."""
    refuse_overwriting(out, decoder)
    check_output_file(out, "--out", kind=DECODER_KIND)  # never over an encoder or a record
    model = load_model(decoder, "decoder ONNX", role="decoder")
    model = (with_single_click_rule(model, str(decoder)) if token == SINGLE_CLICK
             else with_mask_token(model, int(token), str(decoder)))
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
