"""Small helpers over onnx-graphsurgeon graphs shared by every pass."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ELEMENTWISE_UNARY = {"Erf", "Relu", "Sigmoid", "Tanh", "Identity", "Neg", "Abs", "Exp", "Sqrt", "Gelu"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}


def load_graph(model: str | Path | onnx.ModelProto) -> gs.Graph:
    """The graph with every tensor's shape inferred: sites, rewrites and precision passes read shapes off it."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return gs.import_onnx(onnx.shape_inference.infer_shapes(proto))


def fingerprint(model: str | Path | onnx.ModelProto) -> str:
    """sha256 of the serialised graph: identifies the exact model a reuse map was made for."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor, else None.

    Constants are initializers, ``Constant`` node outputs, and ``Identity`` of
    either (the TorchScript exporter deduplicates equal initializers that way).
    """
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            return node.attrs["value"].values
        if node.op == "Identity":
            return constant_value(node.inputs[0])
    return None


def add_node(graph: gs.Graph, op: str, inputs: list, attrs: dict | None = None, dtype=np.float32,
             prefix: str = "added", out: str = "") -> gs.Variable:
    """Append one ``op`` node to ``graph`` and return its output (named ``out``, else unique under ``prefix``)."""
    result = gs.Variable(out or f"{prefix}/{op}_{len(graph.nodes)}", dtype=dtype)
    graph.nodes.append(gs.Node(op, name=result.name, inputs=inputs, outputs=[result], attrs=attrs or {}))
    return result


def with_properties(source: onnx.ModelProto, rewritten: onnx.ModelProto, **added: str) -> onnx.ModelProto:
    """``rewritten`` carrying ``source``'s metadata (e.g. the export's convention) plus ``added``."""
    onnx.helper.set_model_props(rewritten, {**{p.key: p.value for p in source.metadata_props}, **added})
    return rewritten


def finalize(graph: gs.Graph) -> onnx.ModelProto:
    """Cleanup, toposort, shape inference and ``onnx.checker`` after a rewrite."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    onnx.checker.check_model(model)
    return model

