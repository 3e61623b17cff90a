"""Fuse LayerNorms that the exporter wrote out as elementwise ops into one ``LayerNormalization``.

SAM's ``LayerNorm2d`` (the encoder neck, the decoder's output upscaling)
exports as ReduceMean, Sub, Pow, ReduceMean, Add(eps), Sqrt, Div over the
channel axis. In half precision the squared deviations overflow (about 3e5
in MobileSAM's neck, fp16 max 65504) and fp16 converters cast every op's
output back to fp16, so the chain cannot be kept in fp32 op by op. As one
``LayerNormalization`` (between two Transposes that move the channel axis
last) it can: the op computes its statistics internally and is kept fp32 as
a whole. The result equals the original up to fp32 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from sam_reuse.graphops.graph import constant_value


def _only_reader(tensor: gs.Tensor, op: str) -> gs.Node | None:
    readers = tensor.outputs
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _reduced_axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1:
        value = constant_value(node.inputs[1])
        return None if value is None else [int(a) for a in np.atleast_1d(value)]
    return None


def _chain(power: gs.Node) -> dict[str, gs.Node] | None:
    """The decomposed-LayerNorm nodes around ``power`` (Pow(x - mean(x), 2)), or None if it is not one."""
    deviation_tensor = power.inputs[0]
    if len(deviation_tensor.inputs) != 1 or deviation_tensor.inputs[0].op != "Sub":
        return None
    sub = deviation_tensor.inputs[0]
    x, mean_tensor = sub.inputs
    if len(mean_tensor.inputs) != 1 or mean_tensor.inputs[0].op != "ReduceMean":
        return None
    mean = mean_tensor.inputs[0]
    exponent = constant_value(power.inputs[1])
    if mean.inputs[0] is not x or exponent is None or float(np.asarray(exponent)) != 2.0:
        return None
    variance = _only_reader(power.outputs[0], "ReduceMean")
    add = variance and _only_reader(variance.outputs[0], "Add")
    root = add and _only_reader(add.outputs[0], "Sqrt")
    divide = root and _only_reader(root.outputs[0], "Div")
    if divide is None or divide.inputs[0] is not deviation_tensor:
        return None
    eps = constant_value(add.inputs[1])
    axes = _reduced_axes(mean)
    if eps is None or np.asarray(eps).size != 1 or axes is None or len(axes) != 1 or axes != _reduced_axes(variance):
        return None
    if not mean.attrs.get("keepdims", 1) or not variance.attrs.get("keepdims", 1) or x.shape is None:
        return None
    return {"sub": sub, "mean": mean, "divide": divide, "x": x, "eps": float(np.asarray(eps)), "axis": axes[0]}


def fuse_decomposed_layernorm(graph: gs.Graph) -> int:
    """Replace every decomposed LayerNorm over one axis by Transpose/LayerNormalization/Transpose; returns the count.

    Needs shapes (the channel count); run shape inference before importing the graph.
    """
    fused = 0
    for power in [n for n in graph.nodes if n.op == "Pow"]:
        chain = _chain(power)
        if chain is None:
            continue
        x: gs.Variable = chain["x"]
        rank = len(x.shape)
        axis = chain["axis"] % rank
        channels = x.shape[axis]
        if not isinstance(channels, int):
            continue
        last = [a for a in range(rank) if a != axis] + [axis]
        back = list(np.argsort(last))
        name = chain["divide"].name or f"layernorm_{fused}"
        moved = gs.Variable(f"{name}/channels_last", dtype=x.dtype)
        normalised = gs.Variable(f"{name}/normalised", dtype=x.dtype)
        output = chain["divide"].outputs[0]
        chain["divide"].outputs.clear()
        scale = gs.Constant(f"{name}/scale", np.ones(channels, dtype=np.float32))
        bias = gs.Constant(f"{name}/bias", np.zeros(channels, dtype=np.float32))
        graph.nodes += [
            gs.Node("Transpose", name=f"{name}/to_channels_last", inputs=[x], outputs=[moved], attrs={"perm": last}),
            gs.Node("LayerNormalization", name=f"{name}/layernorm", inputs=[moved, scale, bias], outputs=[normalised],
                    attrs={"axis": -1, "epsilon": chain["eps"]}),
            gs.Node("Transpose", name=f"{name}/to_channels_first", inputs=[normalised], outputs=[output],
                    attrs={"perm": [int(a) for a in back]}),
        ]
        fused += 1
    graph.cleanup().toposort()
    return fused
