"""arcface_torch's face ViT: module names and shapes, parameter counts, forward, arch inference,
training-only masking and drop path, and `hyperface embed` / ONNX export on a ViT backbone.pth."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recognition_fixtures import random_faces

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError
from hyperface.recognition import load_recognizer
from hyperface.recognition.backbones import backbone_from_state_dict, check_arch, create_backbone
from hyperface.recognition.vit import VIT_ARCHS, VisionTransformer, vit

# arcface_torch backbones/__init__.py get_model, copied here as data: (embed_dim, depth, num_heads,
# drop_path_rate, mask_ratio, using_checkpoint); every one img_size 112, patch_size 9, norm_layer "ln".
_ARCFACE_TORCH_VITS = {
    "vit_t": (256, 12, 8, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 8, 0.05, 0.0, False),
    "vit_s": (512, 12, 8, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 8, 0.05, 0.0, False),
    "vit_b": (512, 24, 8, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 8, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 8, 0.05, 0.05, True),
}


def _expected_keys(d: int, depth: int, emb: int = 512) -> list[tuple[str, tuple[int, ...]]]:
    """state_dict() of arcface_torch's VisionTransformer(img_size=112, patch_size=9, embed_dim=d, ...),
    in its order: the module's own parameters (pos_embed, then mask_token), then patch_embed, blocks
    (each: norm1, norm2, attn.qkv without bias, attn.proj, mlp.fc1, mlp.fc2), norm, feature."""
    bn = lambda p, c: [(f"{p}.weight", (c,)), (f"{p}.bias", (c,)), (f"{p}.running_mean", (c,)),  # noqa: E731
                       (f"{p}.running_var", (c,)), (f"{p}.num_batches_tracked", ())]
    keys = [("pos_embed", (1, 144, d)), ("mask_token", (1, 1, d)),
            ("patch_embed.proj.weight", (d, 3, 9, 9)), ("patch_embed.proj.bias", (d,))]
    for i in range(depth):
        p = f"blocks.{i}"
        keys += [(f"{p}.norm1.weight", (d,)), (f"{p}.norm1.bias", (d,)), (f"{p}.norm2.weight", (d,)), (f"{p}.norm2.bias", (d,)),
                 (f"{p}.attn.qkv.weight", (3 * d, d)), (f"{p}.attn.proj.weight", (d, d)), (f"{p}.attn.proj.bias", (d,)),
                 (f"{p}.mlp.fc1.weight", (4 * d, d)), (f"{p}.mlp.fc1.bias", (4 * d,)),
                 (f"{p}.mlp.fc2.weight", (d, 4 * d)), (f"{p}.mlp.fc2.bias", (d,))]
    keys += [("norm.weight", (d,)), ("norm.bias", (d,)), ("feature.0.weight", (d, 144 * d)), *bn("feature.1", d),
             ("feature.2.weight", (emb, d)), *bn("feature.3", emb)]
    return keys


def _expected_params(d: int, depth: int, emb: int = 512) -> int:
    """Trainable parameters implied by the config: per block 2 LayerNorms, qkv (no bias), proj, an MLP of ratio 4."""
    block = 2 * 2 * d + 3 * d * d + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    stem = (3 * 9 * 9 * d + d) + 144 * d + d  # patch conv, pos_embed, mask_token
    head = 2 * d + (144 * d * d) + 2 * d + d * emb + 2 * emb  # norm, Linear, BN, Linear, BN
    return depth * block + stem + head


def test_vit_t_state_dict_is_arcface_torch_s():
    sd = vit("vit_t").state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == _expected_keys(256, 12)


@pytest.mark.parametrize("name", sorted(_ARCFACE_TORCH_VITS))
def test_published_configs_build_as_arcface_torch_does(name):
    dim, depth, heads, dp, mask, ckpt = _ARCFACE_TORCH_VITS[name]
    assert tuple(VIT_ARCHS[name]) == (dim, depth, heads, dp, mask, ckpt)
    with torch.device("meta"):  # shapes only
        model = vit(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == _expected_keys(dim, depth)
    assert sum(p.numel() for p in model.parameters()) == _expected_params(dim, depth)
    assert model.blocks[0].attn.num_heads == heads and model.blocks[0].attn.scale == (dim // heads) ** -0.5
    # stochastic depth rises linearly from 0 (an identity in block 0) to the arch's rate
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)
    assert model.blocks[-1].drop_path.p == pytest.approx(dp)
    assert isinstance(model.blocks[0].mlp.act, torch.nn.ReLU6)
    assert model.feature[1].eps == model.feature[3].eps == 2e-5 and model.norm.eps == 1e-5


def test_parameter_counts_of_vit_t_and_vit_s():
    assert sum(p.numel() for p in vit("vit_t").parameters()) == _expected_params(256, 12) == 19_137_792
    with torch.device("meta"):
        assert sum(p.numel() for p in vit("vit_s").parameters()) == _expected_params(512, 12)
    # vit_l is arcface_torch's vit_l_dp005_mask_005 under its base name
    assert VIT_ARCHS["vit_l"] == VIT_ARCHS["vit_l_dp005_mask_005"]


def _random_stats(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """Non-trivial LayerNorm affines and BatchNorm statistics; small running variances so the
    head's BatchNorm eps (2e-5) shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(1e-4, 5e-4)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1)
        model.pos_embed.normal_(0, 0.5)
    return model.eval()


