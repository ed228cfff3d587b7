"""Arc2Face on tiny random-weight models saved in the real folder layouts: loading, conditioning,
sampling determinism, LCM-LoRA, intra-class variation."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from generation_fixtures import random_identities, session_tiny_generator, session_tiny_models, write_kohya_lora

from hyperface.common.errors import HyperfaceError
from hyperface.generation.arc2face import (
    ARC2FACE_PROMPT,
    SCHEDULERS,
    Arc2FaceGenerator,
    Arc2FacePromptEncoder,
    Arc2FaceSettings,
    find_arc2face_files,
    load_arc2face_components,
    lcm_timesteps,
    make_scheduler,
    sampler_facts,
    set_timesteps,
)
from hyperface.generation.base import IdentityGenerator
from hyperface.generation.lora import fuse_lora_into_unet
from hyperface.generation.variation import Perturbation, image_seed


@pytest.fixture(scope="module")
def models():
    return session_tiny_models()


@pytest.fixture(scope="module")
def generator():
    return session_tiny_generator()


def _copy_models(models, tmp_path):
    arc2face, sd15 = tmp_path / "Arc2Face", tmp_path / "sd15"
    shutil.copytree(models.arc2face_dir, arc2face)
    shutil.copytree(models.sd15_dir, sd15)
    return arc2face, sd15


# --- loading -------------------------------------------------------------------------------------


def test_loader_reads_the_real_layout(models, generator):
    paths = find_arc2face_files(models.arc2face_dir, models.sd15_dir)
    assert paths.encoder.name == "encoder" and paths.unet.name == "arc2face"
    # The encoder weights are the ones in encoder/pytorch_model.bin (keys under "text_model.").
    saved = torch.load(models.arc2face_dir / "encoder" / "pytorch_model.bin", weights_only=True)
    loaded = generator.text_encoder.get_input_embeddings().weight
    assert torch.equal(loaded, saved["text_model.embeddings.token_embedding.weight"])
    assert generator.unet.config.cross_attention_dim == 768
    # SD1.5's scheduler_config.json is a PNDM config; Arc2Face samples with DPM-Solver++.
    assert type(make_scheduler(generator.settings.scheduler, generator.scheduler_config)).__name__ == "DPMSolverMultistepScheduler"
    assert isinstance(generator, IdentityGenerator)


def test_bin_fallback_loader_matches_from_pretrained(models, generator):
    """The weights_only path used when transformers refuses .bin files (torch < 2.6) loads the same model."""
    from hyperface.generation.arc2face import load_text_encoder_bin

    model, missing = load_text_encoder_bin(models.arc2face_dir / "encoder")
    assert missing == []
    ids = generator.prompt_encoder.prompt_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, generator.text_encoder(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("Arc2Face/encoder/pytorch_model.bin", ["encoder", "pytorch_model.bin", "FoivosPar/Arc2Face"]),
        ("Arc2Face/arc2face", ["arc2face", "FoivosPar/Arc2Face"]),
        ("sd15/vae/config.json", ["vae", "config.json", "stable-diffusion-v1-5/stable-diffusion-v1-5"]),
        ("sd15/tokenizer/merges.txt", ["merges.txt", "stable-diffusion-v1-5"]),
        ("sd15/scheduler", ["scheduler", "stable-diffusion-v1-5"]),
    ],
)
def test_missing_files_name_the_file_and_its_source(models, tmp_path, remove, expected):
    arc2face, sd15 = _copy_models(models, tmp_path)
    target = tmp_path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(HyperfaceError) as info:
        find_arc2face_files(arc2face, sd15)
    for word in expected:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "config, source",
    [
        ("Arc2Face/encoder/config.json", "FoivosPar/Arc2Face"),
        ("Arc2Face/arc2face/config.json", "FoivosPar/Arc2Face"),
        ("sd15/vae/config.json", "stable-diffusion-v1-5"),
        ("sd15/scheduler/scheduler_config.json", "stable-diffusion-v1-5"),
    ],
)
@pytest.mark.parametrize("text", ["[1, 2]", "{not json"])
def test_a_damaged_config_is_named_before_any_model_loads(models, tmp_path, config, source, text):
    """Not a network error from diffusers: the file, what is wrong with it, where it comes from."""
    arc2face, sd15 = _copy_models(models, tmp_path)
    (tmp_path / config).write_text(text, encoding="utf-8")
    with pytest.raises(HyperfaceError, match="damaged") as info:
        find_arc2face_files(arc2face, sd15)
    assert str(tmp_path / config) in str(info.value) and source in str(info.value)


def test_swapped_folders_are_explained(models):
    with pytest.raises(HyperfaceError, match="FoivosPar/Arc2Face"):
        find_arc2face_files(models.sd15_dir, models.arc2face_dir)


def test_mismatched_encoder_checkpoint_is_refused(models, tmp_path):
    arc2face, sd15 = _copy_models(models, tmp_path)
    config_path = arc2face / "encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] += 1  # the checkpoint lacks this layer's weights
    config_path.write_text(json.dumps(config))
    with pytest.raises(HyperfaceError, match="encoder"):
        load_arc2face_components(arc2face, sd15)


def test_mismatched_unet_is_refused(models, tmp_path):
    arc2face, sd15 = _copy_models(models, tmp_path)
    config_path = sd15 / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["latent_channels"] = 8  # weights no longer fit: a clear error, not a traceback
    config_path.write_text(json.dumps(config))
    with pytest.raises(HyperfaceError, match="VAE"):
        load_arc2face_components(arc2face, sd15)


@pytest.mark.parametrize("merges", ["", "#version: 0.2\n"])
def test_a_tokenizer_that_splits_id_is_refused(models, tmp_path, merges):
    """With no merges "id" becomes "i" + "d</w>": the identity would land on a letter, unnoticed."""
    arc2face, sd15 = _copy_models(models, tmp_path)
    (sd15 / "tokenizer" / "merges.txt").write_text(merges, encoding="utf-8")
    with pytest.raises(HyperfaceError, match="splits 'id' into 2 tokens.*merges.txt"):
        Arc2FaceGenerator.from_pretrained(arc2face, sd15, device="cpu")


# --- conditioning ---------------------------------------------------------------------------------


def test_identity_lands_at_the_id_token(generator):
    """Compare with a manual computation: put the padded embedding into the vocabulary row of "id"
    and run the untouched model; positions before "id" must not see it (causal mask)."""
    encoder = generator.prompt_encoder
    identity = random_identities(1, seed=7)
    tokens = generator.tokenizer.convert_ids_to_tokens(encoder.prompt_ids[0, :7].tolist())
    assert tokens[encoder.id_position.item()] == "id</w>"
    assert encoder.id_position.item() == 4  # <bos> photo of a id person <eos>

    manual_model = copy.deepcopy(generator.text_encoder)
    padded = torch.zeros(768)
    padded[:512] = torch.from_numpy(identity[0])
    with torch.no_grad():
        manual_model.get_input_embeddings().weight[encoder.id_token] = padded
        expected = manual_model(input_ids=encoder.prompt_ids).last_hidden_state
        plain = generator.text_encoder(input_ids=encoder.prompt_ids).last_hidden_state
    got = encoder.encode(identity)
    assert got.shape == (1, 77, 768)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    position = encoder.id_position.item()
    torch.testing.assert_close(got[:, :position], plain[:, :position])  # causal: unaffected
    assert (got[:, position:] - plain[:, position:]).abs().amax(dim=-1).min() > 1e-3


def test_embedding_is_normalised_and_zero_padded(generator):
    identity = random_identities(1, seed=3)
    a = generator.prompt_encoder.encode(identity)
    b = generator.prompt_encoder.encode(identity * 5.0)  # Arc2Face L2-normalises first
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_embedding_is_normalised_in_the_encoders_dtype_like_arc2faces_demo(generator, monkeypatch):
    """The demo casts the embedding to the pipeline's dtype, then divides by its norm (fp16 on a GPU).
    A half-precision copy of the encoder must see exactly that vector at the "id" position."""
    import contextlib

    from hyperface.generation import arc2face

    encoder = Arc2FacePromptEncoder(generator.tokenizer, copy.deepcopy(generator.text_encoder).to(torch.bfloat16))
    identity = random_identities(1, seed=13) * 3.0
    seen = []
    replace = arc2face._replace_token_embeddings

    @contextlib.contextmanager
    def recording(module, positions, values):
        with replace(module, positions, values):  # record what the layer outputs after the replacement
            handle = module.register_forward_hook(lambda m, i, out: seen.append(out))
            try:
                yield
            finally:
                handle.remove()

    monkeypatch.setattr(arc2face, "_replace_token_embeddings", recording)
    encoder.encode(identity)
    demo = torch.from_numpy(identity).to(torch.bfloat16)
    demo = demo / torch.norm(demo, dim=1, keepdim=True)
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0][0, encoder.id_position.item(), :512], demo[0])
    fp32_first = torch.nn.functional.normalize(torch.from_numpy(identity), dim=1).to(torch.bfloat16)
    assert not torch.equal(fp32_first[0], demo[0])  # the order of the two steps shows in the rounding
    with pytest.raises(HyperfaceError, match="non-zero"):
        generator.prompt_encoder.encode(np.zeros((1, 512), np.float32))
    broken = random_identities(2, seed=14)
    broken[1, 7] = np.nan
    with pytest.raises(HyperfaceError, match="finite"):
        generator.prompt_encoder.encode(broken)


def test_batched_encoding_equals_one_at_a_time(generator):
    identities = random_identities(5, seed=11)
    batched = generator.prompt_encoder.encode(identities)
    single = torch.cat([generator.prompt_encoder.encode(identities[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # identities do differ


def test_unconditional_branch_is_the_empty_prompt(generator):
    empty = generator.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = generator.text_encoder(input_ids=empty).last_hidden_state
    torch.testing.assert_close(generator.prompt_encoder.unconditional(), expected)


def test_wrong_embedding_dimension_is_refused(generator):
    with pytest.raises(HyperfaceError, match="512"):
        generator.prompt_encoder.encode(np.ones((2, 128), np.float32))


# --- sampling -------------------------------------------------------------------------------------


def test_classifier_free_guidance_is_one_batched_forward(generator):
    calls = []
    handle = generator.unet.register_forward_hook(lambda module, args, kwargs_out: calls.append(args[0].shape[0]))
    try:
        images = generator.generate(random_identities(3, seed=1), [5, 6, 7])
    finally:
        handle.remove()
    assert calls == [6] * generator.settings.steps  # [uncond; cond] for 3 identities per step
    assert len(images) == 3 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8


def test_image_does_not_depend_on_batch_composition(generator):
    identities = random_identities(3, seed=2)
    seeds = [image_seed(0, i, 0) for i in range(3)]
    batch = generator.generate_array(identities, seeds)
    alone = generator.generate_array(identities[1:2], seeds[1:2])
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1
    again = generator.generate_array(identities, seeds)
    assert np.array_equal(batch, again)
    other_seed = generator.generate_array(identities[1:2], [seeds[1] + 1])
    assert np.abs(other_seed[0].astype(int) - alone[0].astype(int)).max() > 5


def test_compiled_mode_pads_small_batches_to_one_shape(generator):
    from hyperface.generation.arc2face import Arc2FaceComponents

    components = Arc2FaceComponents(generator.tokenizer, generator.text_encoder, generator.unet, generator.vae, generator.scheduler_config)
    compiled = Arc2FaceGenerator(components, Arc2FaceSettings(steps=2, resolution=32, compile=True))
    compiled._unet_forward = compiled.unet  # keep the test eager; the padding is what is checked
    calls = []
    handle = compiled.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        identities = random_identities(3, seed=12)
        compiled.generate_array(identities, [1, 2, 3])
        small = compiled.generate_array(identities[2:], [3])
    finally:
        handle.remove()
    assert calls == [6, 6, 6, 6] and small.shape == (1, 32, 32, 3)
    assert np.abs(small[0].astype(int) - generator.generate_array(identities[2:], [3])[0].astype(int)).max() <= 1


def test_fused_qkv_projections_follow_the_lora_and_give_the_same_images(models, tmp_path):
    lora_path = tmp_path / "pytorch_lora_weights.safetensors"
    write_kohya_lora(lora_path, load_arc2face_components(models.arc2face_dir, models.sd15_dir).unet)
    # The LoRA touches every to_q / to_k / to_v: fusing before it would lose its deltas.
    settings = dict(lcm_lora=lora_path, scheduler="dpm", steps=2, guidance_scale=3.0, resolution=models.resolution)
    plain = Arc2FaceGenerator(load_arc2face_components(models.arc2face_dir, models.sd15_dir), Arc2FaceSettings(**settings))
    fused = Arc2FaceGenerator(load_arc2face_components(models.arc2face_dir, models.sd15_dir), Arc2FaceSettings(**settings, fuse_qkv=True))
    processors = {type(p).__name__ for p in fused.unet.attn_processors.values()}
    assert processors == {"FusedAttnProcessor2_0"}
    assert any(hasattr(m, "to_qkv") for m in fused.unet.modules()) and any(hasattr(m, "to_kv") for m in fused.unet.modules())
    assert fused.params["fuse_qkv"] is True
    identities = random_identities(3, seed=21)
    expected = plain.generate_array(identities, [5, 6, 7])
    got = fused.generate_array(identities, [5, 6, 7])
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_compiled_sampler_matches_eager(models, generator):
    """The real torch.compile path (UNet and VAE decoder, fused QKV, channels_last; a CUDA-graph mode,
    which on a CPU compiles without graphs) renders what the eager sampler renders."""
    settings = Arc2FaceSettings(steps=2, resolution=models.resolution, compile=True, compile_mode="reduce-overhead",
                                fuse_qkv=True, channels_last=True, vae_batch_size=2)
    compiled = Arc2FaceGenerator(load_arc2face_components(models.arc2face_dir, models.sd15_dir), settings)
    assert compiled.params["compile"] == "reduce-overhead"
    assert compiled.captures_cuda_graphs is False  # CUDA graphs only on a GPU
    identities = random_identities(3, seed=22)
    got = compiled.generate_array(identities, [8, 9, 10])  # decode chunks of 2 and a padded 1
    expected = generator.generate_array(identities, [8, 9, 10])
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_channels_last_without_compile_warns(models, hyperface_log):
    """Eager, channels_last converts layouts around every GroupNorm (measured 10% slower on a GPU):
    the generator says to pair it with --compile, and says nothing when compiled or without it."""
    components = load_arc2face_components(models.arc2face_dir, models.sd15_dir)
    Arc2FaceGenerator(components, Arc2FaceSettings(steps=1, resolution=models.resolution, channels_last=True))
    warned = [r.getMessage() for r in hyperface_log if r.levelno == logging.WARNING and "--channels-last" in r.getMessage()]
    assert len(warned) == 1 and "use it with --compile" in warned[0]
    hyperface_log.clear()
    Arc2FaceGenerator(components, Arc2FaceSettings(steps=1, resolution=models.resolution, channels_last=True, compile=True))
    Arc2FaceGenerator(components, Arc2FaceSettings(steps=1, resolution=models.resolution))
    assert not [r for r in hyperface_log if "--channels-last" in r.getMessage()]


def test_a_resolution_other_than_the_unets_warns_naming_both(models, hyperface_log):
    """The tiny UNet's sample_size 16 x the VAE's scale factor 2 = 32 px (Arc2Face: 64 x 8 = 512)."""
    components = load_arc2face_components(models.arc2face_dir, models.sd15_dir)
    Arc2FaceGenerator(components, Arc2FaceSettings(steps=1, resolution=64))
    warned = [r.getMessage() for r in hyperface_log if r.levelno == logging.WARNING and "--resolution" in r.getMessage()]
    assert warned == ["--resolution 64 is not the 32 px the UNet was trained at (VAE scale factor 2 x UNet sample_size 16): it "
                      "renders, but slower or off-distribution (worse faces); use --resolution 32 unless you mean it"]
    hyperface_log.clear()
    Arc2FaceGenerator(components, Arc2FaceSettings(steps=1, resolution=models.resolution))
    assert not [r for r in hyperface_log if "--resolution" in r.getMessage()]


def test_unknown_compile_mode_is_refused():
    with pytest.raises(HyperfaceError, match="compile mode"):
        Arc2FaceSettings(compile=True, compile_mode="fastest").resolved()
    with pytest.raises(HyperfaceError, match="--attention 'fa3'"):
        Arc2FaceSettings(attention="fa3").resolved()


def test_attention_preference_holds_during_sampling_only(models, generator):
    """--attention cudnn puts cuDNN first in SDPA's order for every UNet forward, then restores the
    order; on a CPU (no cuDNN attention) the images are the default's."""
    import torch
    from torch.nn.attention import SDPBackend

    before = list(torch._C._get_sdp_priority_order())
    settings = Arc2FaceSettings(steps=2, resolution=models.resolution, attention="cudnn")
    preferring = Arc2FaceGenerator(load_arc2face_components(models.arc2face_dir, models.sd15_dir), settings)
    seen, decoded = [], []
    handles = [
        preferring.unet.register_forward_hook(lambda module, args, out: seen.append(torch._C._get_sdp_priority_order()[0])),
        preferring.vae.decoder.register_forward_hook(lambda module, args, out: decoded.append(torch._C._get_sdp_priority_order()[0])),
    ]
    try:
        identities = random_identities(2, seed=23)
        got = preferring.generate_array(identities, [11, 12])
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [int(SDPBackend.CUDNN_ATTENTION)] * 2
    assert decoded and set(decoded) == {int(SDPBackend.CUDNN_ATTENTION)}  # the VAE's attention too
    assert list(torch._C._get_sdp_priority_order()) == before and before[0] != int(SDPBackend.CUDNN_ATTENTION)
    assert preferring.params["attention"] == "cudnn"
    assert np.array_equal(got, generator.generate_array(identities, [11, 12]))


