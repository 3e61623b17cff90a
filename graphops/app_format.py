"""The interfaces SAM apps load, wrapped around our encoder and decoder graphs (no weight touched).

Most apps that run SAM from ONNX (samexporter's runtime, AnyLabeling and X-AnyLabeling, C++ ports) follow
SAM's official ONNX decoder (segment-anything's ``SamOnnxModel``): inputs ``image_embeddings``,
``point_coords``, ``point_labels``, ``mask_input``, ``has_mask_input`` and ``orig_im_size`` (float32 H, W),
outputs ``masks`` at the image's size, ``iou_predictions`` and ``low_res_masks``, in that order (AnyLabeling
unpacks three). Some feed the encoder an HxWx3 RGB image already resized so its longest side fits 1024 and
expect the normalisation and padding in the graph (samexporter's ``--use-preprocess`` encoders; AnyLabeling
takes only those).

``official_decoder`` adds ``orig_im_size`` and ``masks`` to our decoder (``decoder.onnx`` or a tune's
``decoder.tuned.onnx``): the low-resolution logits upscaled to 1024, cropped to the resized image and resized
to ``orig_im_size``, bilinear as ``SamOnnxModel.mask_postprocessing`` does, the crop computed from
``orig_im_size`` at run time (the official export freezes it at trace time to its example image's 683 x 1024,
wrong for any other shape). ``preprocessing_encoder`` puts SAM's normalisation and padding in front of our
encoder (tuned or not).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.imaging import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD
from sam_reuse.graphops.graph import add_node, finalize, load_graph, with_properties

ORIG_IM_SIZE = "orig_im_size"
OFFICIAL_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def _const(name: str, values) -> gs.Constant:
    return gs.Constant(f"app/{name}", np.asarray(values))


def _node(graph: gs.Graph, op: str, inputs: list, dtype=np.float32, attrs: dict | None = None) -> gs.Variable:
    return add_node(graph, op, inputs, attrs, dtype, prefix="app")


def _output(graph: gs.Graph, name: str, where: str) -> gs.Variable:
    tensors = graph.tensors()
    if name not in tensors or tensors[name] not in graph.outputs:
        raise SamReuseError(f"{where}: no output '{name}' (not a SAM 1 decoder exported by sam-reuse)")
    return tensors[name]


def official_decoder(decoder: onnx.ModelProto, where: str = "decoder") -> onnx.ModelProto:
    """``decoder`` with SAM's official ONNX interface (``orig_im_size`` in; masks at that size out, first)."""
    graph = load_graph(decoder)
    if ORIG_IM_SIZE in graph.tensors():
        raise SamReuseError(f"{where}: already has an '{ORIG_IM_SIZE}' input")
    low_res = _output(graph, "low_res_masks", where)
    iou = _output(graph, "iou_predictions", where)
    orig = gs.Variable(ORIG_IM_SIZE, dtype=np.float32, shape=[2])
    graph.inputs.append(orig)
    linear = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    leading = _node(graph, "Slice", [_node(graph, "Shape", [low_res], np.int64), _const("zero", [0]),
                                     _const("two", [2])], np.int64)
    square = _node(graph, "Concat", [leading, _const("side", [IMAGE_SIZE, IMAGE_SIZE])], np.int64, {"axis": 0})
    upscaled = _node(graph, "Resize", [low_res, gs.Variable.empty(), gs.Variable.empty(), square], attrs=linear)
    # The image inside the 1024 frame: round(orig * 1024 / max(orig)), as ResizeLongestSide and SAM's crop.
    scale = _node(graph, "Div", [_const("long_side", np.float32(IMAGE_SIZE)),
                                 _node(graph, "ReduceMax", [orig], attrs={"keepdims": 1})])
    resized = _node(graph, "Floor", [_node(graph, "Add", [_node(graph, "Mul", [orig, scale]),
                                                          _const("half", np.float32(0.5))])])
    resized = _node(graph, "Cast", [resized], np.int64, {"to": onnx.TensorProto.INT64})
    cropped = _node(graph, "Slice", [upscaled, _const("origin", [0, 0]), resized, _const("hw_axes", [2, 3])])
    size = _node(graph, "Cast", [orig], np.int64, {"to": onnx.TensorProto.INT64})
    masks = gs.Variable("masks", dtype=np.float32)
    graph.nodes.append(gs.Node("Resize", name="app/masks", attrs=linear, outputs=[masks], inputs=[
        cropped, gs.Variable.empty(), gs.Variable.empty(),
        _node(graph, "Concat", [leading, size], np.int64, {"axis": 0})]))
    graph.outputs = [masks, iou, low_res]
    _drop_padding_beside_a_box(graph, where)
    return with_properties(decoder, finalize(graph))


