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


def _insightface_get_feat(path, face_rgb: np.ndarray) -> np.ndarray:
    """insightface's ``ArcFaceONNX.get_feat`` on one aligned face, re-stated: the BGR image (as cv2
    loads it) through ``cv2.dnn.blobFromImages(1/127.5, mean 127.5, swapRB=True)`` into the graph."""
    import cv2
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    blob = cv2.dnn.blobFromImages([np.ascontiguousarray(face_rgb[..., ::-1])], 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
    return session.run(None, {session.get_inputs()[0].name: blob})[0]


def test_onnx_features_and_embeddings_are_insightfaces_to_the_bit(models, faces):
    # FaceAnalysis (and so Arc2Face) embeds one face at a time through ArcFaceONNX.get_feat; the
    # blob's float32 arithmetic is OpenCV's (most releases multiply by 1/127.5 rounded to float32,
    # which differs from (x - 127.5) / 127.5 in the last bit for 126 of the 256 grey levels).
    rec = load_recognizer(models["onnx"], batch_size=1)
    expected = np.concatenate([_insightface_get_feat(models["onnx"], face) for face in faces])
    np.testing.assert_array_equal(rec.features(faces), expected)
    # rows are Face.normed_embedding: embedding / numpy.linalg.norm(embedding), in float32
    np.testing.assert_array_equal(rec.embed(faces), np.stack([f / np.linalg.norm(f) for f in expected]))
    assert "blobFromImages" in rec.describe()["normalisation"]
    # evaluate feeds ONNX models as arcface_torch's onnx_ijbc.py: numpy's (x - 127.5) / 127.5
    import onnxruntime as ort

    session = ort.InferenceSession(str(models["onnx"]), providers=["CPUExecutionProvider"])
    divided = (faces.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5
    np.testing.assert_array_equal(
        load_recognizer(models["onnx"], onnx_input="divide").features(faces), session.run(None, {"input.1": divided})[0]
    )
    with pytest.raises(HyperfaceError, match="input scaling"):
        load_recognizer(models["onnx"], onnx_input="mean-std")


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


@pytest.mark.parametrize("arch", ["mbf", "vit_t", "ir_50", "r51"])
def test_an_arch_of_another_family_on_iresnet_weights_names_what_the_weights_are(models, arch):
    with pytest.raises(HyperfaceError, match=f"the weights are an iResNet 'r_tiny', not '{arch}': drop --arch or pass --arch r_tiny"):
        load_recognizer(models["pth"], arch=arch)


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


# --- AdaFace IR networks ------------------------------------------------------------------------


def _adaface_reference_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """AdaFace net.py's Backbone.forward written out with functional ops from the state dict alone:
    input conv-BN-PReLU; per unit BN-conv3x3-BN-PReLU-conv3x3(stride)-BN[-SE] plus a max-pool(1,
    stride) or conv1x1+BN shortcut; output BN2d, flatten, linear, BN1d without affine."""
    import torch.nn.functional as F

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd.get(p + ".weight"), sd.get(p + ".bias"), False, 0.0, 1e-5)

    t = F.prelu(bn(F.conv2d(x, sd["input_layer.0.weight"], padding=1), "input_layer.1"), sd["input_layer.2.weight"])
    unit = 0
    while f"body.{unit}.res_layer.0.weight" in sd:
        p = f"body.{unit}"
        depth = sd[p + ".res_layer.4.weight"].shape[0]
        stride = 2 if unit == 0 or depth != sd[f"body.{unit - 1}.res_layer.4.weight"].shape[0] else 1
        r = bn(t, p + ".res_layer.0")
        r = F.prelu(bn(F.conv2d(r, sd[p + ".res_layer.1.weight"], padding=1), p + ".res_layer.2"), sd[p + ".res_layer.3.weight"])
        r = bn(F.conv2d(r, sd[p + ".res_layer.4.weight"], stride=stride, padding=1), p + ".res_layer.5")
        if p + ".res_layer.se_block.fc1.weight" in sd:
            w = torch.sigmoid(F.conv2d(F.relu(F.conv2d(r.mean((2, 3), keepdim=True), sd[p + ".res_layer.se_block.fc1.weight"])),
                                       sd[p + ".res_layer.se_block.fc2.weight"]))
            r = r * w
        if p + ".shortcut_layer.0.weight" in sd:
            s = bn(F.conv2d(t, sd[p + ".shortcut_layer.0.weight"], stride=stride), p + ".shortcut_layer.1")
        else:
            s = t[:, :, ::stride, ::stride]  # MaxPool2d(1, stride): subsampling
        t = r + s
        unit += 1
    t = bn(t, "output_layer.0").flatten(1)
    t = F.linear(t, sd["output_layer.3.weight"], sd["output_layer.3.bias"])
    return F.batch_norm(t, sd["output_layer.4.running_mean"], sd["output_layer.4.running_var"], None, None, False, 0.0, 1e-5)


@pytest.mark.parametrize("se", [False, True])
def test_adaface_ckpt_loads_and_runs_bgr_like_adaface(faces, tmp_path, se):
    from hyperface.recognition.adaface_ir import AdaFaceIR

    torch.manual_seed(3)
    # ir_18's units (2 per stage), narrow widths so the test runs in milliseconds
    model = AdaFaceIR(18, se=se, embedding_size=64, stages=((16, 16, 2), (16, 32, 2), (32, 48, 2), (48, 64, 2))).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.data.uniform_(-0.1, 0.1)
            if isinstance(module, torch.nn.PReLU):
                module.weight.data.uniform_(0.1, 0.4)
    sd = model.state_dict()
    # AdaFace's layout: no shortcut weights where the width stays (max-pool), no affine in the last BN
    assert not any(k.startswith("body.0.shortcut_layer") for k in sd) and "body.2.shortcut_layer.0.weight" in sd
    assert "output_layer.4.running_mean" in sd and "output_layer.4.weight" not in sd
    # a PyTorch Lightning checkpoint as AdaFace's trainer writes it: prefixed weights, the head, counters
    ckpt = {"epoch": 25, "global_step": 1000, "pytorch-lightning_version": "1.8.6",
            "state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "head.kernel": torch.randn(64, 10)}}
    torch.save(ckpt, tmp_path / "adaface_tiny.ckpt")
    recognizer = load_recognizer(tmp_path / "adaface_tiny.ckpt", batch_size=3)
    info = recognizer.describe()
    assert info["kind"] == "torch-adaface-ir" and info["channel_order"] == "BGR" and info["arch"] == ("ir_se_18" if se else "ir_18")
    x = torch.from_numpy(np.ascontiguousarray(faces[..., ::-1].transpose(0, 3, 1, 2))).float().sub(127.5).div(127.5)
    expected = torch.nn.functional.normalize(_adaface_reference_forward(sd, x), dim=1).numpy()
    np.testing.assert_allclose(recognizer.embed(faces), expected, atol=2e-5)
    rgb = load_recognizer(tmp_path / "adaface_tiny.ckpt", channel_order="RGB").embed(faces)
    assert np.abs(rgb - expected).max() > 1e-3  # the channel order matters: BGR is AdaFace's
    with pytest.raises(HyperfaceError, match=r"AdaFace 'ir(_se)?_18', not 'ir_50'"):
        load_recognizer(tmp_path / "adaface_tiny.ckpt", arch="ir_50")
    from hyperface.recognition.backbones import backbone_from_state_dict

    with pytest.raises(HyperfaceError, match="run an AdaFace IR network in float32"):  # on CUDA (the CPU refuses --fp16 first)
        backbone_from_state_dict(sd, fp16=True)


def test_a_lightning_ckpt_with_pickled_objects_says_how_to_extract_it(tmp_path):
    import argparse

    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(lr=0.1)}, tmp_path / "a.ckpt")
    with pytest.raises(HyperfaceError, match=r"weights_only=False\)\['state_dict'\]") as error:
        load_recognizer(tmp_path / "a.ckpt")
    assert "if you" in str(error.value) and "trust the file" in str(error.value)