def test_loading_is_quiet_when_progress_bars_are_off(models, monkeypatch, capfd):
    import logging

    import transformers.utils.logging as transformers_logging

    monkeypatch.setenv("HYPERFACE_PROGRESS", "0")
    monkeypatch.setattr(logging.getLogger("hyperface.generation"), "level", logging.INFO)
    before = transformers_logging.get_verbosity()
    capfd.readouterr()
    load_arc2face_components(models.arc2face_dir, models.sd15_dir)
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""  # no library loading bars or install advice
    assert transformers_logging.get_verbosity() == before  # the libraries' settings are restored


def test_settings_defaults_are_arc2face_and_lcm():
    default = Arc2FaceSettings().resolved()
    assert (default.scheduler, default.steps, default.guidance_scale, default.resolution) == ("dpm", 25, 3.0, 512)
    fast = Arc2FaceSettings(lcm_lora="x.safetensors").resolved()
    assert (fast.scheduler, fast.steps, fast.guidance_scale) == ("lcm", 4, 1.0)
    with pytest.raises(HyperfaceError, match="lcm-lora"):
        Arc2FaceSettings(scheduler="lcm").resolved()
    with pytest.raises(HyperfaceError, match="scheduler"):
        Arc2FaceSettings(scheduler="nope").resolved()


