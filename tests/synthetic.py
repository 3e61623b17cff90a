"""A synthetic SAM-shaped task with one planted helpful pair.

Images are a red disc (the object, also the mask) on a green background.
The encoder average-pools the normalised image to 64x64 and mixes colours
into ``CHANNELS`` channels: channel ``HELPER`` is red minus green (positive
on the object), channel ``TARGET`` is green minus red (positive on the
background) and every other channel is the constant -1. The decoder's mask
logits are channel ``TARGET`` upsampled to 256x256, so the unmodified model
segments the background (IoU 0) and ``TARGET <- HELPER`` segments the object
(IoU close to 1). No other map changes the mask except replacing ``TARGET``
with a constant channel, which gives an empty mask (IoU 0). The unique best
map is therefore ``{TARGET <- HELPER}``.

``mlp_encoder_model`` plants the same task one level deeper, at the hidden
activation of an MLP (MatMul, bias, erf-GELU, MatMul), as SAM's encoders
have: hidden channel ``HIDDEN_TARGET`` becomes embedding channel ``TARGET``
and ``HIDDEN_HELPER`` becomes ``HELPER``, so the unique best map at site
``mlp.0`` is ``{HIDDEN_TARGET <- HIDDEN_HELPER}``.

``slow`` adds a chain of matrix products to the decoder so that a search
takes long enough to be interrupted mid-way in tests.

``write_sam2_models`` writes the same task as a SAM 2 export: the encoder also
writes the two high-resolution feature maps (green minus red at 256x256 and
its 128x128 pooling, 32 and 64 channels), and the decoder's logits are
0.8 x channel ``TARGET`` + 0.2 x that 256x256 map, so the features take part in
every mask (fed from another image, the mask moves) while the planted pair
stays the unique best map (0.8 (red - green) + 0.2 (green - red) is positive
on the object).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from sam_reuse.base.contract import CONVENTION_PROPERTY

CHANNELS = 8
TARGET, HELPER = 2, 5
OBJECT_TOKEN = 1  # tokens_decoder_model's mask token that segments the object
SIZE = 1024  # encoder input side
IMAGE_SIDE = 256  # images are upscaled to SIZE by SAM's preprocessing; masks are scored at this size


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "synthetic", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def encoder_model() -> onnx.ModelProto:
    weight = np.zeros((CHANNELS, 3, 1, 1), dtype=np.float32)
    bias = np.full((CHANNELS,), -1.0, dtype=np.float32)
    weight[HELPER, :2, 0, 0] = [1.0, -1.0]
    weight[TARGET, :2, 0, 0] = [-1.0, 1.0]
    bias[[HELPER, TARGET]] = 0.0
    nodes = [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
             helper.make_node("Conv", ["pooled", "w", "b"], ["image_embeddings"])]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, SIZE, SIZE])],
                  [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, ["B", CHANNELS, 64, 64])],
                  [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])


HIDDEN_TARGET, HIDDEN_HELPER = 6, 1
# embedding channel j is hidden channel EMBEDDING_FROM_HIDDEN[j] (a permutation, so no channel is special)
EMBEDDING_FROM_HIDDEN = [0, 3, HIDDEN_TARGET, 2, 4, HIDDEN_HELPER, 7, 5]


def _erf_gelu(x: str, out: str) -> list[onnx.NodeProto]:
    """x * 0.5 * (1 + erf(x / sqrt 2)), the node pattern torch exports for nn.GELU."""
    return [helper.make_node("Div", [x, "sqrt2"], [f"{out}/div"]),
            helper.make_node("Erf", [f"{out}/div"], [f"{out}/erf"]),
            helper.make_node("Add", [f"{out}/erf", "one"], [f"{out}/add"]),
            helper.make_node("Mul", [x, f"{out}/add"], [f"{out}/mul"]),
            helper.make_node("Mul", [f"{out}/mul", "half"], [out])]


def mlp_encoder_model() -> onnx.ModelProto:
    fc1 = np.zeros((3, CHANNELS), dtype=np.float32)
    fc1_bias = np.full((CHANNELS,), -1.0, dtype=np.float32)
    fc1[:2, HIDDEN_HELPER] = [1.0, -1.0]
    fc1[:2, HIDDEN_TARGET] = [-1.0, 1.0]
    fc1_bias[[HIDDEN_HELPER, HIDDEN_TARGET]] = 0.0
    fc2 = np.zeros((CHANNELS, CHANNELS), dtype=np.float32)
    fc2[EMBEDDING_FROM_HIDDEN, np.arange(CHANNELS)] = 1.0
    nodes = [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
             helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["tokens", "fc1"], ["fc1_out"]),
             helper.make_node("Add", ["fc1_out", "fc1_bias"], ["fc1_biased"]),
             *_erf_gelu("fc1_biased", "hidden"),
             helper.make_node("MatMul", ["hidden", "fc2"], ["fc2_out"]),
             helper.make_node("Transpose", ["fc2_out"], ["channels_first"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["channels_first", "grid_shape"], ["image_embeddings"])]
    constants = {"flat_shape": np.array([0, 3, 64 * 64], dtype=np.int64),
                 "grid_shape": np.array([0, CHANNELS, 64, 64], dtype=np.int64),
                 "fc1": fc1, "fc1_bias": fc1_bias, "fc2": fc2, "sqrt2": np.array(np.sqrt(2.0), dtype=np.float32),
                 "one": np.array(1.0, dtype=np.float32), "half": np.array(0.5, dtype=np.float32)}
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, SIZE, SIZE])],
                  [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, ["B", CHANNELS, 64, 64])],
                  [numpy_helper.from_array(v, k) for k, v in constants.items()])


def decoder_model(slow: int = 0) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["image_embeddings", "channel"], ["picked"], axis=1),
             helper.make_node("Resize", ["picked", "", "scales"], ["low_res_masks"], mode="linear"),
             helper.make_node("ReduceMean", ["low_res_masks"], ["score"], axes=[2, 3], keepdims=0)]
    tail = "score"
    for i in range(slow):  # (B,1,256,256) @ itself: work that leaves the outputs unchanged
        nodes += [helper.make_node("MatMul", ["low_res_masks", "low_res_masks"], [f"square{i}"]),
                  helper.make_node("ReduceMean", [f"square{i}"], [f"waste{i}"], axes=[2, 3], keepdims=0),
                  helper.make_node("Mul", [f"waste{i}", "zero"], [f"nothing{i}"]),
                  helper.make_node("Add", [tail, f"nothing{i}"], [f"score{i}"])]
        tail = f"score{i}"
    nodes.append(helper.make_node("Identity", [tail], ["iou_predictions"]))
    inputs = [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, ["B", CHANNELS, 64, 64]),
              helper.make_tensor_value_info("point_coords", TensorProto.FLOAT, ["B", "N", 2]),
              helper.make_tensor_value_info("point_labels", TensorProto.FLOAT, ["B", "N"]),
              helper.make_tensor_value_info("mask_input", TensorProto.FLOAT, ["B", 1, 256, 256]),
              helper.make_tensor_value_info("has_mask_input", TensorProto.FLOAT, ["B"])]
    outputs = [helper.make_tensor_value_info("low_res_masks", TensorProto.FLOAT, ["B", 1, 256, 256]),
               helper.make_tensor_value_info("iou_predictions", TensorProto.FLOAT, ["B", 1])]
    return _model(nodes, inputs, outputs, [numpy_helper.from_array(np.array([TARGET], dtype=np.int64), "channel"),
                                           numpy_helper.from_array(np.array([1, 1, 4, 4], dtype=np.float32), "scales"),
                                           numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")])


def tokens_decoder_model() -> onnx.ModelProto:
    """The task's decoder with SAM's four mask tokens, returning token 0 the way exported decoders do (a Slice of
    the tokens on axis 1): token 0 is channel ``TARGET`` (the background, IoU 0), token ``OBJECT_TOKEN`` channel
    ``HELPER`` (the object), the others ``TARGET`` again. Each token's IoU prediction is its mean logit."""
    nodes = [helper.make_node("Gather", ["image_embeddings", "token_channels"], ["tokens"], axis=1),
             helper.make_node("Resize", ["tokens", "", "scales"], ["token_masks"], mode="linear"),
             helper.make_node("Slice", ["token_masks", "first", "second", "token_axis"], ["low_res_masks"]),
             helper.make_node("ReduceMean", ["token_masks"], ["token_scores"], axes=[2, 3], keepdims=0),
             helper.make_node("Slice", ["token_scores", "first", "second", "token_axis"], ["iou_predictions"])]
    channels = [TARGET] * 4
    channels[OBJECT_TOKEN] = HELPER
    model = decoder_model()
    graph = helper.make_graph(nodes, "synthetic", list(model.graph.input), list(model.graph.output), [
        numpy_helper.from_array(np.array(channels, dtype=np.int64), "token_channels"),
        numpy_helper.from_array(np.array([1, 1, 4, 4], dtype=np.float32), "scales"),
        *(numpy_helper.from_array(np.array([v], dtype=np.int64), name)
          for name, v in (("first", 0), ("second", 1), ("token_axis", 1)))])
    return _model(list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))