def _drop_padding_beside_a_box(graph: gs.Graph, where: str) -> None:
    """The apps append the padding point (0, 0, label -1) to every prompt, a box's too, as SAM's ONNX example
    does; SamPredictor pads only prompts without a box, and the padding token changes a box's mask. Drop it
    where the prompt has a box (batch 1, as these apps feed the decoder)."""
    tensors = graph.tensors()
    if "point_coords" not in tensors or "point_labels" not in tensors:
        raise SamReuseError(f"{where}: no 'point_coords'/'point_labels' inputs")
    fed = {}
    for name in ("point_coords", "point_labels"):
        original = tensors[name]
        fed[name] = gs.Variable(name, dtype=np.float32, shape=original.shape)
        original.name = f"{name}/as_sam_predictor"
        graph.inputs[graph.inputs.index(original)] = fed[name]
    labels = _node(graph, "Squeeze", [fed["point_labels"], _const("batch_axis", [0])])
    has_box = _node(graph, "ReduceMax", [_node(graph, "Cast", [_node(graph, "Equal", [
        labels, _const("box_corner", np.float32(2))], np.bool_)], np.float32, {"to": onnx.TensorProto.FLOAT})],
        attrs={"keepdims": 0})
    padding = _node(graph, "Equal", [labels, _const("padding", np.float32(-1))], np.bool_)
    dropped = _node(graph, "And", [padding, _node(graph, "Cast", [has_box], np.bool_, {"to": onnx.TensorProto.BOOL})],
                    np.bool_)
    keep = _node(graph, "Not", [dropped], np.bool_)
    for name, original in (("point_coords", "point_coords/as_sam_predictor"),
                           ("point_labels", "point_labels/as_sam_predictor")):
        graph.nodes.append(gs.Node("Compress", name=f"app/{name}", attrs={"axis": 1},
                                   inputs=[fed[name], keep], outputs=[tensors[name]]))


def preprocessing_encoder(encoder: onnx.ModelProto, where: str = "encoder") -> onnx.ModelProto:
    """``encoder`` fed an HxWx3 float32 RGB image (0-255) whose longest side is already 1024 or less: SAM's
    normalisation, the transpose and the bottom/right padding to 1024 x 1024 happen in the graph."""
    graph = load_graph(encoder)
    if len(graph.inputs) != 1 or graph.inputs[0].shape is None or len(graph.inputs[0].shape) != 4:
        raise SamReuseError(f"{where}: expected one 4-D image input (a SAM 1 encoder exported by sam-reuse)")
    nchw = graph.inputs[0]
    name = nchw.name
    nchw.name = f"{name}/nchw"
    image = gs.Variable(name, dtype=np.float32, shape=["height", "width", 3])
    graph.inputs = [image]
    normalised = _node(graph, "Div", [_node(graph, "Sub", [image, _const("mean", PIXEL_MEAN)]),
                                      _const("std", PIXEL_STD)])
    chw = _node(graph, "Transpose", [normalised], attrs={"perm": [2, 0, 1]})
    batch = _node(graph, "Unsqueeze", [chw, _const("batch_axis", [0])])
    hw = _node(graph, "Slice", [_node(graph, "Shape", [image], np.int64), _const("first", [0]),
                                _const("second_end", [2])], np.int64)
    missing = _node(graph, "Sub", [_const("frame", [IMAGE_SIZE, IMAGE_SIZE]), hw], np.int64)
    pads = _node(graph, "Concat", [_const("before", [0, 0, 0, 0, 0, 0]), missing], np.int64, {"axis": 0})
    graph.nodes.append(gs.Node("Pad", name="app/pad", inputs=[batch, pads], outputs=[nchw]))
    return with_properties(encoder, finalize(graph))