def test_dpm_solver_is_the_one_arc2face_sampled_with(generator):
    # Arc2Face's diffusers (0.22) ends DPM-Solver++ at sigma_min with a second-order step; newer
    # diffusers default to a first-order step to sigma 0, which would change every image a little.
    scheduler = make_scheduler("dpm", generator.scheduler_config)
    scheduler.set_timesteps(25)
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2
    assert scheduler.config.final_sigmas_type == "sigma_min" and float(scheduler.sigmas[-1]) > 0
    assert scheduler.timesteps.tolist()[:2] == [999, 959] and scheduler.timesteps.tolist()[-1] == 40


def test_lcm_timesteps_are_arc2faces_lcm_lora_recipe(generator):
    """Arc2Face published its LCM-LoRA recipe with diffusers 0.23.0 pinned, whose LCMScheduler takes
    every (50 // steps)-th of the 50 distilled timesteps from 999 down; diffusers >= 0.27 spreads them
    evenly ([999, 759, 499, 259] for 4 steps), which would change every fast-mode image from 3 steps on."""
    published = {  # diffusers 0.23.0's LCMScheduler.set_timesteps(steps) with SD1.5's config
        1: [999], 2: [999, 499], 3: [999, 679, 359], 4: [999, 759, 519, 279],
        8: [999, 879, 759, 639, 519, 399, 279, 159], 50: list(range(999, 0, -20)),
    }
    for steps, timesteps in published.items():
        scheduler = make_scheduler("lcm", generator.scheduler_config)
        set_timesteps(scheduler, "lcm", steps)
        assert scheduler.timesteps.tolist() == timesteps == lcm_timesteps(scheduler.config, steps)
    with pytest.raises(HyperfaceError, match="at most 50 steps"):
        lcm_timesteps(make_scheduler("lcm", generator.scheduler_config).config, 51)
    dpm = make_scheduler("dpm", generator.scheduler_config)
    set_timesteps(dpm, "dpm", 25)
    assert dpm.timesteps.tolist()[:2] == [999, 959]  # other schedulers: their own spacing
    # a resume of a fast-mode run made with the other spacing is refused (DPM runs compare as before)
    assert sampler_facts(Arc2FaceSettings(lcm_lora="x.safetensors"), torch.float16)["lcm_timesteps"] == "diffusers 0.23.0"
    assert "lcm_timesteps" not in sampler_facts(Arc2FaceSettings(), torch.float16)


