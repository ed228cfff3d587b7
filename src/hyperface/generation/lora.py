"""Fuse a UNet LoRA (e.g. LCM-LoRA for SD1.5) from a local .safetensors file into the weights.

diffusers' own LoRA loader needs the ``peft`` package; fusing ``W += scale * alpha/rank * up @ down``
directly needs nothing else, works offline, and leaves no adapter overhead at inference time.

Key layouts understood:

- kohya (what latent-consistency/lcm-lora-sdv1-5 ships): ``lora_unet_<module_path_with_underscores>
  .lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
- diffusers/peft: ``unet.<module.path>.lora_A.weight`` / ``.lora_B.weight`` (optional ``.alpha``).
"""

from __future__ import annotations

from pathlib import Path

from hyperface.common.errors import HyperfaceError

LCM_LORA_SOURCE = "the Hugging Face repo latent-consistency/lcm-lora-sdv1-5 (pytorch_lora_weights.safetensors)"


def _group_lora_tensors(state: dict, module_names: dict[str, str]) -> dict[str, dict]:
    """{unet module name: {"down": T, "up": T, "alpha": float|None}}."""
    groups: dict[str, dict] = {}
    skipped_text = 0
    for key, tensor in state.items():
        if key.startswith("lora_te") or key.startswith("text_encoder."):
            skipped_text += 1
            continue
        if key.startswith("lora_unet_"):
            stem, _, kind = key[len("lora_unet_") :].partition(".")
            module = module_names.get(stem)
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(kind)
        elif key.startswith("unet."):
            body = key[len("unet.") :]
            part = None
            for suffix, name in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
                if body.endswith(suffix):
                    module, part = body[: -len(suffix)], name
                    break
            else:
                module = None
        else:
            module, part = None, None
        if module is None or part is None:
            raise HyperfaceError(f"LoRA key {key!r} matches no UNet layer; give a UNet LoRA for SD1.5 such as {LCM_LORA_SOURCE}")
        groups.setdefault(module, {})[part] = tensor
    return groups


def fuse_lora_into_unet(unet, path: str | Path, *, scale: float = 1.0) -> int:
    """Add the LoRA in ``path`` to ``unet``'s weights in place; return the number of layers changed."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HyperfaceError(f"--lcm-lora file not found: {path}; download it from {LCM_LORA_SOURCE}")
    if path.suffix != ".safetensors":
        raise HyperfaceError(f"--lcm-lora must be a .safetensors file, got {path.name}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise HyperfaceError(f"cannot read LoRA file {path} ({exc}); re-download it from {LCM_LORA_SOURCE}") from exc
    modules = dict(unet.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules if name}
    groups = _group_lora_tensors(state, {**underscored, **{n: n for n in modules}})
    touched = 0
    with torch.no_grad():
        for name, parts in groups.items():
            if name not in modules or "down" not in parts or "up" not in parts:
                raise HyperfaceError(f"LoRA file {path} has an incomplete or unknown entry for UNet layer {name!r}")
            layer = modules[name]
            weight = layer.weight
            down, up = parts["down"].float(), parts["up"].float()
            rank = down.shape[0]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
            delta = up.flatten(1) @ down.flatten(1)  # (out, in * kh * kw)
            if delta.numel() != weight.numel():
                raise HyperfaceError(
                    f"LoRA layer {name!r} in {path} has shape {tuple(delta.shape)}, the UNet weight {tuple(weight.shape)}: "
                    "the LoRA is for another model (use the SD1.5 LCM-LoRA)"
                )
            delta = delta.reshape(weight.shape) * (scale * alpha / rank)
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
            touched += 1
    if touched == 0:
        raise HyperfaceError(f"LoRA file {path} holds no UNet layers; give a UNet LoRA such as {LCM_LORA_SOURCE}")
    return touched


__all__ = ["LCM_LORA_SOURCE", "fuse_lora_into_unet"]
