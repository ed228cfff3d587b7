"""iResNet: insightface arcface_torch layout (key names, parameter count) and arch inference."""

from __future__ import annotations

import pytest
import torch

from hyperface.common.errors import HyperfaceError
from hyperface.recognition.iresnet import IRESNET_ARCHS, infer_arch, iresnet, iresnet_from_state_dict


def _expected_iresnet_params(blocks, widths=(64, 128, 256, 512), emb=512) -> int:
    """Parameter count of insightface's iResNet, computed from the published layout, not our code."""
    bn = lambda c: 2 * c  # noqa: E731  (weight + bias; running stats are buffers)
    total = 3 * widths[0] * 9 + bn(widths[0]) + widths[0]  # stem conv, bn1, prelu
    inplanes = widths[0]
    for n, planes in zip(blocks, widths):
        for i in range(n):
            cin = inplanes if i == 0 else planes
            total += bn(cin) + 9 * cin * planes + bn(planes) + planes + 9 * planes * planes + bn(planes)
            if i == 0:  # every stage starts with stride 2 -> 1x1 conv + BN shortcut
                total += cin * planes + bn(planes)
        inplanes = planes
    total += bn(widths[3]) + widths[3] * 49 * emb + emb + bn(emb)  # bn2, fc, features
    return total


def test_r50_matches_insightface_layout():
    model = iresnet("r50")
    keys = set(model.state_dict())
    for key in [
        "conv1.weight", "bn1.running_var", "prelu.weight",
        "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer1.0.prelu.weight",
        "layer1.0.conv2.weight", "layer1.0.bn3.running_mean", "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight", "layer3.13.conv2.weight", "layer4.2.bn3.weight",
        "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean",
    ]:
        assert key in keys, key
    assert "layer1.1.downsample.0.weight" not in keys and "layer3.14.conv1.weight" not in keys
    assert model.fc.weight.shape == (512, 512 * 7 * 7)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == _expected_iresnet_params(IRESNET_ARCHS["r50"])
    assert 43_000_000 < n_params < 44_000_000  # insightface reports ~43.6M for r50


@pytest.mark.parametrize("arch", ["r18", "r34", "r50", "r100", "r200", "r_tiny"])
def test_infer_arch_round_trips(arch):
    # Build on the meta device: r200's state dict shapes without allocating its weights.
    with torch.device("meta"):
        state = iresnet(arch).state_dict()
    assert infer_arch(state) == arch
    # DistributedDataParallel checkpoints prefix every key with "module.".
    assert infer_arch({f"module.{k}": v for k, v in state.items()}) == arch


def test_infer_arch_rejects_unknown_layouts():
    state = iresnet("r_tiny").state_dict()
    extra = {k.replace("layer2.0.", "layer2.1."): v for k, v in state.items() if k.startswith("layer2.0.")}
    extra = {k: v for k, v in extra.items() if ".downsample." not in k}
    with pytest.raises(HyperfaceError, match="unknown iResNet layout"):
        infer_arch({**state, **extra})
    with pytest.raises(HyperfaceError, match="not an insightface iResNet"):
        infer_arch({"weight": torch.zeros(3)})
    with pytest.raises(HyperfaceError, match="unknown iResNet arch"):
        iresnet("r42")


def test_state_dict_loads_strictly_and_forward_shape():
    torch.manual_seed(0)
    source = iresnet("r_tiny").eval()
    with torch.no_grad():  # non-trivial BN statistics so a wrong load would show
        for module in source.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    loaded = iresnet_from_state_dict(source.state_dict()).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected, got = source(x), loaded(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected)
    with pytest.raises(HyperfaceError, match="the weights are an iResNet 'r_tiny', not 'r18': drop --arch or pass --arch r_tiny"):
        iresnet_from_state_dict(source.state_dict(), arch="r18")


def test_callers_autocast_reaches_the_trunk_and_the_embedding_stays_fp32():
    # The trainer's --amp wraps the backbone in autocast; the trunk must run in that dtype (not be
    # switched back to fp32 inside), while fc and features run in fp32 as in insightface.
    torch.manual_seed(0)
    model = iresnet("r_tiny").eval()
    dtypes = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: dtypes.__setitem__(name, o.dtype))
             for name in ("conv1", "layer1", "layer4", "fc")]
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        plain = model(x)
        assert set(dtypes.values()) == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    for hook in hooks:
        hook.remove()
    assert dtypes["conv1"] == dtypes["layer1"] == dtypes["layer4"] == torch.bfloat16
    assert dtypes["fc"] == torch.float32 and mixed.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(mixed, plain)
    assert cosine.min() > 0.95 and not torch.equal(mixed, plain)  # bf16 rounding, same embedding