def _pipeline_renders(generator, identity, seed, steps, guidance, scheduler, timesteps=None):
    """Arc2Face's recipe: diffusers' StableDiffusionPipeline on the same modules, the identity written
    into the vocabulary row of "id" of a copy of the text encoder (prompt_embeds), the empty negative
    prompt encoded by the pipeline itself, one image from a CPU generator seeded with ``seed``."""
    from diffusers import StableDiffusionPipeline

    encoder = generator.prompt_encoder
    row_model = copy.deepcopy(generator.text_encoder)
    with torch.no_grad():
        row_model.get_input_embeddings().weight[encoder.id_token] = torch.nn.functional.pad(
            torch.from_numpy(identity / np.linalg.norm(identity)), (0, 768 - 512))
        prompt_embeds = row_model(input_ids=encoder.prompt_ids).last_hidden_state
    pipeline = StableDiffusionPipeline(vae=generator.vae, text_encoder=generator.text_encoder, tokenizer=generator.tokenizer,
                                       unet=generator.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    schedule = {"timesteps": timesteps} if timesteps is not None else {"num_inference_steps": steps}
    with torch.no_grad():
        pixels = pipeline(prompt_embeds=prompt_embeds, guidance_scale=guidance, num_images_per_prompt=1, output_type="np",
                          generator=torch.Generator("cpu").manual_seed(seed), **schedule).images[0]
    return (pixels * 255).round().astype(int)  # diffusers' numpy_to_pil


def _close_to(got, expected):
    difference = np.abs(got.astype(int) - expected)
    # float rounding can move a pixel across a half grey level; truncating instead of rounding would
    # move half of them
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())


