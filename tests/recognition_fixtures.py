"""Random-weight models in the real on-disk formats, built at test time (no downloads).

- an iResNet saved as an insightface-style ``backbone.pth`` state dict;
- the same exported to ONNX with insightface's input signature (input ``input.1``, 1x3x112x112,
  dynamic batch), optionally with MXNet-style Sub/Mul normalisation nodes in front, or a fixed batch;
- an SCRFD stand-in: an ONNX graph with SCRFD's 9 outputs (scores / box distances / landmark offsets
  for strides 8, 16, 32, two anchors per location) whose scores respond to coloured squares
  ("planted faces"): stride 8 to red, 16 to green, 32 to blue. Box distances and landmark offsets
  are constants, so a planted face's decoded box and landmarks are known in closed form. With
  ``strides=SCRFD_STRIDES_5`` it has the five-level layout (15 outputs, one anchor per location);
  strides 64 and 128 fire on squares dark in red and in green.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from hyperface.recognition.alignment import ARCFACE_TEMPLATE
from hyperface.recognition.iresnet import iresnet


def make_tiny_iresnet(seed: int = 0) -> torch.nn.Module:
    """A ``r_tiny`` iResNet with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = iresnet("r_tiny")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
    return model.eval()


def save_backbone(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    *,
    normalise_inside: bool = False,
    fixed_batch: int | None = None,
    input_name: str = "input.1",
) -> Path:
    """Export like insightface's torch2onnx: opset 11, one image input, one embedding output."""
    buffer = io.BytesIO()
    axes = None if fixed_batch else {input_name: {0: "None"}, "embedding": {0: "None"}}
    dummy = torch.zeros(fixed_batch or 1, 3, 112, 112)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, dummy, buffer, input_names=[input_name], output_names=["embedding"],
            dynamic_axes=axes, opset_version=11, dynamo=False,
        )
    graph_model = onnx.load_from_string(buffer.getvalue())
    if normalise_inside:
        graph_model = _prepend_mxnet_normalisation(graph_model, input_name)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
    return path


def _prepend_mxnet_normalisation(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """Make the graph take raw 0..255 pixels: ``data -> _minusscalar0 (-127.5) -> _mulscalar0 (1/128)``
    -> the old input, as in insightface's MXNet-converted models. The old graph expected (x-127.5)/127.5,
    so the multiplier is 1/127.5 to keep identical outputs."""
    graph = model.graph
    old_input = graph.input[0]
    inner = input_name + "_normalised"
    for node in graph.node:
        node.input[:] = [inner if name == input_name else name for name in node.input]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(127.5, dtype=np.float32), "_minusscalar0_c"),
            numpy_helper.from_array(np.array(1.0 / 127.5, dtype=np.float32), "_mulscalar0_c"),
        ]
    )
    sub = helper.make_node("Sub", ["data", "_minusscalar0_c"], ["_minusscalar0"], name="_minusscalar0")
    mul = helper.make_node("Mul", ["_minusscalar0", "_mulscalar0_c"], [inner], name="_mulscalar0")
    nodes = [sub, mul] + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    new_input = helper.make_tensor_value_info("data", TensorProto.FLOAT, None)
    new_input.type.CopyFrom(old_input.type)
    graph.input.remove(old_input)
    graph.input.insert(0, new_input)
    return model


# ----------------------------------------------------------------------------------------------
# SCRFD stand-in

SCRFD_STRIDES = (8, 16, 32)
SCRFD_STRIDES_5 = (8, 16, 32, 64, 128)
MARKER_CHANNEL = {8: 0, 16: 1, 32: 2, 64: 0, 128: 1}  # RGB channel whose square fires each stride
MARKER_SIGN = {8: 1.0, 16: 1.0, 32: 1.0, 64: -1.0, 128: -1.0}  # +1: bright square fires, -1: dark one
MARKER_COLOUR = {8: (255, 0, 0), 16: (0, 255, 0), 32: (0, 0, 255), 64: (0, 128, 128), 128: (128, 0, 128)}
BOX_DISTANCES = np.array([1.5, 1.5, 2.5, 2.5], dtype=np.float32)  # left, top, right, bottom, in strides
# Landmarks: the ArcFace template's layout inside the 4-stride box, as offsets from the anchor in strides.
KPS_OFFSETS = (-1.5 + 4.0 * ARCFACE_TEMPLATE / 112.0).astype(np.float32)  # (5, 2)


