"""One factory for every backbone family (timm's ``create_model`` in small): build one by name for
training, or rebuild the one a state dict holds, recognised by its keys.

- iResNet (insightface arcface_torch): ``r18`` ... ``r200`` (:mod:`hyperface.recognition.iresnet`);
- MobileFaceNet (arcface_torch): ``mbf``, ``mbf_large`` (:mod:`hyperface.recognition.mobilefacenet`);
- Vision Transformer (arcface_torch): ``vit_t``, ``vit_s``, ``vit_b``, ``vit_l`` and its ``_dp..._mask...``
  training variants (:mod:`hyperface.recognition.vit`);
- AdaFace IR / IR-SE: ``ir_50``, ``ir_se_101``, ... (:mod:`hyperface.recognition.adaface_ir`), loaded
  from AdaFace's weights only (fed BGR; trained by AdaFace's own code).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from hyperface.common.errors import HyperfaceError

def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """``model.load_state_dict(state, strict=True)``, its error as one HyperfaceError line naming ``what``."""
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3] if line.strip())
        raise HyperfaceError(f"state dict does not match {what}: {detail[:400]}{' ...' if len(detail) > 400 else ''}") from exc
    return model


#: What ``hyperface train --arch`` builds.
TRAINABLE_ARCHS = ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "vit_t", "vit_t_dp005_mask0", "vit_s",
                   "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005", "vit_l", "vit_l_dp005_mask_005")


def canonical_arch(arch: str) -> str:
    """The one spelling checkpoints and comparisons use: ``R50`` and ``iresnet50`` are ``r50``."""
    return arch.lower().replace("iresnet", "r") if isinstance(arch, str) else arch


def check_arch(arch: str, *, dropout: float = 0.0) -> str:
    """The family of a trainable arch name ("iresnet", "mobilefacenet" or "vit"), or one error naming the choices."""
    from hyperface.recognition.iresnet import IRESNET_ARCHS
    from hyperface.recognition.mobilefacenet import MBF_ARCHS
    from hyperface.recognition.vit import VIT_ARCHS

    name = canonical_arch(arch)
    if name in MBF_ARCHS or name in VIT_ARCHS:
        if dropout:
            raise HyperfaceError(f"--dropout applies to iResNet's fc layer; {arch} has none (use 0)")
        return "mobilefacenet" if name in MBF_ARCHS else "vit"
    if name in IRESNET_ARCHS:
        return "iresnet"
    raise HyperfaceError(f"unknown --arch {arch!r}: choose one of {', '.join(TRAINABLE_ARCHS)}")


def create_backbone(arch: str, *, embedding_size: int = 512, dropout: float = 0.0, fp16: bool = False) -> nn.Module:
    """A randomly initialised backbone by name (see :data:`TRAINABLE_ARCHS`)."""
    family = check_arch(arch, dropout=dropout)
    if family == "mobilefacenet":
        from hyperface.recognition.mobilefacenet import mobilefacenet

        return mobilefacenet(canonical_arch(arch), embedding_size=embedding_size, fp16=fp16)
    if family == "vit":
        from hyperface.recognition.vit import vit

        return vit(canonical_arch(arch), embedding_size=embedding_size, fp16=fp16)
    from hyperface.recognition.iresnet import iresnet

    return iresnet(arch, embedding_size=embedding_size, dropout=dropout, fp16=fp16)


def backbone_from_state_dict(state: Mapping[str, torch.Tensor], *, arch: str | None = None, fp16: bool = False) -> tuple[nn.Module, str | None]:
    """(the backbone the weights describe, loaded strictly; its arch name), the family read from the keys."""
    from hyperface.recognition.adaface_ir import adaface_ir_from_state_dict, is_adaface_state_dict
    from hyperface.recognition.mobilefacenet import is_mobilefacenet_state_dict, mobilefacenet_from_state_dict
    from hyperface.recognition.vit import is_vit_state_dict, vit_from_state_dict

    arch = canonical_arch(arch) if arch is not None and not arch.lower().startswith("ir_") else arch
    if is_adaface_state_dict(state):
        if fp16:
            raise HyperfaceError("fp16 autocast is for iResNet, MobileFaceNet and ViT files; run an AdaFace IR network in float32")
        model = adaface_ir_from_state_dict(state, arch=arch)
        return model, model.arch
    if is_mobilefacenet_state_dict(state):
        model = mobilefacenet_from_state_dict(state, arch=arch, fp16=fp16)
        return model, model.arch
    if is_vit_state_dict(state):
        model = vit_from_state_dict(state, arch=arch, fp16=fp16)
        return model, model.arch
    from hyperface.recognition.iresnet import infer_arch_or_none, iresnet_from_state_dict

    return iresnet_from_state_dict(state, arch=arch, fp16=fp16), arch or infer_arch_or_none(state)


__all__ = ["TRAINABLE_ARCHS", "backbone_from_state_dict", "canonical_arch", "check_arch", "create_backbone", "load_state_strict"]