def test_images_are_diffusers_pipeline_images_with_arc2faces_recipe(models, generator, tmp_path):
    """Seed for seed, ours == StableDiffusionPipeline(prompt_embeds=..., generator=CPU generator):
    latents, CFG on [empty prompt; identity], DPM-Solver++, VAE decode, rounding to uint8. Then the
    fast mode: LCM-LoRA, guidance 1, LCMScheduler made from the DPM-Solver's config, as Arc2Face's
    README does, on the timesteps of its recipe (diffusers 0.23.0), with LCM's noise between steps."""
    identities = random_identities(2, seed=31)
    seeds = [5, 2**40 + 7]
    ours = generator.generate_array(identities, seeds)
    for i in range(2):
        scheduler = make_scheduler("dpm", generator.scheduler_config)
        _close_to(ours[i], _pipeline_renders(generator, identities[i], seeds[i], generator.settings.steps, 3.0, scheduler))

    from diffusers import LCMScheduler

    lora_path = tmp_path / "pytorch_lora_weights.safetensors"
    components = load_arc2face_components(models.arc2face_dir, models.sd15_dir)
    write_kohya_lora(lora_path, components.unet)
    lcm = Arc2FaceGenerator(components, Arc2FaceSettings(lcm_lora=lora_path, resolution=models.resolution))
    assert (lcm.settings.steps, lcm.settings.guidance_scale) == (4, 1.0)
    timesteps = []
    handle = lcm.unet.register_forward_hook(lambda module, args, out: timesteps.append(int(args[1])))
    try:
        fast = lcm.generate_array(identities, seeds)
    finally:
        handle.remove()
    recipe = [999, 759, 519, 279]
    assert timesteps == recipe  # one UNet forward a step for the batch (no unconditional branch)
    readme = LCMScheduler.from_config(make_scheduler("dpm", lcm.scheduler_config).config)
    for i in range(2):
        _close_to(fast[i], _pipeline_renders(lcm, identities[i], seeds[i], 4, 1.0, LCMScheduler.from_config(readme.config), recipe))