def _as_sam2(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.helper.set_model_props(model, {CONVENTION_PROPERTY: "sam2"})
    return model


def sam2_encoder_model() -> onnx.ModelProto:
    model = encoder_model()
    graph = model.graph
    weight = np.zeros((32, 3, 1, 1), dtype=np.float32)
    weight[:, :2, 0, 0] = [-1.0, 1.0]  # every channel: green minus red
    graph.initializer.extend([numpy_helper.from_array(weight, "hr_w")])
    graph.node.extend([
        helper.make_node("AveragePool", ["image"], ["hr_pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["hr_pooled", "hr_w"], ["high_res_feats_0"]),
        helper.make_node("AveragePool", ["high_res_feats_0"], ["hr_half"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["hr_half", "hr_half"], ["high_res_feats_1"], axis=1)])
    graph.output.extend([
        helper.make_tensor_value_info("high_res_feats_0", TensorProto.FLOAT, ["B", 32, 256, 256]),
        helper.make_tensor_value_info("high_res_feats_1", TensorProto.FLOAT, ["B", 64, 128, 128])])
    onnx.checker.check_model(model)
    return _as_sam2(model)


def sam2_decoder_model() -> onnx.ModelProto:
    model = decoder_model()
    graph = model.graph
    for node in graph.node:  # the embedding's upsampled channel becomes one term of the logits
        node.output[:] = ["from_embedding" if o == "low_res_masks" else o for o in node.output]
        node.input[:] = ["from_embedding" if i == "low_res_masks" else i for i in node.input]
    graph.initializer.extend([numpy_helper.from_array(np.array(0.8, dtype=np.float32), "w_embedding"),
                              numpy_helper.from_array(np.array(0.2, dtype=np.float32), "w_high_res"),
                              numpy_helper.from_array(np.array([0], dtype=np.int64), "first")])
    graph.node.extend([
        helper.make_node("Gather", ["high_res_feats_0", "first"], ["high_res_map"], axis=1),
        helper.make_node("Mul", ["from_embedding", "w_embedding"], ["embedding_term"]),
        helper.make_node("Mul", ["high_res_map", "w_high_res"], ["high_res_term"]),
        helper.make_node("Add", ["embedding_term", "high_res_term"], ["low_res_masks"])])
    graph.input.insert(1, helper.make_tensor_value_info("high_res_feats_0", TensorProto.FLOAT, ["B", 32, 256, 256]))
    graph.input.insert(2, helper.make_tensor_value_info("high_res_feats_1", TensorProto.FLOAT, ["B", 64, 128, 128]))
    # iou_predictions also reads the 128x128 map, so that both features are inputs that matter
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] == "iou_predictions":
            node.input[0] = "score_with_coarse"
    graph.initializer.extend([numpy_helper.from_array(np.array(0.01, dtype=np.float32), "w_coarse")])
    graph.node.extend([
        helper.make_node("ReduceMean", ["high_res_feats_1"], ["coarse_channels"], axes=[2, 3], keepdims=0),
        helper.make_node("ReduceMean", ["coarse_channels"], ["coarse_mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["coarse_mean", "w_coarse"], ["coarse_term"]),
        helper.make_node("Add", ["score", "coarse_term"], ["score_with_coarse"])])
    sorted_nodes = helper.make_graph(_topological(graph.node), graph.name, graph.input, graph.output,
                                     graph.initializer)
    result = helper.make_model(sorted_nodes, opset_imports=model.opset_import)
    result.ir_version = model.ir_version
    onnx.checker.check_model(result)
    return _as_sam2(result)


def _topological(nodes) -> list[onnx.NodeProto]:
    """``nodes`` ordered so that each comes after the producers of its inputs."""
    produced = {o for n in nodes for o in n.output}
    ready, ordered, pending = set(), [], list(nodes)
    while pending:
        for node in pending:
            if all(i in ready or i not in produced for i in node.input):
                ordered.append(node)
                ready.update(node.output)
                pending.remove(node)
                break
    return ordered


def write_sam2_models(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(sam2_encoder_model(), str(folder / "encoder.onnx"))
    onnx.save(sam2_decoder_model(), str(folder / "decoder.onnx"))
    return folder / "encoder.onnx", folder / "decoder.onnx"


def write_models(folder: Path, slow: int = 0, tokens: bool = False) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(encoder_model(), str(folder / "encoder.onnx"))
    onnx.save(tokens_decoder_model() if tokens else decoder_model(slow), str(folder / "decoder.onnx"))
    return folder / "encoder.onnx", folder / "decoder.onnx"


def write_dataset(folder: Path, count: int, seed: int = 0, background_from: int | None = None) -> Path:
    """``count`` disc images with masks and a manifest (centre point prompts).

    From record ``background_from`` on, the mask is the background instead of the disc: a domain shift under
    which the planted pair, which helps every disc record, is harmful and the original model is right.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:IMAGE_SIDE, :IMAGE_SIDE]
    lines = []
    for i in range(count):
        cx, cy = rng.integers(75, IMAGE_SIDE - 75, size=2)
        radius = int(rng.integers(30, 60))
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        image = np.zeros((IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        image[..., 1] = 200
        image[disc] = (220, 30, 40)
        Image.fromarray(image).save(folder / f"img{i:02d}.png")
        mask = ~disc if background_from is not None and i >= background_from else disc
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"img{i:02d}_mask.png")
        lines.append(json.dumps({"image": f"img{i:02d}.png", "mask": f"img{i:02d}_mask.png",
                                 "points": [[int(cx), int(cy)]], "labels": [1]}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder
