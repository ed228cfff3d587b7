"""Arc2Face (Papantoniou et al., ECCV 2024) on diffusers: loading, identity conditioning, sampling.

Arc2Face is Stable Diffusion 1.5 with a fine-tuned UNet and CLIP text encoder. An ArcFace embedding
(512-d, L2-normalised) is zero-padded to the text encoder's hidden size and *replaces the token
embedding* of the word "id" in the fixed prompt "photo of a id person"; position embeddings are added
afterwards and the text transformer runs as usual. Its last hidden state conditions the UNet.
Classifier-free guidance uses the encoder's output for the empty prompt.

Weights on disk (nothing is downloaded):

- ``--arc2face DIR`` (Hugging Face FoivosPar/Arc2Face): ``encoder/`` (config.json +
  pytorch_model.bin or model.safetensors) and ``arc2face/`` (config.json +
  diffusion_pytorch_model.safetensors);
- ``--sd15 DIR`` (Hugging Face stable-diffusion-v1-5/stable-diffusion-v1-5): ``vae/``,
  ``tokenizer/`` and ``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError, exception_summary
from hyperface.common.io import read_json
from hyperface.common.runtime import get_logger, resolve_device

log = get_logger("hyperface.generation")

ARC2FACE_SOURCE = "the Hugging Face repo FoivosPar/Arc2Face"
SD15_SOURCE = "the Hugging Face repo stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Arc2Face's fixed prompt; the token "id" is where the identity embedding goes.
ARC2FACE_PROMPT = "photo of a id person"
ID_WORD = "id"
IDENTITY_DIM = 512

#: Scheduler names accepted by ``--scheduler`` -> diffusers class name.
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",  # Arc2Face's default
    "dpm-sde": "DPMSolverMultistepScheduler",  # algorithm_type="sde-dpmsolver++"
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lcm": "LCMScheduler",  # with the LCM-LoRA
}

#: torch.compile modes accepted by ``--compile``; the max-autotune ones also set inductor's flags
#: for convolutional UNets (see :func:`tune_inductor_for_unets`).
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
_CUDAGRAPH_MODES = ("max-autotune", "reduce-overhead")

#: SDPA kernels ``--attention`` can put first; "auto" keeps torch's order (flash, memory-efficient,
#: math, cuDNN). A preference, not a restriction: an attention a kernel cannot run (the VAE's head
#: dimension of 512, say) falls back to the next one.
ATTENTION_KERNELS = ("auto", "flash", "cudnn", "efficient")

_WEIGHT_NAMES = {
    "transformers": ("model.safetensors", "pytorch_model.bin"),
    "diffusers": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.bin",
    ),
}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arc2FacePaths:
    """The six folders Arc2Face needs, checked to hold their files."""

    encoder: Path
    unet: Path
    vae: Path
    tokenizer: Path
    scheduler: Path
    unet_variant: str | None = None
    vae_variant: str | None = None


def _require_folder(folder: Path, kind: str, needed: Sequence[str], any_of: Sequence[str], source: str, flag: str) -> str | None:
    """Check ``folder`` holds every file in ``needed`` and one of ``any_of``; return the variant."""
    if not folder.is_dir():
        raise HyperfaceError(
            f"{flag}: missing folder {folder} ({kind}); download it from {source} and pass the folder "
            f"that contains {folder.name}/"
        )
    for name in needed:
        if not (folder / name).is_file():
            raise HyperfaceError(f"{flag}: missing {folder / name} ({kind}); it comes from {source}")
    if not any_of:
        return None
    for name in any_of:
        if (folder / name).is_file():
            return "fp16" if ".fp16." in name else None
    raise HyperfaceError(
        f"{flag}: no weights in {folder} ({kind}): expected {' or '.join(any_of[:2])}; "
        f"download them from {source}"
    )


def weight_files(paths: Arc2FacePaths) -> dict[str, list[Path]]:
    """The files a load reads, by source ("arc2face", "sd15"): configs, the weight file each model
    loads (the first of its names present, as the loaders pick), tokenizer files. What the run's
    fingerprint hashes: an unused fp16 variant or a README beside them does not change it."""

    def model(folder: Path, names: Sequence[str]) -> list[Path]:
        return [folder / "config.json", next(folder / n for n in names if (folder / n).is_file())]

    tokenizer = [paths.tokenizer / n for n in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")]
    return {
        "arc2face": model(paths.encoder, _WEIGHT_NAMES["transformers"]) + model(paths.unet, _WEIGHT_NAMES["diffusers"]),
        "sd15": model(paths.vae, _WEIGHT_NAMES["diffusers"]) + [p for p in tokenizer if p.is_file()]
        + [paths.scheduler / "scheduler_config.json"],
    }


def find_arc2face_files(arc2face_dir: str | Path, sd15_dir: str | Path) -> Arc2FacePaths:
    """Check the on-disk layout and return the component folders, or raise a teaching error."""
    arc2face_dir, sd15_dir = Path(arc2face_dir), Path(sd15_dir)
    for flag, folder, source in (("--arc2face", arc2face_dir, ARC2FACE_SOURCE), ("--sd15", sd15_dir, SD15_SOURCE)):
        if not folder.is_dir():
            raise HyperfaceError(f"{flag} folder not found: {folder}; download it from {source}")
    _require_folder(arc2face_dir / "encoder", "Arc2Face's CLIP text encoder", ["config.json"], _WEIGHT_NAMES["transformers"], ARC2FACE_SOURCE, "--arc2face")
    unet_variant = _require_folder(arc2face_dir / "arc2face", "Arc2Face's UNet", ["config.json"], _WEIGHT_NAMES["diffusers"], ARC2FACE_SOURCE, "--arc2face")
    vae_variant = _require_folder(sd15_dir / "vae", "SD1.5's VAE", ["config.json"], _WEIGHT_NAMES["diffusers"], SD15_SOURCE, "--sd15")
    _require_folder(sd15_dir / "tokenizer", "SD1.5's CLIP tokenizer", ["vocab.json", "merges.txt"], (), SD15_SOURCE, "--sd15")
    _require_folder(sd15_dir / "scheduler", "SD1.5's scheduler config", ["scheduler_config.json"], (), SD15_SOURCE, "--sd15")
    # a config that is not a JSON object sends diffusers/transformers looking for the Hub, and their
    # error blames the network: check each one here and name it
    for config, source in (
        (arc2face_dir / "encoder" / "config.json", ARC2FACE_SOURCE),
        (arc2face_dir / "arc2face" / "config.json", ARC2FACE_SOURCE),
        (sd15_dir / "vae" / "config.json", SD15_SOURCE),
        (sd15_dir / "tokenizer" / "tokenizer_config.json", SD15_SOURCE),
        (sd15_dir / "scheduler" / "scheduler_config.json", SD15_SOURCE),
    ):
        if config.is_file():
            _read_config(config, source)
    return Arc2FacePaths(
        encoder=arc2face_dir / "encoder",
        unet=arc2face_dir / "arc2face",
        vae=sd15_dir / "vae",
        tokenizer=sd15_dir / "tokenizer",
        scheduler=sd15_dir / "scheduler",
        unet_variant=unet_variant,
        vae_variant=vae_variant,
    )


def check_resolution(resolution: int, unet_config: Any, vae_config: Any, *, warn: bool = True) -> None:
    """Refuse a ``--resolution`` the UNet cannot take and warn about one it was not trained at.
    Takes the configs (dicts from config.json, or the models' ``.config``), so the command line
    checks before loading any weights."""

    def get(config: Any, key: str) -> Any:
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    vae_levels, unet_levels = get(vae_config, "block_out_channels"), get(unet_config, "block_out_channels")
    if not vae_levels or not unet_levels:
        return  # an unusual config: the model's own error, if any, comes at the first render
    scale = 2 ** (len(vae_levels) - 1)
    multiple = scale * 2 ** (len(unet_levels) - 1)
    if resolution % multiple:
        raise HyperfaceError(f"--resolution must be a multiple of {multiple}, got {resolution}")
    sample_size = get(unet_config, "sample_size")
    if warn and isinstance(sample_size, int) and resolution != scale * sample_size:
        native = scale * sample_size  # 8 x 64 = 512 for Arc2Face
        log.warning("--resolution %d is not the %d px the UNet was trained at (VAE scale factor %d x UNet sample_size %d): "
                    "it renders, but slower or off-distribution (worse faces); use --resolution %d unless you mean it",
                    resolution, native, scale, sample_size, native)


def _read_config(path: Path, source: str) -> dict[str, Any]:
    try:
        return read_json(path)
    except HyperfaceError as exc:
        raise HyperfaceError(f"{exc.args[0].split(';')[0]}; re-download it from {source}") from None


def resolve_dtype(dtype: str, device) -> Any:
    """``auto``: fp16 on CUDA (Arc2Face's setting), fp32 on CPU; or fp16 / bf16 / fp32 explicitly."""
    import torch

    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise HyperfaceError(f"unknown --dtype {dtype!r}: use auto, fp16, bf16 or fp32")
    if device.type == "cpu" and names[dtype] == torch.float16:
        raise HyperfaceError("--dtype fp16 needs a GPU; on CPU use fp32 or bf16")
    return names[dtype]


@dataclass
class Arc2FaceComponents:
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict


def load_text_encoder(folder: Path) -> tuple[Any, list[str]]:
    """Arc2Face's CLIPTextModel from ``folder``; returns (model, names of weights the file lacked).

    transformers >= 5 reads ``pytorch_model.bin`` with ``torch.load(weights_only=True)`` and refuses
    it on torch < 2.6; then the same safe load is done here (the file's keys are transformers 4.x's
    ``text_model.*``, which are mapped onto the installed version's module names).
    """
    from transformers import CLIPTextModel

    try:
        model, info = CLIPTextModel.from_pretrained(str(folder), output_loading_info=True)
        return model, [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    except ValueError as exc:
        if "torch" not in str(exc) or not (folder / "pytorch_model.bin").is_file():
            raise
    return load_text_encoder_bin(folder)


def load_text_encoder_bin(folder: Path) -> tuple[Any, list[str]]:
    """Build a CLIPTextModel from ``config.json`` and load ``pytorch_model.bin`` with weights_only."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder)))
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    expected = model.state_dict()
    prefixed = any(k.startswith("text_model.") for k in expected)
    remapped = {}
    for key, value in state.items():
        bare = key[len("text_model.") :] if key.startswith("text_model.") else key
        remapped[f"text_model.{bare}" if prefixed else bare] = value
    result = model.load_state_dict(remapped, strict=False)
    missing = [k for k in result.missing_keys if "position_ids" not in k]
    shapes = [k for k, v in remapped.items() if k in expected and expected[k].shape != v.shape]
    if shapes:
        raise ValueError(f"weights with the wrong shape for this config.json, e.g. {shapes[:2]}")
    return model.eval(), missing


def load_arc2face_components(
    arc2face_dir: str | Path, sd15_dir: str | Path, *, device: Any = "cpu", dtype: Any = None
) -> Arc2FaceComponents:
    """Load tokenizer, text encoder, UNet, VAE and scheduler config from local folders."""
    import torch

    paths = find_arc2face_files(arc2face_dir, sd15_dir)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    with _quiet_libraries():
        return _load_components(paths, device, dtype or torch.float32)


def _load_part(what: str, source: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a loading failure turned into an error naming the file's source."""
    try:
        return fn(*args, **kwargs)
    except HyperfaceError:
        raise
    except Exception as exc:  # any loader failure (tokenizers' own errors are bare Exceptions) is the file's
        raise HyperfaceError(f"cannot load {what} ({exception_summary(exc)}); re-download it from {source}") from exc


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """transformers' and diffusers' own loading bars follow ours (HYPERFACE_PROGRESS, a terminal), and
    their advice (e.g. "install accelerate") shows only with HYPERFACE_LOG=DEBUG."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from hyperface.common.runtime import progress_enabled

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        if log.getEffectiveLevel() > 10:  # above DEBUG
            lib.set_verbosity_error()
        if not progress_enabled():
            lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, saved):
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def _load_components(paths: Arc2FacePaths, device, dtype) -> Arc2FaceComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tokenizer = _load_part(f"the tokenizer in {paths.tokenizer}", SD15_SOURCE, CLIPTokenizer.from_pretrained, str(paths.tokenizer))
    text_encoder, missing = _load_part(f"the text encoder in {paths.encoder}", ARC2FACE_SOURCE, load_text_encoder, paths.encoder)
    if missing:
        raise HyperfaceError(
            f"{paths.encoder} is not a CLIP text encoder checkpoint ({len(missing)} missing weights, e.g. "
            f"{sorted(missing)[:2]}); use Arc2Face's encoder/ from {ARC2FACE_SOURCE}"
        )
    # torch_dtype at load time (not .to() afterwards) keeps modules diffusers wants in fp32 in fp32.
    unet = _load_part(
        f"the UNet in {paths.unet}", ARC2FACE_SOURCE, UNet2DConditionModel.from_pretrained, str(paths.unet),
        variant=paths.unet_variant, torch_dtype=dtype,
    )
    vae = _load_part(
        f"the VAE in {paths.vae}", SD15_SOURCE, AutoencoderKL.from_pretrained, str(paths.vae),
        variant=paths.vae_variant, torch_dtype=dtype,
    )
    scheduler_config = _read_config(paths.scheduler / "scheduler_config.json", SD15_SOURCE)

    hidden = text_encoder.config.hidden_size
    if hidden < IDENTITY_DIM:
        raise HyperfaceError(f"text encoder hidden size {hidden} < {IDENTITY_DIM}: {paths.encoder} is not Arc2Face's encoder")
    if unet.config.cross_attention_dim != hidden:
        raise HyperfaceError(
            f"mismatched weights: UNet {paths.unet} expects {unet.config.cross_attention_dim}-d text features but "
            f"the encoder {paths.encoder} gives {hidden}-d; both must come from {ARC2FACE_SOURCE}"
        )
    if unet.config.in_channels != vae.config.latent_channels:
        raise HyperfaceError(
            f"mismatched weights: UNet takes {unet.config.in_channels} latent channels, VAE {paths.vae} makes "
            f"{vae.config.latent_channels}; use SD1.5's vae/ from {SD15_SOURCE}"
        )
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise HyperfaceError(
            f"mismatched weights: tokenizer {paths.tokenizer} has {len(tokenizer)} tokens, the encoder only "
            f"{text_encoder.config.vocab_size}; use SD1.5's tokenizer/ from {SD15_SOURCE}"
        )
    text_encoder.to(dtype=dtype)
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).eval().to(device=device)
    return Arc2FaceComponents(tokenizer, text_encoder, unet, vae, scheduler_config)


# ----------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _replace_token_embeddings(embedding_module, positions, values) -> Iterator[None]:
    """While active, the token-embedding layer's output at ``positions`` (B, L) bool is ``values``.

    Replacing the *output of the token embedding* (not a vocabulary row) is exactly Arc2Face's
    conditioning: positions are added afterwards by the text model itself, and the model's own
    forward keeps the causal mask and final layer norm right in every transformers version.
    """

    def hook(module, inputs, output):
        output = output.clone()
        output[positions] = values.to(output.dtype)
        return output

    handle = embedding_module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Arc2FacePromptEncoder:
    """Turns a batch of identity embeddings into Arc2Face prompt embeddings (B, 77, hidden)."""

    def __init__(self, tokenizer, text_encoder):
        import torch

        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))
        encode = dict(padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        self.prompt_ids = tokenizer(ARC2FACE_PROMPT, **encode).input_ids  # (1, L)
        self.empty_ids = tokenizer("", **encode).input_ids
        id_tokens = tokenizer.encode(ID_WORD, add_special_tokens=False)
        # SD1.5's CLIP tokenizer has "id</w>" as one token: it is the slot the identity goes in. Split
        # into pieces (an empty or foreign merges.txt), the identity would land on a letter and every
        # image would silently come out unconditioned.
        if len(id_tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(id_tokens)
            raise HyperfaceError(
                f"the tokenizer splits {ID_WORD!r} into {len(id_tokens)} tokens {pieces} instead of one (is its "
                f"merges.txt empty or from another model?); use SD1.5's tokenizer/ from {SD15_SOURCE}"
            )
        self.id_token = int(id_tokens[0])
        self.id_position = (self.prompt_ids[0] == self.id_token).nonzero().flatten()
        if self.id_position.numel() != 1:
            raise HyperfaceError(
                f"the prompt {ARC2FACE_PROMPT!r} holds the token {ID_WORD!r} {self.id_position.numel()} times with "
                f"this tokenizer (expected once); use SD1.5's tokenizer/ from {SD15_SOURCE}"
            )
        self.hidden_size = int(text_encoder.config.hidden_size)
        self._unconditional = None
        self._torch = torch

    @property
    def device(self):
        return next(self.text_encoder.parameters()).device

    def _run(self, input_ids):
        out = self.text_encoder(input_ids=input_ids.to(self.device))
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

    def encode(self, embeddings) -> Any:
        """(B, 512) identity embeddings -> (B, L, hidden) conditional prompt embeddings."""
        torch = self._torch
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32) if not torch.is_tensor(embeddings) else embeddings)
        if emb.ndim != 2 or emb.shape[1] != IDENTITY_DIM:
            raise HyperfaceError(f"Arc2Face needs (B, {IDENTITY_DIM}) identity embeddings, got {tuple(emb.shape)}")
        # Arc2Face's demo casts to the pipeline's dtype, then normalises (in fp16 on a GPU): the same
        # order here, so fp16 runs round the identity as it does.
        emb = emb.to(self.device, next(self.text_encoder.parameters()).dtype)
        norms = torch.norm(emb, dim=1, keepdim=True)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            raise HyperfaceError("identity embeddings must be finite and non-zero (Arc2Face normalises each one)")
        padded = torch.nn.functional.pad(emb / norms, (0, self.hidden_size - IDENTITY_DIM))
        ids = self.prompt_ids.expand(emb.shape[0], -1).to(self.device)
        positions = ids == self.id_token
        with torch.inference_mode(), _replace_token_embeddings(self.text_encoder.get_input_embeddings(), positions, padded):
            return self._run(ids)

    def unconditional(self) -> Any:
        """(1, L, hidden): the encoder's output for the empty prompt (cached)."""
        if self._unconditional is None or self._unconditional.device != self.device:
            with self._torch.inference_mode():
                self._unconditional = self._run(self.empty_ids)
        return self._unconditional


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


@dataclass
class Arc2FaceSettings:
    """Sampling settings; the defaults are Arc2Face's own (DPM-Solver++, 25 steps, guidance 3, 512 px).

    With ``lcm_lora`` (a local LCM-LoRA file, e.g. latent-consistency/lcm-lora-sdv1-5's
    pytorch_lora_weights.safetensors) the scheduler becomes LCM and, unless given, steps 4 and
    guidance 1.0.
    """

    steps: int | None = None
    guidance_scale: float | None = None
    resolution: int = 512
    scheduler: str | None = None
    lcm_lora: str | Path | None = None
    lora_scale: float = 1.0
    dtype: str = "auto"
    #: channels_last UNet and VAE: pays off compiled (the layout cannot be fused away eagerly).
    channels_last: bool = False
    compile: bool = False
    #: torch.compile mode for the UNet and the VAE decoder (with ``compile``): "default",
    #: "max-autotune", "max-autotune-no-cudagraphs" or "reduce-overhead"; on a GPU, "max-autotune"
    #: and "reduce-overhead" also capture CUDA graphs.
    compile_mode: str = "default"
    #: One matmul for each self-attention's Q, K, V (and each cross-attention's K, V).
    fuse_qkv: bool = False
    #: SDPA kernel tried first in every attention (:data:`ATTENTION_KERNELS`); "auto" is torch's choice.
    attention: str = "auto"
    vae_batch_size: int = 8  # VAE decode at 512 px is memory-hungry: decode in chunks

    def resolved(self) -> "Arc2FaceSettings":
        lcm = self.lcm_lora is not None
        scheduler = self.scheduler or ("lcm" if lcm else "dpm")
        if scheduler not in SCHEDULERS:
            raise HyperfaceError(f"unknown --scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if scheduler == "lcm" and not lcm:
            raise HyperfaceError("--scheduler lcm needs --lcm-lora FILE (latent-consistency/lcm-lora-sdv1-5)")
        steps = self.steps if self.steps is not None else (4 if lcm else 25)
        guidance = self.guidance_scale if self.guidance_scale is not None else (1.0 if lcm else 3.0)
        if steps < 1:
            raise HyperfaceError(f"--steps must be >= 1, got {steps}")
        if guidance < 1.0:
            raise HyperfaceError(f"--guidance must be >= 1 (1 disables classifier-free guidance), got {guidance}")
        if self.compile_mode not in COMPILE_MODES:
            raise HyperfaceError(f"unknown --compile mode {self.compile_mode!r}; choose from {', '.join(COMPILE_MODES)}")
        if self.attention not in ATTENTION_KERNELS:
            raise HyperfaceError(f"unknown --attention {self.attention!r}; choose from {', '.join(ATTENTION_KERNELS)}")
        return dataclasses.replace(self, steps=steps, guidance_scale=guidance, scheduler=scheduler)


def make_scheduler(name: str, base_config: dict):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    overrides: dict[str, Any] = {}
    if name == "dpm-sde":
        overrides["algorithm_type"] = "sde-dpmsolver++"
    if name in ("dpm", "dpm-sde"):
        # Arc2Face was published with diffusers 0.22.0 pinned (0.23.0 from its LCM-LoRA update), whose
        # DPM-Solver ends at sigma_min with a second-order step; diffusers >= 0.27 (Arc2Face's 2025 pin
        # 0.29.2 among them) end at sigma 0 with a first-order one by default. "sigma_min" reproduces
        # 0.22's and 0.23's timesteps and updates exactly.
        overrides["final_sigmas_type"] = "sigma_min"
    return cls.from_config(base_config, **overrides)


def lcm_timesteps(config: Any, steps: int) -> list[int]:
    """LCM's timesteps for ``steps`` steps as diffusers 0.23.0 chose them, the version Arc2Face pinned
    when it published its LCM-LoRA recipe: of the distillation schedule (k - 1, 2k - 1, ..., 999, with
    k = 1000 // 50), every ``50 // steps``-th from the last. diffusers >= 0.27 spreads them evenly
    instead: 4 steps are [999, 759, 499, 259] there, [999, 759, 519, 279] in Arc2Face's recipe (2 steps
    agree: [999, 499])."""
    original = int(config["original_inference_steps"])
    if steps > original:
        raise HyperfaceError(f"--steps {steps} with LCM: the LCM-LoRA was distilled on {original} timesteps, so at "
                             f"most {original} steps (it is made for 2-8)")
    k = int(config["num_train_timesteps"]) // original
    distilled = np.arange(1, original + 1) * k - 1
    return [int(t) for t in distilled[:: -(original // steps)][:steps]]


def set_timesteps(scheduler: Any, name: str, steps: int, device: Any = None) -> None:
    """``scheduler.set_timesteps(steps)``, LCM's spaced as in Arc2Face's recipe (:func:`lcm_timesteps`)."""
    if name == "lcm":
        scheduler.set_timesteps(timesteps=lcm_timesteps(scheduler.config, steps), device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def sampler_facts(settings: Arc2FaceSettings, dtype: Any) -> dict[str, Any]:
    """The settings that decide every image (a resumed run must keep them), known before loading."""
    s = settings.resolved()
    return {
        "generator": "arc2face",
        "scheduler": s.scheduler,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "resolution": s.resolution,
        "dtype": str(dtype).replace("torch.", ""),
        # LCM's spacing became Arc2Face's (diffusers 0.23.0's) after runs were made without it: a
        # resume of such a run is refused, naming this
        **({"lcm_timesteps": "diffusers 0.23.0"} if s.scheduler == "lcm" else {}),
    }


class Arc2FaceGenerator:
    """Arc2Face behind :class:`~hyperface.generation.base.IdentityGenerator`.

    One call renders many identities at once: classifier-free guidance runs as ONE UNet forward on
    the concatenated [unconditional, conditional] batch; each image's initial latents come from its
    own CPU ``torch.Generator`` seeded with its seed, so results do not depend on batch composition.
    """

    embedding_dim = IDENTITY_DIM

    def __init__(
        self, components: Arc2FaceComponents, settings: Arc2FaceSettings | None = None, *, device: Any = "cpu",
        warn_resolution: bool = True,
    ):
        """``warn_resolution=False``: the caller has warned about a non-native resolution already
        (:func:`check_resolution` on the config files, as the command line does before loading)."""
        import torch

        self.settings = (settings or Arc2FaceSettings()).resolved()
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.unet = components.unet
        self.vae = components.vae
        self.scheduler_config = dict(components.scheduler_config)
        self.prompt_encoder = Arc2FacePromptEncoder(self.tokenizer, self.text_encoder)
        self.dtype = self.unet.dtype
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(self.settings.resolution)
        check_resolution(self.resolution, self.unet.config, self.vae.config, warn=warn_resolution)
        if self.settings.lcm_lora is not None:
            from hyperface.generation.lora import fuse_lora_into_unet

            touched = fuse_lora_into_unet(self.unet, self.settings.lcm_lora, scale=self.settings.lora_scale)
            log.info("fused LCM-LoRA %s into %d UNet layers", self.settings.lcm_lora, touched)
        if self.settings.fuse_qkv:  # after the LoRA fusion above, which writes to_q / to_k / to_v
            # diffusers' fused projections, with its fused SDPA processor; the unfused weights stay.
            self.unet.fuse_qkv_projections()
            self.vae.fuse_qkv_projections()
        else:
            self._set_fast_attention()
        if self.settings.channels_last:
            if not self.settings.compile:
                # Measured: eager, GroupNorm converts layouts around itself (a quarter of the H100's
                # time in its profile; 10% slower on an H200); compiled, the layout pays off.
                log.warning("--channels-last without --compile slows the sampler (eager GroupNorm converts layouts; "
                            "measured 10%% slower on an H200): use it with --compile")
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self._unet_forward = self.unet
        self._vae_decode = self.vae.decode
        self._largest_batch = 0
        mode = self.settings.compile_mode
        self._cudagraphs = self.settings.compile and mode in _CUDAGRAPH_MODES and self.device.type == "cuda"
        if self.settings.compile:
            if mode.startswith("max-autotune"):
                tune_inductor_for_unets()
            compile_kwargs = {} if mode == "default" else {"mode": mode}
            self._unet_forward = torch.compile(self.unet, **compile_kwargs)
            self._vae_decode = torch.compile(self.vae.decode, **compile_kwargs)
        # Make the scheduler once up front so a bad name or step count fails before any work.
        set_timesteps(make_scheduler(self.settings.scheduler, self.scheduler_config), self.settings.scheduler, self.settings.steps)

    @classmethod
    def from_pretrained(
        cls,
        arc2face_dir: str | Path,
        sd15_dir: str | Path,
        settings: Arc2FaceSettings | None = None,
        *,
        device: Any = "auto",
        warn_resolution: bool = True,
    ) -> "Arc2FaceGenerator":
        device = resolve_device(device) if isinstance(device, str) else device
        settings = (settings or Arc2FaceSettings()).resolved()
        dtype = resolve_dtype(settings.dtype, device)
        components = load_arc2face_components(arc2face_dir, sd15_dir, device=device, dtype=dtype)
        return cls(components, settings, device=device, warn_resolution=warn_resolution)

    def _set_fast_attention(self) -> None:
        """PyTorch SDPA (flash / memory-efficient kernels on GPU) in every UNet and VAE attention."""
        try:
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
            self.vae.set_attn_processor(AttnProcessor2_0())
        except (ImportError, ValueError, AttributeError) as exc:  # pragma: no cover - old diffusers
            log.warning("could not select SDPA attention (%s); using diffusers' default", exc)

    @property
    def captures_cuda_graphs(self) -> bool:
        """True with a CUDA-graph compile mode on a GPU (the dataset runner then does not overlap)."""
        return bool(self._cudagraphs)

    @property
    def params(self) -> dict:
        s = self.settings
        return {
            **sampler_facts(s, self.dtype),
            "lcm_lora": str(s.lcm_lora) if s.lcm_lora else None,
            "lora_scale": s.lora_scale if s.lcm_lora else None,
            "channels_last": s.channels_last,
            "compile": s.compile_mode if s.compile else False,
            "fuse_qkv": s.fuse_qkv,
            "attention": s.attention,
        }

    def initial_latents(self, seeds: Sequence[int]):
        """(B, C, h, w) float32 latents, row i drawn from a CPU generator seeded with seeds[i]."""
        import torch

        side = self.resolution // self.vae_scale_factor
        shape = (self.unet.config.in_channels, side, side)
        generators = [torch.Generator("cpu").manual_seed(int(s) % (2**63)) for s in seeds]
        latents = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        return latents, generators

    def generate(self, embeddings: np.ndarray, seeds: Sequence[int]) -> list[np.ndarray]:
        return list(self.generate_array(embeddings, seeds))

    def generate_array(self, embeddings: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """(B, 512) embeddings + B seeds -> (B, H, W, 3) uint8 RGB."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if len(embeddings) != len(seeds):
            raise ValueError(f"{len(embeddings)} embeddings but {len(seeds)} seeds")
        if len(seeds) == 0:
            return np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        count = len(seeds)
        if self.settings.compile:
            # A compiled UNet recompiles for every new batch shape: pad smaller batches (a shard's
            # last one, retry rounds) to the largest seen. Rows are independent, so padding is inert.
            self._largest_batch = max(self._largest_batch, count)
            if count < self._largest_batch:
                extra = self._largest_batch - count
                embeddings = np.concatenate([embeddings, np.repeat(embeddings[:1], extra, axis=0)])
                seeds = list(seeds) + [seeds[0]] * extra
        return self._sample(embeddings, seeds)[:count]

    def _sample(self, embeddings: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        import torch

        settings = self.settings
        # The kernel preference must hold while a compiled graph is traced, too: inductor picks the
        # SDPA kernel then.
        with torch.inference_mode(), attention_preference(settings.attention):
            cond = self.prompt_encoder.encode(embeddings).to(self.dtype)
            batch = cond.shape[0]
            guided = settings.guidance_scale > 1.0
            if guided:
                uncond = self.prompt_encoder.unconditional().to(self.dtype).expand(batch, -1, -1)
                prompt = torch.cat([uncond, cond])
            else:
                prompt = cond
            scheduler = make_scheduler(settings.scheduler, self.scheduler_config)
            set_timesteps(scheduler, settings.scheduler, settings.steps, device=self.device)
            latents, generators = self.initial_latents(seeds)
            latents = latents.to(self.device) * scheduler.init_noise_sigma
            step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
            for t in scheduler.timesteps:
                model_in = torch.cat([latents, latents]) if guided else latents
                model_in = scheduler.scale_model_input(model_in, t).to(self.dtype)
                if settings.channels_last:
                    model_in = model_in.contiguous(memory_format=torch.channels_last)
                if self._cudagraphs:  # each step is a new graph replay; outputs are copied out below
                    torch.compiler.cudagraph_mark_step_begin()
                noise = self._unet_forward(model_in, t, encoder_hidden_states=prompt, return_dict=False)[0]
                noise = noise.to(torch.float32, copy=True) if self._cudagraphs else noise.float()
                if guided:
                    noise_uncond, noise_cond = noise.chunk(2)
                    noise = noise_uncond + settings.guidance_scale * (noise_cond - noise_uncond)
                latents = scheduler.step(noise, t, latents, return_dict=False, **step_kwargs)[0].float()
            return self.decode(latents)

    def decode(self, latents) -> np.ndarray:
        import torch

        images = []
        scale = self.vae.config.scaling_factor
        vae_dtype = self.vae.dtype
        # Chunks no larger than the batch: a compiled decoder pads each chunk to this one size.
        step = max(1, min(self.settings.vae_batch_size, latents.shape[0]))
        for start in range(0, latents.shape[0], step):
            chunk = (latents[start : start + step] / scale).to(vae_dtype)
            count = chunk.shape[0]
            if self.settings.compile and count < step:  # one shape for the compiled decoder (rows are independent)
                chunk = torch.cat([chunk, chunk[:1].expand(step - count, -1, -1, -1)])
            if self.settings.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            pixels = self._vae_decode(chunk, return_dict=False)[0][:count].float()
            finite = torch.isfinite(pixels).flatten(1).all(1).cpu()  # NaN would clamp to a black image, silently
            if not bool(finite.all()):
                raise HyperfaceError(
                    f"the generator produced NaN/inf pixels for {int((~finite).sum())} of {count} images: fp16 overflow "
                    "(try --dtype fp32) or NaN in the weights (the UNet, VAE or --lcm-lora file); the identities "
                    "finished so far are kept"
                )
            pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(images)


def attention_preference(kernel: str):
    """Context in which SDPA tries ``kernel`` first ("auto": torch's own order, unchanged)."""
    import contextlib

    if kernel == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    order = [backends[kernel]] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                                              SDPBackend.CUDNN_ATTENTION) if b != backends[kernel]]
    return sdpa_kernel(order, set_priority=True)


def tune_inductor_for_unets() -> None:
    """Inductor flags diffusers recommends for compiled convolutional UNets (process-wide).

    1x1 convolutions as matmuls, coordinate-descent tuning of the generated kernels, and no epilogue
    fusion (which otherwise keeps matmul epilogues from using the fastest templates).
    """
    import torch._inductor.config as inductor_config

    inductor_config.conv_1x1_as_mm = True
    inductor_config.coordinate_descent_tuning = True
    inductor_config.coordinate_descent_check_all_directions = True
    inductor_config.epilogue_fusion = False


__all__ = [
    "ARC2FACE_PROMPT",
    "ARC2FACE_SOURCE",
    "ATTENTION_KERNELS",
    "Arc2FaceComponents",
    "Arc2FaceGenerator",
    "Arc2FacePaths",
    "Arc2FacePromptEncoder",
    "Arc2FaceSettings",
    "COMPILE_MODES",
    "SCHEDULERS",
    "SD15_SOURCE",
    "attention_preference",
    "check_resolution",
    "find_arc2face_files",
    "lcm_timesteps",
    "load_arc2face_components",
    "make_scheduler",
    "resolve_dtype",
    "set_timesteps",
    "tune_inductor_for_unets",
]