def test_every_scheduler_builds_from_sd15_config(generator):
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, generator.scheduler_config)
        scheduler.set_timesteps(3)
        assert len(set(scheduler.timesteps.tolist())) == 3  # (PNDM repeats one for its warm-up)
        # SD1.5's noise schedule, read from its scheduler_config.json, whatever the sampler
        assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.num_train_timesteps) == (
            "scaled_linear", 0.00085, 1000
        )


def test_lcm_lora_is_fused_and_used(models, tmp_path):
    components = load_arc2face_components(models.arc2face_dir, models.sd15_dir)
    lora_path = tmp_path / "pytorch_lora_weights.safetensors"
    scales = write_kohya_lora(lora_path, components.unet)
    name = next(iter(scales))
    layer = dict(components.unet.named_modules())[name]
    before = layer.weight.detach().clone()

    from safetensors.torch import load_file

    tensors = load_file(str(lora_path))
    key = "lora_unet_" + name.replace(".", "_")
    expected_delta = (tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]) * scales[name]

    settings = Arc2FaceSettings(lcm_lora=lora_path, steps=2, resolution=models.resolution)
    lcm = Arc2FaceGenerator(components, settings)
    torch.testing.assert_close(layer.weight - before, expected_delta, rtol=1e-4, atol=1e-5)
    assert type(make_scheduler(lcm.settings.scheduler, lcm.scheduler_config)).__name__ == "LCMScheduler"
    calls = []
    handle = lcm.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        first = lcm.generate_array(random_identities(2, seed=4), [1, 2])
        second = lcm.generate_array(random_identities(2, seed=4)[1:], [2])
    finally:
        handle.remove()
    assert calls == [2, 2, 1, 1]  # guidance 1.0: no unconditional branch
    # LCM re-noises between steps from each image's own generator: still batch-independent.
    assert np.abs(first[1].astype(int) - second[0].astype(int)).max() <= 1


