"""MobileFaceNet with insightface arcface_torch's module names (``backbones/mobilefacenet.py``,
``get_mbf`` / ``get_mbf_large``): the edge model of its model zoo (``mbf``: 1.1 M parameters in the
trunk, a 512-d GDC head).

An arcface_torch ``backbone.pth`` of an ``mbf`` config loads strictly; the input convention is the
iResNet one (float NCHW RGB, ``(pixel - 127.5) / 127.5``); ``forward`` returns the raw feature.

Layout (``scale`` s, ``blocks`` b0..b3)::

    layers[0]  ConvBlock 3x3 stride 2, 3 -> 64s                    ConvBlock = conv -> BN -> PReLU
    layers[1]  ConvBlock 3x3 depthwise in 64 groups (b0 == 1), or Residual(64s, b0, groups 128)
    layers[2]  DepthWise 64s -> 64s stride 2 (expansion 128)       DepthWise = 1x1 ConvBlock ->
    layers[3]  Residual(64s, b1, groups 128)                          3x3 depthwise ConvBlock (stride)
    layers[4]  DepthWise 64s -> 128s stride 2 (expansion 256)         -> 1x1 LinearBlock (conv -> BN),
    layers[5]  Residual(128s, b2, groups 256)                         + input in a Residual
    layers[6]  DepthWise 128s -> 128s stride 2 (expansion 512)
    layers[7]  Residual(128s, b3, groups 256)
    conv_sep   ConvBlock 1x1, 128s -> 512
    features   GDC: 7x7 depthwise LinearBlock -> flatten -> Linear(512 -> embedding, no bias) -> BN1d
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch
from torch import nn

from hyperface.common.errors import HyperfaceError

#: (blocks, scale) of the published configs.
MBF_ARCHS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_large": ((2, 8, 12, 4), 4),
    # Test helper only: the same module tree at a fraction of the width and depth.
    "mbf_tiny": ((1, 1, 1, 1), 1),
}


class _ConvBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _LinearBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _DepthWise(nn.Module):
    """1x1 expansion to ``groups`` channels, a 3x3 depthwise conv (stride), 1x1 projection; + input if residual."""

    def __init__(self, in_c: int, out_c: int, *, groups: int, stride: int = 2, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(_ConvBlock(in_c, groups), _ConvBlock(groups, groups, 3, stride, 1, groups=groups),
                                    _LinearBlock(groups, out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class _Residual(nn.Module):
    def __init__(self, channels: int, num_block: int, groups: int):
        super().__init__()
        self.layers = nn.Sequential(*[_DepthWise(channels, channels, groups=groups, stride=1, residual=True) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _GDC(nn.Module):
    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(_LinearBlock(512, 512, 7, 1, 0, groups=512), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """arcface_torch's MobileFaceNet (see the module docstring); ``forward`` returns raw features."""

    family = "mobilefacenet"

    def __init__(self, blocks: tuple[int, int, int, int] = (1, 4, 6, 2), scale: int = 2, *,
                 embedding_size: int = 512, fp16: bool = False):
        super().__init__()
        self.embedding_size, self.fp16 = int(embedding_size), bool(fp16)
        s = int(scale)
        stem = _ConvBlock(64 * s, 64 * s, 3, 1, 1, groups=64) if blocks[0] == 1 else _Residual(64 * s, blocks[0], 128)
        self.layers = nn.ModuleList([
            _ConvBlock(3, 64 * s, 3, 2, 1), stem,
            _DepthWise(64 * s, 64 * s, groups=128), _Residual(64 * s, blocks[1], 128),
            _DepthWise(64 * s, 128 * s, groups=256), _Residual(128 * s, blocks[2], 256),
            _DepthWise(128 * s, 128 * s, groups=512), _Residual(128 * s, blocks[3], 256),
        ])
        self.conv_sep = _ConvBlock(128 * s, 512)
        self.features = _GDC(self.embedding_size)
        for module in self.modules():  # arcface_torch's initialisation, so a run starts where its runs start
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        own_amp = self.fp16 and device_type == "cuda"  # insightface's fp16 flag: the trunk in fp16
        with torch.autocast(device_type=device_type, dtype=torch.float16) if own_amp else contextlib.nullcontext():
            for layer in self.layers:
                x = layer(x)
        # the embedding head in fp32 under any autocast, as for the iResNet
        with torch.autocast(device_type=device_type, enabled=False) if own_amp or torch.is_autocast_enabled(device_type) \
                else contextlib.nullcontext():
            return self.features(self.conv_sep(x.float()))


def mobilefacenet(arch: str = "mbf", *, embedding_size: int = 512, fp16: bool = False) -> MobileFaceNet:
    if arch not in MBF_ARCHS:
        raise HyperfaceError(f"unknown MobileFaceNet arch {arch!r}; choose mbf or mbf_large")
    blocks, scale = MBF_ARCHS[arch]
    return MobileFaceNet(blocks, scale, embedding_size=embedding_size, fp16=fp16)


def is_mobilefacenet_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return "conv_sep.layers.0.weight" in state and "features.layers.2.weight" in state


def _layout(state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, int, int, int], int]:
    """(blocks, scale) read from the keys: the stem's width, and the DepthWise units of each Residual."""
    scale = int(state["layers.0.layers.0.weight"].shape[0]) // 64

    def units(layer: int) -> int:
        return len({key.split(".")[3] for key in state if key.startswith(f"layers.{layer}.layers.") and key.count(".") > 4})

    first = 1 if "layers.1.layers.0.weight" in state else units(1)
    return (first, units(3), units(5), units(7)), scale


def mobilefacenet_from_state_dict(state: Mapping[str, torch.Tensor], *, arch: str | None = None,
                                  fp16: bool = False) -> MobileFaceNet:
    """Build the MobileFaceNet the weights describe (blocks and scale read from them) and load strictly."""
    blocks, scale = _layout(state)
    inferred = next((name for name, layout in MBF_ARCHS.items() if layout == (blocks, scale)), f"mbf{list(blocks)}x{scale}")
    if arch is not None and arch != inferred:
        raise HyperfaceError(f"the weights are a MobileFaceNet {inferred!r}, not {arch!r}: drop --arch or pass --arch {inferred}")
    from hyperface.recognition.backbones import load_state_strict

    model = MobileFaceNet(blocks, scale, embedding_size=int(state["features.layers.2.weight"].shape[0]), fp16=fp16)
    load_state_strict(model, state, f"MobileFaceNet {inferred!r}")
    model.arch = inferred
    return model


__all__ = ["MBF_ARCHS", "MobileFaceNet", "is_mobilefacenet_state_dict", "mobilefacenet", "mobilefacenet_from_state_dict"]
