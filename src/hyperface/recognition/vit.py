"""Vision Transformer with insightface arcface_torch's module names (``backbones/vit.py``,
``get_model("vit_t")`` ...): the ViT-T/S/B/L face models of its WebFace42M model zoo.

An arcface_torch ``backbone.pth`` (or ``model.pt`` state dict) of a ``vit_*`` config loads strictly;
the input convention is the iResNet one (float NCHW RGB 112x112, ``(pixel - 127.5) / 127.5``);
``forward`` returns the raw feature.

Layout (width d, depth n, h heads; 112x112 input, no class token)::

    patch_embed.proj  Conv2d 3 -> d, kernel 9 stride 9: 12x12 = 144 patches (the last 4 pixel rows and
                      columns are never seen), flattened to tokens (N, 144, d)
    pos_embed         (1, 144, d), added
    [training, mask_ratio > 0: each sample keeps int(144 * 0.9) = 129 tokens, chosen at random]
    blocks[0..n-1]    x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))
      norm1, norm2    LayerNorm(d)
      attn            qkv Linear(d -> 3d, no bias), h heads, softmax(q k^T / sqrt(d/h)) v in fp32,
                      proj Linear(d -> d)
      mlp             fc1 Linear(d -> 4d) -> ReLU6 -> fc2 Linear(4d -> d)
    norm              LayerNorm(d), in fp32
    [training, masked: mask_token (1, 1, d) fills the dropped places, tokens back in patch order]
    feature           flatten (N, 144 d) -> Linear(144 d -> d, no bias) -> BatchNorm1d(d, eps 2e-5)
                      -> Linear(d -> embedding, no bias) -> BatchNorm1d(embedding, eps 2e-5)

Drop path (stochastic depth) rises linearly over the blocks from 0 to the arch's rate; it and the
masking act in training mode only, so an eval forward is deterministic. arcface_torch's forward calls
its ``random_masking`` without the configured ratio, so its runs mask 10 % of the tokens whenever the
ratio is above 0 (its ``*_mask_005`` configs too). We do the same (:data:`APPLIED_MASK_RATIO`), so a
run here trains as the published models were trained; the ratio only switches masking on.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hyperface.common.errors import HyperfaceError

#: The share of tokens masked in training whenever an arch's ``mask_ratio`` is above 0: arcface_torch
#: calls ``random_masking(x)`` with its default 0.1, never with the configured ratio.
APPLIED_MASK_RATIO = 0.1

IMAGE_SIZE, PATCH_SIZE = 112, 9
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144
_BN_EPS = 2e-5


class ViTArch(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float  # training only: stochastic depth of the last block
    mask_ratio: float  # training only: fraction of the 144 tokens dropped per sample
    using_checkpoint: bool  # training only: activation checkpointing per block (memory for compute)


#: arcface_torch get_model's ViT configs (img 112, patch 9, LayerNorm, mlp ratio 4, no qkv bias). The
#: ``_dp..._mask...`` variants are its WebFace42M settings: the same weights, other training settings.
VIT_ARCHS: dict[str, ViTArch] = {
    "vit_t": ViTArch(256, 12, 8, 0.1, 0.1, False),
    "vit_t_dp005_mask0": ViTArch(256, 12, 8, 0.05, 0.0, False),
    "vit_s": ViTArch(512, 12, 8, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": ViTArch(512, 12, 8, 0.05, 0.0, False),
    "vit_b": ViTArch(512, 24, 8, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": ViTArch(512, 24, 8, 0.05, 0.05, True),
    # arcface_torch names ViT-L only as vit_l_dp005_mask_005; vit_l is that config under its base name
    "vit_l": ViTArch(768, 24, 8, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": ViTArch(768, 24, 8, 0.05, 0.05, True),
    # Test helper only: the same module tree at a fraction of the width and depth.
    "vit_tiny": ViTArch(32, 2, 2, 0.1, 0.1, False),
}

#: The name a state dict infers to, by (embed_dim, depth): the weights do not record drop path,
#: masking or checkpointing, so every variant of a shape infers to its base name.
_BASE_ARCHS: dict[tuple[int, int], str] = {}
for _name, _arch in VIT_ARCHS.items():  # each base name is listed before its variants
    _BASE_ARCHS.setdefault((_arch.embed_dim, _arch.depth), _name)
del _name, _arch


def _fp32_region(device_type: str):
    """Autocast off (when on): arcface_torch computes attention and the head in fp32 under any autocast."""
    return torch.autocast(device_type=device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
        else contextlib.nullcontext()


class _DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``, scale the rest by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class _PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise HyperfaceError(f"the ViT takes {IMAGE_SIZE}x{IMAGE_SIZE} faces, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, d, 12, 12) -> (N, 144, d)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        with _fp32_region(x.device.type):
            q, k, v = qkv.float().unbind(0)
            # softmax(q k^T * scale) v as arcface_torch writes it out, in one fused kernel (no 144 x 144 map kept)
            x = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
            x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(x)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()  # arcface_torch's Mlp/Block default, which VisionTransformer never overrides
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # arcface_torch's order: both norms, attn, drop_path, mlp
        self.norm2 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.drop_path = _DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """arcface_torch's face ViT (see the module docstring); ``forward`` returns raw features.

    Args:
        embed_dim, depth, num_heads: the width, block count and heads (8 in every published config).
        embedding_size: output feature size (arcface_torch's ``num_features``), 512 when published.
        drop_path_rate, mask_ratio, using_checkpoint: training-time settings (see :class:`ViTArch`).
        fp16: run the blocks' linear layers under CUDA fp16 autocast (attention core, final norm and
            head stay fp32), as arcface_torch's ViT always does on CUDA. No effect on CPU tensors.
    """

    family = "vit"

    def __init__(self, embed_dim: int = 512, depth: int = 12, num_heads: int = 8, *, embedding_size: int = 512,
                 drop_path_rate: float = 0.0, mask_ratio: float = 0.0, using_checkpoint: bool = False, fp16: bool = False):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {mask_ratio} is not in [0, 1)")
        self.embed_dim, self.depth, self.num_heads = int(embed_dim), int(depth), int(num_heads)
        self.embedding_size, self.fp16 = int(embedding_size), bool(fp16)
        self.mask_ratio, self.using_checkpoint = float(mask_ratio), bool(using_checkpoint)
        d = self.embed_dim
        self.patch_embed = _PatchEmbed(d)
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PATCHES, d))
        rates = torch.linspace(0, drop_path_rate, self.depth, device="cpu").tolist()  # stochastic depth rises over the blocks
        self.blocks = nn.ModuleList([_Block(d, self.num_heads, rate) for rate in rates])
        self.norm = nn.LayerNorm(d)
        self.feature = nn.Sequential(
            nn.Linear(d * NUM_PATCHES, d, bias=False), nn.BatchNorm1d(d, eps=_BN_EPS),
            nn.Linear(d, self.embedding_size, bias=False), nn.BatchNorm1d(self.embedding_size, eps=_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        # arcface_torch's initialisation, so a run starts where its runs start
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tokens each sample keeps, in shuffled order; the permutation that puts them back)."""
        batch, tokens, dim = x.shape
        keep = int(tokens * (1 - APPLIED_MASK_RATIO))  # arcface_torch's, whatever the configured ratio
        shuffle = torch.rand(batch, tokens, device=x.device).argsort(dim=1)
        return x.gather(1, shuffle[:, :keep, None].expand(-1, -1, dim)), shuffle.argsort(dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) -> the normalised tokens flattened, (N, 144 d) in fp32."""
        x = self.patch_embed(x) + self.pos_embed
        masked = self.training and self.mask_ratio > 0
        if masked:
            x, restore = self._random_masking(x)
        device_type = x.device.type
        own_amp = self.fp16 and device_type == "cuda"  # arcface_torch: the blocks' linear layers in fp16
        with torch.autocast(device_type=device_type, dtype=torch.float16) if own_amp else contextlib.nullcontext():
            for block in self.blocks:
                if self.using_checkpoint and self.training:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        with _fp32_region(device_type):
            x = self.norm(x.float())
            if masked:
                batch, kept, dim = x.shape
                x = torch.cat([x, self.mask_token.expand(batch, NUM_PATCHES - kept, dim).to(x.dtype)], dim=1)
                x = x.gather(1, restore[..., None].expand(-1, -1, dim))
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        with _fp32_region(x.device.type):  # the embedding head in fp32 under any autocast, as for the iResNet
            return self.feature(x)


def vit(arch: str = "vit_t", *, embedding_size: int = 512, fp16: bool = False) -> VisionTransformer:
    """Build an arcface_torch ViT by name: ``vit_t``, ``vit_s``, ``vit_b``, ``vit_l`` or a ``_dp..._mask...`` variant."""
    if arch not in VIT_ARCHS:
        raise HyperfaceError(f"unknown ViT arch {arch!r}; choose one of {', '.join(a for a in VIT_ARCHS if a != 'vit_tiny')}")
    a = VIT_ARCHS[arch]
    model = VisionTransformer(a.embed_dim, a.depth, a.num_heads, embedding_size=embedding_size, drop_path_rate=a.drop_path_rate,
                              mask_ratio=a.mask_ratio, using_checkpoint=a.using_checkpoint, fp16=fp16)
    model.arch = arch
    return model


def is_vit_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return "pos_embed" in state and "patch_embed.proj.weight" in state


def _layout(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(embed_dim, depth, embedding size) read from the weights: pos_embed's width, the blocks' count, the head."""
    pos = state["pos_embed"]
    if pos.ndim != 3 or pos.shape[:2] != (1, NUM_PATCHES) or "feature.2.weight" not in state:
        raise HyperfaceError(
            f"not an arcface_torch 112x112 ViT: pos_embed {tuple(pos.shape)} (expected (1, {NUM_PATCHES}, d): patch 9 on "
            f"112x112){'' if 'feature.2.weight' in state else ', no feature.2.weight'}"
        )
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return int(pos.shape[2]), depth, int(state["feature.2.weight"].shape[0])