def _lora_pair(module, rank, gen):
    weight = module.weight
    down_shape = (rank, *weight.shape[1:]) if weight.ndim == 4 else (rank, weight.shape[1])
    up_shape = (weight.shape[0], rank, 1, 1) if weight.ndim == 4 else (weight.shape[0], rank)
    return torch.randn(down_shape, generator=gen) * 0.1, torch.randn(up_shape, generator=gen) * 0.1


@pytest.mark.parametrize("layout", ["kohya-sgm", "peft"])
def test_lora_layouts_map_to_the_right_layers(models, tmp_path, layout):
    """kohya files with the original SD UNet's names and peft-style files land on the diffusers layers."""
    from safetensors.torch import save_file

    components = load_arc2face_components(models.arc2face_dir, models.sd15_dir)
    unet = components.unet
    targets = {  # original SD name (tiny UNet: 2 blocks, 1 layer each) -> diffusers module
        "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "output_blocks_3_1_proj_out": "up_blocks.1.attentions.1.proj_out",
        "time_embed_0": "time_embedding.linear_1",
        "input_blocks_0_0": "conv_in",
    }
    modules = dict(unet.named_modules())
    gen = torch.Generator().manual_seed(0)
    tensors, expected, before = {}, {}, {}
    for sgm_name, name in targets.items():
        down, up = _lora_pair(modules[name], 2, gen)
        if layout == "kohya-sgm":
            tensors.update({f"lora_unet_{sgm_name}.lora_down.weight": down, f"lora_unet_{sgm_name}.lora_up.weight": up,
                            f"lora_unet_{sgm_name}.alpha": torch.tensor(1.0)})
            scale = 0.5
        else:
            tensors.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
            scale = 1.0
        expected[name] = (up.flatten(1) @ down.flatten(1)).reshape(modules[name].weight.shape) * scale
        before[name] = modules[name].weight.detach().clone()
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    assert fuse_lora_into_unet(unet, path) == len(targets)
    for name in targets.values():
        torch.testing.assert_close(modules[name].weight - before[name], expected[name], rtol=1e-4, atol=1e-5)