def make_scrfd_onnx(
    path: Path, input_size: int = 160, output_order: list[int] | None = None, strides: tuple[int, ...] = SCRFD_STRIDES
) -> Path:
    """An ONNX graph with SCRFD's input convention and outputs, reacting to planted coloured squares.

    Three strides: 9 outputs, two anchors per location (det_10g); five: 15 outputs, one anchor.
    """
    nodes, inits, outputs = [], [], []
    scores, boxes, kps = [], [], []
    per_cell = 2 if len(strides) == 3 else 1
    inits.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape_col"))
    for stride in strides:
        cells = (input_size // stride) ** 2
        anchors = cells * per_cell
        t = f"s{stride}"
        sign = MARKER_SIGN[stride]
        inits += [
            numpy_helper.from_array(np.array([MARKER_CHANNEL[stride]], dtype=np.int64), f"{t}_channel"),
            numpy_helper.from_array(np.array(0.5 * sign, dtype=np.float32), f"{t}_half"),
            numpy_helper.from_array(np.array(20.0 * sign, dtype=np.float32), f"{t}_gain"),
            numpy_helper.from_array(np.array(0.9, dtype=np.float32), f"{t}_second"),
            numpy_helper.from_array(np.tile(BOX_DISTANCES, (anchors, 1)), f"{t}_box_const"),
            numpy_helper.from_array(np.tile(KPS_OFFSETS.reshape(1, 10), (anchors, 1)), f"{t}_kps_const"),
        ]
        nodes += [
            helper.make_node("Gather", ["input.1", f"{t}_channel"], [f"{t}_plane"], axis=1),
            helper.make_node("AveragePool", [f"{t}_plane"], [f"{t}_pool"], kernel_shape=[stride, stride], strides=[stride, stride]),
            helper.make_node("Sub", [f"{t}_pool", f"{t}_half"], [f"{t}_centred"]),
            helper.make_node("Mul", [f"{t}_centred", f"{t}_gain"], [f"{t}_logit"]),
            helper.make_node("Sigmoid", [f"{t}_logit"], [f"{t}_prob"]),
            helper.make_node("Reshape", [f"{t}_prob", "shape_col"], [f"{t}_a0" if per_cell == 2 else f"score_{stride}"]),
        ]
        if per_cell == 2:  # the second anchor of each location scores a little lower
            nodes += [
                helper.make_node("Mul", [f"{t}_a0", f"{t}_second"], [f"{t}_a1"]),
                helper.make_node("Concat", [f"{t}_a0", f"{t}_a1"], [f"{t}_pair"], axis=1),
                helper.make_node("Reshape", [f"{t}_pair", "shape_col"], [f"score_{stride}"]),
            ]
        nodes += [
            helper.make_node("Identity", [f"{t}_box_const"], [f"bbox_{stride}"]),
            helper.make_node("Identity", [f"{t}_kps_const"], [f"kps_{stride}"]),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{stride}", TensorProto.FLOAT, [anchors, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{stride}", TensorProto.FLOAT, [anchors, 4]))
        kps.append(helper.make_tensor_value_info(f"kps_{stride}", TensorProto.FLOAT, [anchors, 10]))
    outputs = scores + boxes + kps  # det_10g's order
    if output_order is not None:
        outputs = [outputs[i] for i in output_order]
    graph = helper.make_graph(
        nodes, "scrfd_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, input_size, input_size])],
        outputs, inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def plant_face(image: np.ndarray, stride: int, row: int, col: int, scale: float = 1.0) -> None:
    """Paint the marker that the stand-in detects at grid cell (row, col) of ``stride``.

    ``scale`` = detector input pixels per image pixel (the letterbox factor), so the square covers
    exactly that cell after the detector resizes the image.
    """
    side = int(round(stride / scale))
    y0, x0 = int(round(row * stride / scale)), int(round(col * stride / scale))
    image[y0 : y0 + side, x0 : x0 + side] = MARKER_COLOUR[stride]


def expected_face(stride: int, row: int, col: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form (box, landmarks) that SCRFD decoding must return for a planted face."""
    anchor = np.array([col * stride, row * stride], dtype=np.float64)
    box = np.concatenate([anchor - BOX_DISTANCES[:2] * stride, anchor + BOX_DISTANCES[2:] * stride])
    landmarks = anchor + KPS_OFFSETS * stride
    return box / scale, landmarks / scale


def grey_image(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 128, dtype=np.uint8)


def random_faces(n: int, seed: int = 0, size: int = 112) -> np.ndarray:
    """Smooth random RGB images (uint8 NHWC): varied enough for distinct embeddings."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float32)
    import cv2

    return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in coarse]).clip(0, 255).astype(np.uint8)
