"""Fuse a UNet LoRA (e.g. LCM-LoRA for SD1.5) from a local .safetensors file into the weights.

diffusers' own LoRA loader needs the ``peft`` package; fusing ``W += scale * alpha/rank * up @ down``
directly needs nothing else, works offline, and leaves no adapter overhead at inference time.

Key layouts understood:

- kohya: ``lora_unet_<module_path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, with diffusers module names or the original SD UNet's (``input_blocks_4_1_...``);
- diffusers/peft: ``unet.<module.path>.lora_A.weight`` / ``.lora_B.weight`` (optional ``.alpha``),
  and older diffusers' ``unet.<module.path>.lora.down.weight`` / ``.lora.up.weight``.

Text-encoder entries are skipped: Arc2Face's text encoder is its own fine-tune, not SD1.5's.
"""

from __future__ import annotations

from pathlib import Path

from hyperface.common.errors import HyperfaceError, exception_summary

LCM_LORA_SOURCE = "the Hugging Face repo latent-consistency/lcm-lora-sdv1-5 (pytorch_lora_weights.safetensors)"


#: Original (LDM/SGM) UNet names -> diffusers names, in kohya's underscore spelling; applied after
#: diffusers' own block-index remapping (``_maybe_map_sgm_blocks_to_diffusers``).
_SGM_RENAMES = [
    (r"^input_blocks_0_0$", "conv_in"),
    (r"^out_2$", "conv_out"),
    (r"^time_embed_0$", "time_embedding_linear_1"),
    (r"^time_embed_2$", "time_embedding_linear_2"),
    (r"^input_blocks_", "down_blocks_"),
    (r"^middle_block_", "mid_block_"),
    (r"^output_blocks_", "up_blocks_"),
    (r"_in_layers_2$", "_conv1"),
    (r"_out_layers_3$", "_conv2"),
    (r"_emb_layers_1$", "_time_emb_proj"),
    (r"_skip_connection$", "_conv_shortcut"),
    (r"_downsamplers_0_op$", "_downsamplers_0_conv"),
]


def _map_sgm_names(state: dict, unet_config) -> dict:
    """Rename kohya LoRA keys written against the original SD UNet (input_blocks/middle_block/
    output_blocks) to diffusers module names (still underscore-joined)."""
    import re

    sgm = ("input_blocks", "middle_block", "output_blocks", "time_embed_", "lora_unet_out_2")
    if not any(key.startswith("lora_unet_") and any(p in key for p in sgm) for key in state):
        return state
    try:
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
    except ImportError as exc:  # pragma: no cover - very old or very new diffusers
        raise HyperfaceError(
            "this LoRA uses the original SD UNet's layer names and the installed diffusers cannot map them; "
            "convert it to diffusers names (or use latent-consistency/lcm-lora-sdv1-5)"
        ) from exc
    unet_only = {k: v for k, v in state.items() if k.startswith("lora_unet_")}
    others = {k: v for k, v in state.items() if not k.startswith("lora_unet_")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(unet_only), unet_config)
    renamed = {}
    for key, value in mapped.items():
        stem, dot, kind = key[len("lora_unet_") :].partition(".")
        for pattern, replacement in _SGM_RENAMES:
            stem = re.sub(pattern, replacement, stem)
        renamed[f"lora_unet_{stem}{dot}{kind}"] = value
    return {**renamed, **others}


def _group_lora_tensors(state: dict, module_names: dict[str, str]) -> dict[str, dict]:
    """{unet module name: {"down": T, "up": T, "alpha": float|None}}."""
    groups: dict[str, dict] = {}
    suffixes = (
        (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # peft
        (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # older diffusers
        (".lora_down.weight", "down"), (".lora_up.weight", "up"),  # kohya
        (".alpha", "alpha"),
    )
    for key, tensor in state.items():
        if key.startswith(("lora_te", "text_encoder.")):
            continue  # text-encoder parts: Arc2Face's encoder is not SD1.5's, never apply them
        module = part = None
        for suffix, name in suffixes:
            if key.endswith(suffix):
                stem, part = key[: -len(suffix)], name
                if stem.startswith("lora_unet_"):
                    module = module_names.get(stem[len("lora_unet_") :])
                elif stem.startswith("unet."):
                    module = stem[len("unet.") :]
                break
        if module is None or part is None:
            raise HyperfaceError(f"LoRA key {key!r} matches no UNet layer; give a UNet LoRA for SD1.5 such as {LCM_LORA_SOURCE}")
        groups.setdefault(module, {})[part] = tensor
    return groups


def check_lora_file(path: str | Path) -> Path:
    """The cheap checks of a LoRA file, from its header alone (the CLI runs them before hashing and
    loading any weights): it is there, a readable .safetensors, and holds LoRA tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HyperfaceError(f"--lcm-lora file not found: {path}; download it from {LCM_LORA_SOURCE}")
    if path.suffix != ".safetensors":
        raise HyperfaceError(f"--lcm-lora must be a .safetensors file, got {path.name}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise HyperfaceError(f"cannot read LoRA file {path} ({exception_summary(exc)}); re-download it from {LCM_LORA_SOURCE}") from exc
    if not any("lora" in key.lower() for key in keys):
        raise HyperfaceError(f"{path} holds no LoRA tensors ({len(keys)} other tensors); give a UNet LoRA such as {LCM_LORA_SOURCE}")
    return path


def fuse_lora_into_unet(unet, path: str | Path, *, scale: float = 1.0) -> int:
    """Add the LoRA in ``path`` to ``unet``'s weights in place; return the number of layers changed."""
    import torch

    from hyperface.common.io import load_safetensors

    path = check_lora_file(path)
    state = load_safetensors(path, hint=f"re-download it from {LCM_LORA_SOURCE}")
    modules = dict(unet.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules if name}
    groups = _group_lora_tensors(_map_sgm_names(state, unet.config), underscored)
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


__all__ = ["LCM_LORA_SOURCE", "check_lora_file", "fuse_lora_into_unet"]