def _vit_reference_forward(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """arcface_torch's VisionTransformer.forward (eval) written out with functional ops from the state dict."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=9).flatten(2).transpose(1, 2)
    t = t + sd["pos_embed"]
    b, n, d = t.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"]).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        h = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1) @ v
        t = t + F.linear(h.transpose(1, 2).reshape(b, n, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
        h = F.linear(F.relu6(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + h
        i += 1
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], 1e-5).reshape(b, n * d)

    def bn(z, name):
        return F.batch_norm(z, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"], sd[name + ".bias"], False, 0.0, 2e-5)

    return bn(F.linear(bn(F.linear(t, sd["feature.0.weight"]), "feature.1"), sd["feature.2.weight"]), "feature.3")


@pytest.fixture(scope="module")
def tiny():
    return _random_stats(vit("vit_tiny", embedding_size=64), seed=1)


@pytest.fixture(scope="module")
def faces():
    return random_faces(5, seed=7)


def _input(faces: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(faces.transpose(0, 3, 1, 2))).float().sub(127.5).div(127.5)


def test_forward_matches_arcface_torch_and_ignores_the_last_four_pixels(tiny, faces):
    x = _input(faces)
    with torch.no_grad():
        out = tiny(x)
        np.testing.assert_allclose(out.numpy(), _vit_reference_forward(tiny.state_dict(), x, heads=2).numpy(), rtol=1e-4, atol=1e-4)
        # a GELU, a qkv bias or the BatchNorm default eps would each move the output far beyond that
        assert out.abs().mean() > 0.1
        y = x.clone()
        y[:, :, 108:, :] = torch.randn_like(y[:, :, 108:, :])  # 12 patches of 9 cover 108 of the 112 pixels
        y[:, :, :, 108:] = 0.5
        torch.testing.assert_close(tiny(y), out)
    with pytest.raises(HyperfaceError, match="112x112"):
        tiny(torch.zeros(1, 3, 96, 96))


def test_backbone_pth_round_trips_strictly_through_the_factory_and_loader(tiny, faces, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "vit.pth")
    state = torch.load(tmp_path / "vit.pth", weights_only=True)
    model, arch = backbone_from_state_dict(state)
    assert arch == "vit_tiny" and model.family == "vit" and model.embedding_size == 64
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_input(faces)), tiny(_input(faces)), rtol=0, atol=0)
    # as DDP saves it, and a checkpoint nesting backbone + head: the loader strips the prefixes
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    torch.save({"model": {**{f"backbone.{k}": v for k, v in state.items()}, "head.weight": torch.zeros(3, 64)}}, tmp_path / "head.pt")
    expected = F.normalize(tiny(_input(faces)), dim=1).detach().numpy()
    for name in ("vit.pth", "ddp.pth", "head.pt"):
        recognizer = load_recognizer(tmp_path / name, batch_size=2)
        info = recognizer.describe()
        assert info["kind"] == "torch-vit" and info["arch"] == "vit_tiny" and info["channel_order"] == "RGB"
        np.testing.assert_allclose(recognizer.embed(faces), expected, atol=1e-5, err_msg=name)
    # a missing key is one clear error, not a half-loaded model
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(HyperfaceError, match=r"does not match ViT 'vit_tiny'.*blocks\.1\.mlp\.fc2\.bias"):
        backbone_from_state_dict(state)


def test_arch_inference_and_explicit_arch_checks(tiny):
    sd = tiny.state_dict()
    with pytest.raises(HyperfaceError, match="the weights are a ViT 'vit_tiny', not 'vit_t': drop --arch or pass --arch vit_tiny"):
        backbone_from_state_dict(sd, arch="vit_t")
    # the dp/mask variants share their base's weights: named, they are accepted and set the training settings
    torch.manual_seed(0)
    vit_t = vit("vit_t").state_dict()
    assert backbone_from_state_dict(vit_t)[1] == "vit_t"
    model, arch = backbone_from_state_dict(vit_t, arch="vit_t_dp005_mask0")
    assert arch == "vit_t_dp005_mask0" and model.mask_ratio == 0.0 and model.blocks[-1].drop_path.p == pytest.approx(0.05)
    with pytest.raises(HyperfaceError, match="a ViT 'vit_t', not 'vit_s_dp005_mask_0'"):
        backbone_from_state_dict(vit_t, arch="vit_s_dp005_mask_0")
    # same width, other depth: vit_s and vit_b are told apart by their blocks (checked before anything is built)
    with torch.device("meta"):
        vit_s = vit("vit_s").state_dict()
    with pytest.raises(HyperfaceError, match="a ViT 'vit_s', not 'vit_b'"):
        backbone_from_state_dict(vit_s, arch="vit_b")
    odd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(HyperfaceError, match=r"unknown ViT layout: width 32, depth 1; known layouts: vit_t \(width 256, depth 12\)"):
        backbone_from_state_dict(odd)


def test_masking_and_drop_path_act_in_training_only(tiny):
    torch.manual_seed(2)
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        model = _random_stats(vit("vit_tiny"), seed=3)  # mask 0.1, drop path 0.1
        reference = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x), reference, rtol=0, atol=0)  # eval: deterministic
        model.train()
        masked = model.forward_features(x).reshape(4, 144, 32)
        # each sample: int(144 * 0.9) = 129 tokens kept, 15 places filled with mask_token
        is_mask = (masked == model.mask_token.reshape(1, 1, 32)).all(dim=2)
        assert is_mask.sum(dim=1).tolist() == [15] * 4
        assert not torch.equal(is_mask[0], is_mask[1])  # drawn per sample
        no_mask = VisionTransformer(32, 2, 2, embedding_size=512, drop_path_rate=0.0, mask_ratio=0.0)
        no_mask.load_state_dict(model.state_dict())
        no_mask.train()
        torch.testing.assert_close(no_mask.forward_features(x), reference, rtol=0, atol=0)  # nothing else differs
        drop = VisionTransformer(32, 2, 2, embedding_size=512, drop_path_rate=0.9, mask_ratio=0.0)
        drop.load_state_dict(model.state_dict())
        assert not torch.allclose(drop.train().forward_features(x), reference)
        torch.testing.assert_close(drop.eval().forward_features(x), reference, rtol=0, atol=0)
        # a 0.05 config masks 15 tokens too, as arcface_torch's forward does (it never passes the ratio on)
        half = VisionTransformer(32, 2, 2, embedding_size=512, drop_path_rate=0.0, mask_ratio=0.05)
        half.load_state_dict(model.state_dict())
        tokens = half.train().forward_features(x).reshape(4, 144, 32)
        assert (tokens == half.mask_token.reshape(1, 1, 32)).all(dim=2).sum(dim=1).tolist() == [15] * 4


def test_activation_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(4)
    x = torch.randn(3, 3, 112, 112)
    plain = vit("vit_tiny").train()
    ckpt = VisionTransformer(32, 2, 2, drop_path_rate=0.1, mask_ratio=0.1, using_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)  # the same masks and dropped paths
        model(x).square().sum().backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_factory_names_and_refusals():
    assert check_arch("vit_t") == check_arch("VIT_B_DP005_MASK_005") == "vit"
    model = create_backbone("vit_tiny", embedding_size=64)
    assert isinstance(model, VisionTransformer) and model.embedding_size == 64 and model.feature[2].weight.shape == (64, 32)
    with pytest.raises(HyperfaceError, match="--dropout applies to iResNet's fc layer; vit_t has none"):
        check_arch("vit_t", dropout=0.1)
    with pytest.raises(HyperfaceError, match=r"unknown --arch 'vit_h'.*vit_t, vit_t_dp005_mask0, vit_s.*vit_l_dp005_mask_005"):
        check_arch("vit_h")


def test_embed_cli_on_a_vit_backbone_pth(tiny, tmp_path):
    faces = random_faces(4, seed=11)
    for i, face in enumerate(faces):
        (tmp_path / "src").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "src" / f"{i:03d}.png"), np.ascontiguousarray(face[..., ::-1]))
    torch.save(tiny.state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "run" / "gallery.npy"
    assert main(["embed", str(tmp_path / "src"), "--model", str(tmp_path / "vit.pth"), "--aligned", "--out", str(out),
                 "--batch-size", "3", "--no-progress", "--device", "cpu"]) == 0
    gallery = np.load(out)
    with torch.no_grad():
        expected = F.normalize(tiny(_input(faces)), dim=1).numpy()
    np.testing.assert_allclose(gallery, expected, atol=1e-5)
    manifest = json.loads((tmp_path / "run" / "gallery.manifest.json").read_text())
    assert manifest["recognizer"]["kind"] == "torch-vit" and manifest["recognizer"]["arch"] == "vit_tiny"


def test_export_to_onnx_matches_pytorch(tiny, faces, tmp_path):
    from hyperface.training import export_backbone

    torch.save(tiny.state_dict(), tmp_path / "vit.pth")
    export_backbone(tmp_path / "vit.pth", tmp_path / "vit.onnx")
    onnx_rec = load_recognizer(tmp_path / "vit.onnx", batch_size=3)  # dynamic batch: 3 then a ragged 2
    np.testing.assert_allclose(onnx_rec.embed(faces), load_recognizer(tmp_path / "vit.pth").embed(faces), atol=1e-4)
