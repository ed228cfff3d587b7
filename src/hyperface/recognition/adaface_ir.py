"""IR and IR-SE face-recognition backbones with AdaFace's module names (``net.py`` of AdaFace, the
layout face.evoLVe introduced; also used by DCFace and the Idiap synthetic-face recipes).

An AdaFace checkpoint (``adaface_ir50_ms1mv2.ckpt``: the weights under ``"state_dict"``, prefixed
``model.``, beside the margin head's ``head.kernel``) loads into :func:`adaface_ir` strictly.

Input convention (AdaFace's ``inference.py``): float NCHW **BGR**, 112x112, ``(pixel - 127.5) / 127.5``.
Output here: the raw ``embedding_size``-d feature (AdaFace's ``forward`` returns it L2-normalised
together with its norm; the norm times the unit feature is this).

Layout::

    input_layer: conv 3x3/64 -> BN -> PReLU
    body: blocks of (in, depth, stride), the first of each stage stride 2
        res_layer: BN -> conv 3x3 -> BN -> PReLU -> conv 3x3 (stride) -> BN [-> SE for IR-SE]
                   (152/200 layers: the bottleneck form, 1x1 -> 3x3 -> 1x1 with PReLUs)
        shortcut_layer: 1x1 conv (stride) + BN when the width changes, else a stride-s max-pool
                        of kernel 1 (subsampling; no parameters)
    output_layer: BN2d -> Dropout -> Flatten -> Linear(C*7*7 -> 512) -> BN1d (no affine)

It is the IR-50 network iResNet-50 also implements, under other names, except the first stage's
shortcut (subsampling here, a strided 1x1 conv in insightface's), so weights do not convert.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from hyperface.common.errors import HyperfaceError

#: (in, depth, blocks) per stage, by depth, as AdaFace's ``get_blocks``.
ADAFACE_STAGES: dict[int, tuple[tuple[int, int, int], ...]] = {
    18: ((64, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 2)),
    34: ((64, 64, 3), (64, 128, 4), (128, 256, 6), (256, 512, 3)),
    50: ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)),
    100: ((64, 64, 3), (64, 128, 13), (128, 256, 30), (256, 512, 3)),
    152: ((64, 256, 3), (256, 512, 8), (512, 1024, 36), (1024, 2048, 3)),
    200: ((64, 256, 3), (256, 512, 24), (512, 1024, 36), (1024, 2048, 3)),
}
#: AdaFace's names: ir_50, ir_101 (100 layers), ir_se_50, ...
ADAFACE_ARCHS = {f"ir{'_se' if se else ''}_{101 if depth == 100 else depth}": (depth, se)
                 for depth in ADAFACE_STAGES for se in (False, True)}


class _SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class _Block(nn.Module):
    """One IR unit: ``res_layer(x) + shortcut_layer(x)``."""

    def __init__(self, in_channel: int, depth: int, stride: int, *, bottleneck: bool, se: bool):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        if bottleneck:
            mid = depth // 4
            layers = [nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid),
                      nn.PReLU(mid), nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
                      nn.Conv2d(mid, depth, 1, stride, 0, bias=False), nn.BatchNorm2d(depth)]
        else:
            layers = [nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False), nn.BatchNorm2d(depth),
                      nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth)]
        self.res_layer = nn.Sequential(*layers)
        if se:
            self.res_layer.add_module("se_block", _SEModule(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(nn.Module):
    """AdaFace's IR / IR-SE backbone (see the module docstring); ``forward`` returns raw features."""

    family = "adaface-ir"

    def __init__(self, depth: int = 50, *, se: bool = False, embedding_size: int = 512,
                 stages: tuple[tuple[int, int, int], ...] | None = None):
        super().__init__()
        stages = stages or ADAFACE_STAGES[depth]
        self.embedding_size = int(embedding_size)
        self.input_layer = nn.Sequential(nn.Conv2d(3, stages[0][0], 3, 1, 1, bias=False), nn.BatchNorm2d(stages[0][0]),
                                         nn.PReLU(stages[0][0]))
        blocks = []
        for in_channel, width, count in stages:
            for i in range(count):
                blocks.append(_Block(in_channel if i == 0 else width, width, 2 if i == 0 else 1,
                                     bottleneck=depth > 100, se=se))
        self.body = nn.Sequential(*blocks)
        out = stages[-1][1]
        self.output_layer = nn.Sequential(nn.BatchNorm2d(out), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(out * 7 * 7, self.embedding_size),
                                          nn.BatchNorm1d(self.embedding_size, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def is_adaface_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return "input_layer.0.weight" in state and "output_layer.3.weight" in state


def _stages_from_state(state: Mapping[str, torch.Tensor]) -> tuple[tuple[tuple[int, int, int], ...], bool, bool]:
    """(stages as (in, depth, units), bottleneck, se) read from the body's weight shapes: a stage
    starts at unit 0 and wherever the width changes (the published widths always grow)."""
    units = sorted({int(key.split(".")[1]) for key in state if key.startswith("body.")})
    if not units or units != list(range(len(units))):
        raise HyperfaceError("an AdaFace IR state dict needs body.0, body.1, ... units")
    bottleneck = "body.0.res_layer.8.weight" in state
    last = 7 if bottleneck else 4  # the unit's last convolution
    stages: list[list[int]] = []
    for unit in units:
        depth = int(state[f"body.{unit}.res_layer.{last}.weight"].shape[0])
        if not stages or depth != stages[-1][1]:
            stages.append([int(state[f"body.{unit}.res_layer.0.weight"].shape[0]), depth, 0])
        stages[-1][2] += 1
    return tuple(tuple(stage) for stage in stages), bottleneck, any(".se_block." in key for key in state)


def infer_adaface_arch(state: Mapping[str, torch.Tensor]) -> str:
    """``ir_50``, ``ir_se_101``, ... from the units per stage, their form and SE blocks."""
    stages, bottleneck, se = _stages_from_state(state)
    counts = tuple(count for _, _, count in stages)
    for depth, published in ADAFACE_STAGES.items():
        if counts == tuple(c for _, _, c in published) and (depth > 100) == bottleneck:
            return f"ir{'_se' if se else ''}_{101 if depth == 100 else depth}"
    raise HyperfaceError(
        f"unknown AdaFace IR layout: units per stage {list(counts)}{' (bottleneck)' if bottleneck else ''}; known: "
        + ", ".join(f"{name} {[c for _, _, c in ADAFACE_STAGES[d]]}" for name, (d, s) in ADAFACE_ARCHS.items() if not s)
    )


def adaface_ir(arch: str = "ir_50", *, embedding_size: int = 512) -> AdaFaceIR:
    if arch not in ADAFACE_ARCHS:
        raise HyperfaceError(f"unknown AdaFace arch {arch!r}; known: {', '.join(ADAFACE_ARCHS)}")
    depth, se = ADAFACE_ARCHS[arch]
    return AdaFaceIR(depth, se=se, embedding_size=embedding_size)


def adaface_ir_from_state_dict(state: Mapping[str, torch.Tensor], *, arch: str | None = None) -> AdaFaceIR:
    """Build the matching AdaFace IR net (depth, widths, SE, embedding size read from the weights)
    and load ``state`` strictly."""
    inferred = infer_adaface_arch(state)
    if arch is not None and arch != inferred:
        raise HyperfaceError(f"the weights are an AdaFace {inferred!r}, not {arch!r}: drop --arch or pass --arch {inferred}")
    stages, _, se = _stages_from_state(state)
    depth, _ = ADAFACE_ARCHS[inferred]
    from hyperface.recognition.backbones import load_state_strict

    model = AdaFaceIR(depth, se=se, embedding_size=int(state["output_layer.3.weight"].shape[0]), stages=stages)
    load_state_strict(model, state, f"AdaFace {inferred!r}")
    model.arch = inferred
    return model


__all__ = ["ADAFACE_ARCHS", "AdaFaceIR", "adaface_ir", "adaface_ir_from_state_dict", "infer_adaface_arch", "is_adaface_state_dict"]
