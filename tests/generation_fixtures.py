"""Tiny random-weight Arc2Face and Stable Diffusion 1.5 folders in the real on-disk layouts.

The shapes that the conditioning depends on are real (text hidden size 768, identity embedding 512,
77-token prompts, UNet cross-attention dim 768); everything else (layers, heads, channels, vocabulary,
resolution) is shrunk so a whole generation run takes seconds on a CPU.

Layouts written (the Hugging Face FoivosPar/Arc2Face and stable-diffusion-v1-5 repositories):

    arc2face/encoder/config.json, pytorch_model.bin          (CLIPTextModel, keys "text_model.*",
                                                               as transformers 4.x saved Arc2Face's)
    arc2face/arc2face/config.json, diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
    sd15/vae/config.json, diffusion_pytorch_model.safetensors            (AutoencoderKL)
    sd15/tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    sd15/scheduler/scheduler_config.json                                 (SD1.5's PNDM config)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Merges that build the words of Arc2Face's prompt from CLIP's byte-level symbols.
PROMPT_MERGES = [
    ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"),  # photo
    ("o", "f</w>"),  # of
    ("i", "d</w>"),  # id
    ("p", "e"), ("pe", "r"), ("per", "s"), ("pers", "o"), ("perso", "n</w>"),  # person
]

#: Image side the tiny models render at (the VAE below downsamples by 2, so latents are 16x16).
TINY_RESOLUTION = 32


def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode symbol table, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_tokenizer(folder: Path) -> int:
    """Write SD1.5-style tokenizer files; return the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in PROMPT_MERGES]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in PROMPT_MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return len(vocab)


def write_tiny_encoder(folder: Path, vocab_size: int, seed: int = 0) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=768,  # real: the 512-d identity is zero-padded to this
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=768,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    config.architectures = ["CLIPTextModel"]
    model = CLIPTextModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    # Arc2Face's pytorch_model.bin was written by transformers 4.x: keys under "text_model.".
    state = {f"text_model.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")


def write_tiny_unet(folder: Path, seed: int = 1) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(folder, safe_serialization=True)


def write_tiny_vae(folder: Path, seed: int = 2) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_RESOLUTION,
    )
    vae.save_pretrained(folder, safe_serialization=True)


def write_sd15_scheduler(folder: Path) -> None:
    """SD1.5's own scheduler_config.json (a PNDM config; the loader converts it)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


@dataclass(frozen=True)
class TinyModels:
    arc2face_dir: Path
    sd15_dir: Path
    resolution: int = TINY_RESOLUTION


def build_tiny_models(root: Path) -> TinyModels:
    root = Path(root)
    arc2face, sd15 = root / "Arc2Face", root / "stable-diffusion-v1-5"
    vocab_size = write_tiny_tokenizer(sd15 / "tokenizer")
    write_tiny_encoder(arc2face / "encoder", vocab_size)
    write_tiny_unet(arc2face / "arc2face")
    write_tiny_vae(sd15 / "vae")
    write_sd15_scheduler(sd15 / "scheduler")
    return TinyModels(arc2face_dir=arc2face, sd15_dir=sd15)


def random_identities(n: int, seed: int = 0, dim: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_kohya_lora(path: Path, unet, rank: int = 2, seed: int = 3) -> dict[str, float]:
    """A LoRA file in the kohya layout LCM-LoRA uses ("lora_unet_<module>.lora_down/up.weight",
    ".alpha") touching every attention projection of ``unet``; returns {module_name: alpha/rank}."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors, scales = {}, {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.1
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
            scales[name] = 0.5
    save_file(tensors, str(path))
    return scales


_CACHE: dict[str, object] = {}


def session_tiny_models() -> TinyModels:
    """Build the tiny model folders once per test process (shared by every generation test module)."""
    if "models" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="hyperface-tiny-arc2face-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE["models"] = build_tiny_models(root)
    return _CACHE["models"]  # type: ignore[return-value]


def session_tiny_generator(steps: int = 2):
    """An Arc2FaceGenerator on the tiny models (CPU, fp32, 32 px, ``steps`` DPM-Solver steps), cached."""
    key = f"generator-{steps}"
    if key not in _CACHE:
        from hyperface.generation.arc2face import Arc2FaceGenerator, Arc2FaceSettings

        models = session_tiny_models()
        settings = Arc2FaceSettings(steps=steps, resolution=models.resolution)
        _CACHE[key] = Arc2FaceGenerator.from_pretrained(models.arc2face_dir, models.sd15_dir, settings, device="cpu")
    return _CACHE[key]
