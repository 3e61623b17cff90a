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

``slow`` adds a chain of matrix products to the decoder so that a search
takes long enough to be interrupted mid-way in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

CHANNELS = 8
TARGET, HELPER = 2, 5
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


def write_models(folder: Path, slow: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(encoder_model(), str(folder / "encoder.onnx"))
    onnx.save(decoder_model(slow), str(folder / "decoder.onnx"))
    return folder / "encoder.onnx", folder / "decoder.onnx"


def write_dataset(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` disc images with masks and a manifest (centre point prompts)."""
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
        Image.fromarray((disc * 255).astype(np.uint8)).save(folder / f"img{i:02d}_mask.png")
        lines.append(json.dumps({"image": f"img{i:02d}.png", "mask": f"img{i:02d}_mask.png",
                                 "points": [[int(cx), int(cy)]], "labels": [1]}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder
