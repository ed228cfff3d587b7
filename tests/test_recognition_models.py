"""Recognizers: real file formats (backbone.pth, insightface-style ONNX), conventions, bad models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from recognition_fixtures import export_onnx, make_scrfd_onnx, make_tiny_iresnet, random_faces, save_backbone

from hyperface.common.errors import HyperfaceError
from hyperface.recognition import load_recognizer
from hyperface.recognition.recognizers import OnnxRecognizer, TorchRecognizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = make_tiny_iresnet(seed=1)
    return {
        "module": model,
        "pth": save_backbone(model, root / "backbone.pth"),
        "onnx": export_onnx(model, root / "tiny.onnx"),
        "onnx_norm": export_onnx(model, root / "tiny_mxnet.onnx", normalise_inside=True),
        "onnx_b1": export_onnx(model, root / "tiny_b1.onnx", fixed_batch=1),
        "root": root,
    }


@pytest.fixture(scope="module")
def faces():
    return random_faces(5, seed=3)


def _reference(model, faces, flip=False):
    """The arcface_torch convention, computed by hand: RGB NCHW, (x - 127.5) / 127.5, sum flips, L2."""
    def run(x):
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return model((t - 127.5) / 127.5).numpy()
    feats = run(faces) + (run(faces[:, :, ::-1]) if flip else 0)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def test_torch_backbone_follows_arcface_convention(models, faces):
    rec = load_recognizer(models["pth"], batch_size=2)  # batches of 2 over 5 faces: a ragged tail
    assert isinstance(rec, TorchRecognizer) and rec.arch == "r_tiny"
    assert rec.input_size == (112, 112) and rec.embedding_size == 512 and rec.channel_order == "RGB"
    emb = rec.embed(faces)
    assert emb.dtype == np.float32 and emb.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, _reference(models["module"], faces), atol=1e-5)
    # distinct faces -> distinct embeddings (a constant output would pass the norm check)
    assert np.abs(emb @ emb.T - np.eye(5)).max() > 1e-3 and (emb @ emb.T)[0, 1] < 0.9999


@pytest.mark.parametrize("variant", ["onnx", "onnx_norm", "onnx_b1"])
def test_onnx_matches_pytorch(models, faces, variant):
    rec = load_recognizer(models[variant], batch_size=4)
    assert isinstance(rec, OnnxRecognizer)
    assert rec.normalises_inside == (variant == "onnx_norm")
    assert rec.fixed_batch == (1 if variant == "onnx_b1" else None)
    assert rec.input_name == ("data" if variant == "onnx_norm" else "input.1")
    emb = rec.embed(faces)
    np.testing.assert_allclose(emb, load_recognizer(models["pth"]).embed(faces), atol=2e-4)


def test_flip_fusion_and_bgr_convention(models, faces):
    plain = load_recognizer(models["onnx"])
    flipped = load_recognizer(models["onnx"], flip=True)
    np.testing.assert_allclose(flipped.features(faces), plain.features(faces) + plain.features(faces[:, :, ::-1]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flipped.embed(faces), _reference(models["module"], faces, flip=True), atol=2e-4)
    # A BGR-trained model is fed the channels swapped; embed() still takes RGB.
    bgr = load_recognizer(models["pth"], channel_order="BGR")
    np.testing.assert_allclose(bgr.embed(faces), _reference(models["module"], faces[..., ::-1]), atol=1e-5)
    assert not np.allclose(bgr.embed(faces), plain.embed(faces), atol=1e-3)


def test_training_checkpoint_layouts(models, faces, tmp_path):
    state = models["module"].state_dict()
    expected = load_recognizer(models["pth"]).embed(faces)
    layouts = {
        "ckpt_model.pt": {"model": state, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
        "ckpt_ddp.pth": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "ckpt_head.pth": {"model": {**{f"backbone.{k}": v for k, v in state.items()}, "head.weight": torch.zeros(10, 512)}},
    }
    for name, payload in layouts.items():
        torch.save(payload, tmp_path / name)
        np.testing.assert_allclose(load_recognizer(tmp_path / name).embed(faces), expected, atol=1e-6, err_msg=name)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "backbone.safetensors"))
    np.testing.assert_allclose(load_recognizer(tmp_path / "backbone.safetensors").embed(faces), expected, atol=1e-6)
    # Named arch must match the weights
    with pytest.raises(HyperfaceError, match="an iResNet 'r_tiny', not 'r50': drop --arch or pass --arch r_tiny"):
        load_recognizer(models["pth"], arch="r50")


def test_missing_and_wrong_models(models, tmp_path):
    with pytest.raises(HyperfaceError, match=r"not found: .*nowhere\.onnx.*buffalo_l.*FoivosPar/Arc2Face"):
        load_recognizer(tmp_path / "nowhere.onnx")
    # A detector given as --model
    det = make_scrfd_onnx(tmp_path / "det_10g.onnx")
    with pytest.raises(HyperfaceError, match="not a face recognizer|one \\(N, D\\) embedding output"):
        load_recognizer(det)
    # An ONNX classifier with a 3-way output
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "g", [x], [y])
    import onnx

    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    bad.ir_version = 7
    onnx.save(bad, str(tmp_path / "classifier.onnx"))
    with pytest.raises(HyperfaceError, match="outputs 3-d vectors"):
        load_recognizer(tmp_path / "classifier.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \x00\x01")
    with pytest.raises(HyperfaceError, match="junk.onnx"):
        load_recognizer(tmp_path / "junk.onnx")
    # A pickled object instead of a state dict is refused by weights_only loading
    torch.save({"model": models["module"]}, tmp_path / "pickled.pth")
    with pytest.raises(HyperfaceError, match="cannot read .*pickled.pth"):
        load_recognizer(tmp_path / "pickled.pth")
    (tmp_path / "onnx_only").mkdir()
    export_onnx(models["module"], tmp_path / "onnx_only" / "a.onnx")
    with pytest.raises(HyperfaceError, match=r"is a folder without backbone.pth.*a\.onnx"):
        load_recognizer(tmp_path / "onnx_only")
    # a training run / checkpoint folder holding backbone.pth or backbone.safetensors loads it
    assert load_recognizer(models["root"]).path == models["pth"]
    rec = load_recognizer(models["onnx"])
    with pytest.raises(HyperfaceError, match=r"\(N, 112, 112, 3\)"):
        rec.embed(np.zeros((2, 64, 64, 3), np.uint8))


def test_unnamed_normalisation_nodes_and_nhwc_graphs(models, faces, tmp_path):
    import onnx

    expected = load_recognizer(models["pth"]).embed(faces)
    # Exporters that leave node names empty: found by walking from the input through Sub/Mul.
    graph_model = onnx.load(str(models["onnx_norm"]))
    for node in graph_model.graph.node:
        node.name = ""
    onnx.save(graph_model, str(tmp_path / "unnamed.onnx"))
    rec = load_recognizer(tmp_path / "unnamed.onnx")
    assert rec.normalises_inside
    np.testing.assert_allclose(rec.embed(faces), expected, atol=2e-4)

    # A channels-last graph (N, 112, 112, 3), as some converted models take.
    class ChannelsLast(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 3, 1, 2))

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ChannelsLast(models["module"]).eval(), torch.zeros(1, 112, 112, 3), str(tmp_path / "nhwc.onnx"),
            input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}},
            opset_version=11, dynamo=False,
        )
    rec = load_recognizer(tmp_path / "nhwc.onnx")
    assert rec.channels_last and not rec.normalises_inside
    np.testing.assert_allclose(rec.embed(faces), expected, atol=2e-4)