def test_lora_for_another_model_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    components = load_arc2face_components(models.arc2face_dir, models.sd15_dir)
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(HyperfaceError, match="matches no UNet layer"):
        fuse_lora_into_unet(components.unet, path)
    with pytest.raises(HyperfaceError, match="not found"):
        fuse_lora_into_unet(components.unet, tmp_path / "missing.safetensors")


# --- intra-class variation ------------------------------------------------------------------------


def test_image_seeds_are_deterministic_and_distinct():
    seeds = {image_seed(3, identity, index) for identity in range(50) for index in range(20)}
    assert len(seeds) == 1000
    assert image_seed(3, 7, 2) == image_seed(3, 7, 2) != image_seed(4, 7, 2)


def test_angle_perturbation_rotates_by_exactly_the_angle():
    reference = random_identities(1, seed=9)[0]
    perturbation = Perturbation("angle", 12.0)
    a, b = perturbation.apply(reference, 1), perturbation.apply(reference, 2)
    for vector in (a, b):
        assert abs(np.linalg.norm(vector) - 1) < 1e-5
        assert abs(float(vector @ reference) - np.cos(np.deg2rad(12.0))) < 1e-5
    assert np.array_equal(a, perturbation.apply(reference, 1))
    assert float(a @ b) < 0.999  # different directions


def test_noise_perturbation_is_renormalised():
    reference = random_identities(1, seed=9)[0]
    vector = Perturbation("noise", 0.3).apply(reference, 5)
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    # noise of expected norm s in 512-d, renormalised: cosine ~ 1 / sqrt(1 + s^2) (0.958 for s = 0.3)
    cosines = [float(Perturbation("noise", 0.3).apply(reference, seed) @ reference) for seed in range(200)]
    assert np.mean(cosines) == pytest.approx(1 / np.sqrt(1 + 0.3**2), abs=0.003)
    assert len(set(cosines)) == 200  # a fresh draw per seed
    assert np.allclose(Perturbation("none", 0).apply(reference, 5), reference, atol=1e-6)
    with pytest.raises(HyperfaceError):
        Perturbation("angle", 120)


def test_prompt_is_arc2face():
    assert ARC2FACE_PROMPT == "photo of a id person"
