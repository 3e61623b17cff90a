"""Small ONNX graphs with the structures of SAM's channel sites, and numpy references."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    return (x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))).astype(np.float32)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def mlp_graph(dim: int = 6, hidden: int = 10, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """x[B,N,dim] -> fc1 (MatMul + bias, as the TorchScript exporter writes it) -> erf-GELU -> fc2 -> y.

    Site ``hidden`` (axis -1) has fold and prune; ``y`` is a graph output.
    """
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((dim, hidden)), "b1": rng.standard_normal(hidden),
         "w2": rng.standard_normal((hidden, dim)), "b2": rng.standard_normal(dim)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["fc1"], name="fc1/MatMul"),
        helper.make_node("Add", ["b1", "fc1"], ["fc1b"], name="fc1/Add"),
        helper.make_node("Div", ["fc1b", "sqrt2"], ["d"], name="act/Div"),
        helper.make_node("Erf", ["d"], ["e"], name="act/Erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="act/Add"),
        helper.make_node("Mul", ["fc1b", "e1"], ["m"], name="act/Mul"),
        helper.make_node("Mul", ["m", "half"], ["hidden"], name="act/Mul_1"),
        helper.make_node("MatMul", ["hidden", "w2"], ["fc2"], name="fc2/MatMul"),
        helper.make_node("Add", ["b2", "fc2"], ["y"], name="fc2/Add"),
    ]
    inits = [_init(k, v) for k, v in w.items()] + [
        _init("sqrt2", np.array(math.sqrt(2.0))), _init("one", np.array(1.0)), _init("half", np.array(0.5))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), w


def mlp_reference(x: np.ndarray, w: dict, index: np.ndarray) -> np.ndarray:
    hidden = gelu(x @ w["w1"] + w["b1"])[..., index]
    return hidden @ w["w2"] + w["b2"]


def conv_graph(channels: int = 5, hidden: int = 8, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """x[B,C,H,W] -> Conv(+bias) -> Relu -> per-channel Mul and Add -> site ``h`` -> 1x1 Conv -> y."""
    rng = np.random.default_rng(seed)
    w = {"k1": rng.standard_normal((hidden, channels, 3, 3)), "c1": rng.standard_normal(hidden),
         "scale": rng.standard_normal((hidden, 1, 1)), "shift": rng.standard_normal((1, hidden, 1, 1)),
         "k2": rng.standard_normal((channels, hidden, 1, 1)), "c2": rng.standard_normal(channels)}
    nodes = [
        helper.make_node("Conv", ["x", "k1", "c1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "scale"], ["s"], name="scale"),
        helper.make_node("Add", ["shift", "s"], ["h"], name="shift"),
        helper.make_node("Conv", ["h", "k2", "c2"], ["y"], name="conv2"),
    ]
    inits = [_init(k, v) for k, v in w.items()]
    graph = helper.make_graph(nodes, "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", channels, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", channels, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), w


def conv_reference(x: np.ndarray, w: dict, index: np.ndarray) -> np.ndarray:
    def conv(inp, kernel, bias, pad):
        inp = np.pad(inp, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        kh = kernel.shape[2]
        out_h, out_w = inp.shape[2] - kh + 1, inp.shape[3] - kh + 1
        out = np.zeros((inp.shape[0], kernel.shape[0], out_h, out_w))
        for i in range(kh):
            for j in range(kh):
                out += np.einsum("bchw,oc->bohw", inp[:, :, i:i + out_h, j:j + out_w], kernel[:, :, i, j])
        return out + bias[None, :, None, None]

    h = np.maximum(conv(x, w["k1"], w["c1"], 1), 0) * w["scale"][None] + w["shift"]
    return conv(h[:, index], w["k2"], w["c2"], 0).astype(np.float32)


def layernorm_graph(dim: int = 6) -> onnx.ModelProto:
    """MatMul -> LayerNormalization -> site: fold must refuse, naming the LayerNormalization."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
             helper.make_node("LayerNormalization", ["m", "g", "b"], ["h"], name="norm", axis=-1),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="out")]
    inits = [_init("w", rng.standard_normal((dim, dim))), _init("g", np.ones(dim)), _init("b", np.zeros(dim)),
             _init("w2", rng.standard_normal((dim, dim)))]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
