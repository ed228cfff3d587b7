"""iResNet face-recognition backbones with insightface ``arcface_torch`` module names.

An insightface ``backbone.pth`` (a plain state dict) loads into :func:`iresnet` with
``load_state_dict(..., strict=True)``: the module tree below mirrors
``recognition/arcface_torch/backbones/iresnet.py`` name for name.

Input convention: float NCHW **RGB**, 112x112, normalised as ``(pixel - 127.5) / 127.5``.
Output: the (un-normalised) ``embedding_size``-d feature; L2-normalise it to compare faces.

Layout (insightface arcface_torch backbones/iresnet.py)::

    conv1 3x3/64 -> bn1 -> prelu
    layer1..layer4: IBasicBlock x blocks[i], widths 64/128/256/512, first block of each stride 2
        block: bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3 (stride) -> bn3, + shortcut
               shortcut = downsample (1x1 conv stride + BN) when the shape changes; no ReLU after
    bn2 (BatchNorm2d) -> flatten -> dropout -> fc (512*7*7 -> embedding) -> features (BatchNorm1d)
"""

from __future__ import annotations

import contextlib

import re
from typing import Mapping, Sequence

import torch
from torch import nn

from hyperface.common.errors import HyperfaceError
from hyperface.recognition.backbones import canonical_arch, load_state_strict

#: Blocks per stage for each published iResNet depth.
IRESNET_ARCHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    # Test helper only: one narrow block per stage so unit tests build, export and run a real
    # iResNet (same module names, same 112 -> 7 geometry) in milliseconds. Never a real model.
    "r_tiny": (1, 1, 1, 1),
}

#: Channel widths per stage. Every published arch uses the standard widths.
STANDARD_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
# r_tiny starts at 16 channels: torch 2.13 on an AVX-512 CPU corrupts the heap in the backward of an
# 8-channel convolution, compiled or channels_last (a segfault in `train --arch r_tiny --compile`).
_ARCH_WIDTHS: dict[str, tuple[int, int, int, int]] = {"r_tiny": (16, 16, 32, 32)}

_BN_EPS = 1e-5
_FC_SCALE = 7 * 7  # 112 input halved four times


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN-conv-BN-PReLU-conv(stride)-BN, plus shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + identity


class IResNet(nn.Module):
    """iResNet backbone (insightface arcface_torch layout).

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 14, 3)`` for r50.
        embedding_size: output feature size (insightface's ``num_features``), 512 for every
            released model.
        dropout: dropout before ``fc`` (insightface trains r50/r100 with 0.0; some configs 0.4).
        fp16: run the convolutional trunk under CUDA autocast (fp16), the head in fp32, exactly
            like insightface's ``fp16`` flag. No effect on CPU tensors.
        widths: channels per stage; only the ``r_tiny`` test helper changes them.
    """

    fc_scale = _FC_SCALE

    def __init__(
        self,
        layers: Sequence[int],
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
        widths: Sequence[int] = STANDARD_WIDTHS,
    ):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages, got layers={tuple(layers)} widths={tuple(widths)}")
        self.layers_config = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.embedding_size = int(embedding_size)
        self.fp16 = bool(fp16)

        stem = self.widths[0]
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=_BN_EPS)
        self.prelu = nn.PReLU(stem)
        self.layer1 = self._make_layer(self.widths[0], self.layers_config[0], stride=2)
        self.layer2 = self._make_layer(self.widths[1], self.layers_config[1], stride=2)
        self.layer3 = self._make_layer(self.widths[2], self.layers_config[2], stride=2)
        self.layer4 = self._make_layer(self.widths[3], self.layers_config[3], stride=2)
        self.bn2 = nn.BatchNorm2d(self.widths[3] * IBasicBlock.expansion, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(self.widths[3] * IBasicBlock.expansion * self.fc_scale, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=_BN_EPS)
        # insightface freezes the scale of the final BN (features.weight == 1).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * IBasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * IBasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * IBasicBlock.expansion, eps=_BN_EPS),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * IBasicBlock.expansion
        layers.extend(IBasicBlock(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        # insightface's fp16 flag: the trunk under fp16 autocast, on CUDA tensors. Without the flag,
        # open no autocast context here: a caller's autocast (the trainer's --amp) must reach the trunk.
        own_amp = self.fp16 and device_type == "cuda"
        with torch.autocast(device_type=device_type, dtype=torch.float16) if own_amp else contextlib.nullcontext():
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.prelu(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        if own_amp or torch.is_autocast_enabled(device_type):
            # The embedding layers in fp32 under any autocast, as insightface's fc(x.float()).
            with torch.autocast(device_type=device_type, enabled=False):
                return self.features(self.fc(x.float()))
        return self.features(self.fc(x))


def iresnet(arch: str, *, embedding_size: int = 512, dropout: float = 0.0, fp16: bool = False) -> IResNet:
    """Build an iResNet by name: ``r18``, ``r34``, ``r50``, ``r100``, ``r200`` (or ``r_tiny`` in tests).

    >>> model = iresnet("r50")
    >>> model.load_state_dict(torch.load("backbone.pth", map_location="cpu", weights_only=True))
    """
    key = canonical_arch(arch)
    if key not in IRESNET_ARCHS:
        raise HyperfaceError(
            f"unknown iResNet arch {arch!r}; choose one of {', '.join(a for a in IRESNET_ARCHS if a != 'r_tiny')}"
        )
    return IResNet(
        IRESNET_ARCHS[key],
        embedding_size=embedding_size,
        dropout=dropout,
        fp16=fp16,
        widths=_ARCH_WIDTHS.get(key, STANDARD_WIDTHS),
    )


_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DistributedDataParallel) or ``backbone.`` prefix if every key has it."""
    out = dict(state_dict)
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read an iResNet's block counts, widths and embedding size from its state-dict keys/shapes.

    Raises :class:`HyperfaceError` when the keys are not an insightface iResNet's.
    """
    state_dict = _strip_prefix(state_dict)
    required = ("conv1.weight", "fc.weight", "features.running_mean", "layer1.0.conv1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        sample = ", ".join(list(state_dict)[:4]) or "no keys"
        raise HyperfaceError(
            f"not an insightface iResNet state dict (missing {', '.join(missing)}; found {sample} ...): "
            "expected a backbone.pth from insightface arcface_torch (keys conv1.*, layer1..4.*, fc.*, features.*)"
        )
    counts = [0, 0, 0, 0]
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            counts[stage] = max(counts[stage], index + 1)
    widths = []
    for stage in range(4):
        weight = state_dict.get(f"layer{stage + 1}.0.conv1.weight")
        if weight is None or counts[stage] == 0:
            raise HyperfaceError(f"iResNet state dict has no blocks in layer{stage + 1}; is this an iResNet?")
        widths.append(int(weight.shape[0]))
    return {
        "layers": tuple(counts),
        "widths": tuple(widths),
        "embedding_size": int(state_dict["fc.weight"].shape[0]),
    }


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the arch (``"r50"`` ...) of an insightface iResNet state dict from its layerN block counts."""
    info = describe_state_dict(state_dict)
    for name, layers in IRESNET_ARCHS.items():
        if layers == info["layers"] and info["widths"] == _ARCH_WIDTHS.get(name, STANDARD_WIDTHS):
            return name
    known = ", ".join(f"{n} {list(b)}" for n, b in IRESNET_ARCHS.items() if n != "r_tiny")
    raise HyperfaceError(
        f"unknown iResNet layout: blocks per stage {list(info['layers'])}, widths {list(info['widths'])}; "
        f"known layouts: {known}"
    )


def iresnet_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, arch: str | None = None, fp16: bool = False
) -> IResNet:
    """Build the matching iResNet and load ``state_dict`` strictly (arch inferred unless named)."""
    state_dict = _strip_prefix(state_dict)
    info = describe_state_dict(state_dict)
    inferred = infer_arch_or_none(state_dict)
    name = arch if arch is not None else (inferred or infer_arch(state_dict))  # infer_arch names the layout it cannot place
    if arch is not None and inferred is not None and inferred != canonical_arch(arch):  # before building: --arch mbf too
        raise HyperfaceError(f"the weights are an iResNet {inferred!r}, not {arch!r}: drop --arch or pass --arch {inferred}")
    model = iresnet(name, embedding_size=info["embedding_size"], fp16=fp16)
    return load_state_strict(model, state_dict, f"iResNet {name!r} (inferred: {inferred})")


def infer_arch_or_none(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    try:
        return infer_arch(state_dict)
    except HyperfaceError:
        return None


__all__ = [
    "IRESNET_ARCHS",
    "IBasicBlock",
    "IResNet",
    "describe_state_dict",
    "infer_arch",
    "iresnet",
    "iresnet_from_state_dict",
]