# --- arcface_torch MobileFaceNet ------------------------------------------------------------------


def _mbf_reference_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """arcface_torch's MobileFaceNet.forward written out with functional ops from the state dict alone."""
    import torch.nn.functional as F

    def block(t, p, stride=1, act=True):  # ConvBlock / LinearBlock: conv (padding from the kernel) -> BN [-> PReLU]
        w = sd[p + ".layers.0.weight"]
        groups = t.shape[1] // w.shape[1]
        t = F.conv2d(t, w, stride=stride, padding=w.shape[-1] // 2 if w.shape[-1] == 3 else 0, groups=groups)
        t = F.batch_norm(t, sd[p + ".layers.1.running_mean"], sd[p + ".layers.1.running_var"], sd[p + ".layers.1.weight"],
                         sd[p + ".layers.1.bias"], False, 0.0, 1e-5)
        return F.prelu(t, sd[p + ".layers.2.weight"]) if act else t

    def depthwise(t, p, stride):
        return block(block(block(t, p + ".layers.0"), p + ".layers.1", stride), p + ".layers.2", act=False)

    def residual(t, p):
        i = 0
        while f"{p}.layers.{i}.layers.0.layers.0.weight" in sd:
            t = t + depthwise(t, f"{p}.layers.{i}", 1)
            i += 1
        return t

    t = block(x, "layers.0", 2)
    t = block(t, "layers.1") if "layers.1.layers.0.weight" in sd else residual(t, "layers.1")
    for dw, res in ((2, 3), (4, 5), (6, 7)):
        t = residual(depthwise(t, f"layers.{dw}", 2), f"layers.{res}")
    t = block(t, "conv_sep")
    t = block(t, "features.layers.0", act=False).flatten(1)
    t = F.linear(t, sd["features.layers.2.weight"])
    return F.batch_norm(t, sd["features.layers.3.running_mean"], sd["features.layers.3.running_var"],
                        sd["features.layers.3.weight"], sd["features.layers.3.bias"], False, 0.0, 1e-5)


@pytest.mark.parametrize("blocks", [(1, 1, 1, 1), (2, 1, 2, 1)])  # the stem as a grouped conv, or a Residual
def test_mobilefacenet_backbone_pth_loads_like_arcface_torch(faces, tmp_path, blocks):
    from hyperface.recognition.mobilefacenet import MobileFaceNet

    torch.manual_seed(4)
    model = MobileFaceNet(blocks, 1, embedding_size=128).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.1, 0.1)
            if isinstance(module, torch.nn.PReLU):
                module.weight.data.uniform_(0.1, 0.4)
    sd = model.state_dict()
    assert "layers.2.layers.1.layers.0.weight" in sd and sd["layers.2.layers.1.layers.0.weight"].shape == (128, 1, 3, 3)  # depthwise
    assert "features.layers.2.bias" not in sd  # GDC's linear has no bias
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "backbone.pth")  # as DDP saves it
    recognizer = load_recognizer(tmp_path / "backbone.pth", batch_size=3)
    info = recognizer.describe()
    assert info["kind"] == "torch-mobilefacenet" and info["channel_order"] == "RGB"
    assert info["arch"] == ("mbf_tiny" if blocks == (1, 1, 1, 1) else "mbf[2, 1, 2, 1]x1")
    x = torch.from_numpy(np.ascontiguousarray(faces.transpose(0, 3, 1, 2))).float().sub(127.5).div(127.5)
    expected = torch.nn.functional.normalize(_mbf_reference_forward(sd, x), dim=1).numpy()
    np.testing.assert_allclose(recognizer.embed(faces), expected, atol=2e-5)