def vit_from_state_dict(state: Mapping[str, torch.Tensor], *, arch: str | None = None, fp16: bool = False) -> VisionTransformer:
    """Build the ViT the weights describe (width from ``pos_embed``, depth from the blocks) and load strictly.

    The weights infer to the base name (``vit_t`` ...); a ``_dp..._mask...`` variant of the same shape
    may be named instead (it changes training settings only).
    """
    dim, depth, embedding = _layout(state)
    inferred = _BASE_ARCHS.get((dim, depth))
    if inferred is None:
        known = ", ".join(f"{name} (width {d}, depth {n})" for (d, n), name in _BASE_ARCHS.items() if name != "vit_tiny")
        raise HyperfaceError(f"unknown ViT layout: width {dim}, depth {depth}; known layouts: {known}")
    name = inferred if arch is None else arch
    if arch is not None and (arch not in VIT_ARCHS or VIT_ARCHS[arch][:2] != (dim, depth)):
        raise HyperfaceError(f"the weights are a ViT {inferred!r}, not {arch!r}: drop --arch or pass --arch {inferred}")
    from hyperface.recognition.backbones import load_state_strict

    model = vit(name, embedding_size=embedding, fp16=fp16)
    load_state_strict(model, state, f"ViT {name!r}")
    return model


__all__ = ["VIT_ARCHS", "ViTArch", "VisionTransformer", "is_vit_state_dict", "vit", "vit_from_state_dict"]