# AdaFace net.py's get_blocks, copied here as data: (units per stage, widths), bottleneck from 152 layers
_ADAFACE_PUBLISHED = {
    "ir_18": ((2, 2, 2, 2), (64, 128, 256, 512), False),
    "ir_34": ((3, 4, 6, 3), (64, 128, 256, 512), False),
    "ir_50": ((3, 4, 14, 3), (64, 128, 256, 512), False),
    "ir_101": ((3, 13, 30, 3), (64, 128, 256, 512), False),
    "ir_152": ((3, 8, 36, 3), (256, 512, 1024, 2048), True),
    "ir_200": ((3, 24, 36, 3), (256, 512, 1024, 2048), True),
}


@pytest.mark.parametrize("name", sorted(_ADAFACE_PUBLISHED))
def test_adaface_layouts_follow_the_published_tables(name):
    from hyperface.recognition.adaface_ir import adaface_ir, infer_adaface_arch

    units, widths, bottleneck = _ADAFACE_PUBLISHED[name]
    with torch.device("meta"):  # shapes only: ir_200 would take seconds to initialise
        sd = adaface_ir(name).state_dict()
        se = adaface_ir(name.replace("ir_", "ir_se_")).state_dict()
    last = 8 if bottleneck else 5  # the unit's closing BatchNorm
    depths = [sd[f"body.{i}.res_layer.{last}.weight"].shape[0] for i in range(sum(units))]
    assert depths == [w for w, n in zip(widths, units) for _ in range(n)]
    assert f"body.{sum(units)}.res_layer.0.weight" not in sd
    assert ("body.0.res_layer.8.weight" in sd) == bottleneck
    assert sd["output_layer.3.weight"].shape == (512, widths[-1] * 7 * 7)
    assert se["body.0.res_layer.se_block.fc1.weight"].shape == (widths[0] // 16, widths[0], 1, 1)  # SE reduction 16
    assert infer_adaface_arch(sd) == name and infer_adaface_arch(se) == name.replace("ir_", "ir_se_")
    if bottleneck:  # BN, 1x1 -> BN PReLU, 3x3 -> BN PReLU, 1x1 (stride) -> BN
        assert sd["body.0.res_layer.1.weight"].shape[-1] == 1 and sd["body.0.res_layer.4.weight"].shape[-1] == 3
        assert sd["body.0.res_layer.6.weight"].shape == (widths[0] // 4,)  # a PReLU's slopes, not a ReLU


def test_mobilefacenet_published_layouts_load_by_their_keys():
    """get_mbf (scale 2, blocks 1/4/6/2) and get_mbf_large (scale 4, 2/8/12/4) as arcface_torch builds them."""
    from hyperface.recognition.backbones import backbone_from_state_dict
    from hyperface.recognition.mobilefacenet import mobilefacenet

    torch.manual_seed(0)
    for name, stem, units in (("mbf", (128, 2, 3, 3), (4, 6, 2)), ("mbf_large", None, (8, 12, 4))):
        sd = mobilefacenet(name).state_dict()
        if stem:  # the grouped 3x3 stem: 64 groups whatever the scale
            assert sd["layers.1.layers.0.weight"].shape == stem
        else:  # blocks[0] = 2: a Residual stem of two DepthWise units, expansion 128
            assert sd["layers.1.layers.1.layers.0.layers.0.weight"].shape == (128, 256, 1, 1)
        for layer, count in zip((3, 5, 7), units):
            assert f"layers.{layer}.layers.{count - 1}.layers.0.layers.0.weight" in sd
            assert f"layers.{layer}.layers.{count}.layers.0.layers.0.weight" not in sd
        assert sd["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)  # GDC: a 7x7 depthwise conv
        model, arch = backbone_from_state_dict(sd)
        assert arch == name and model.family == "mobilefacenet"
    with pytest.raises(HyperfaceError, match="MobileFaceNet 'mbf', not 'mbf_large'"):
        backbone_from_state_dict(mobilefacenet("mbf").state_dict(), arch="mbf_large")
