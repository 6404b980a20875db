"""Sampling: hand-written steps vs diffusers, MG/JVID inside the sampler vs independent loops, personalised bases."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from pipeline.configlib import load_config
from training.diffusion.guidance import cfg_scale, mg_guidance
from training.diffusion.samplers import (
    ddim_scheduler,
)
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline
from training.sampling.personalize import merge_lora

STEPS = 3
FAST = {"sampler.steps": STEPS, "output.device": "cpu"}


# ---- the pipeline on the tiny checkpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    """One loaded pipeline (JVID image model = the frozen base); tests swap in other configs."""
    return load_pipeline(tiny_checkpoint, load_config(SampleConfig, None, {**FAST, "jvid.enabled": True}))


def with_cfg(pipe, **overrides):
    p = copy.copy(pipe)
    p.cfg = load_config(SampleConfig, None, {**FAST, **overrides})
    return p


def _independent_loop(pipe, prompt, seed, model, mg_alpha, cfg_early, cfg_late):
    """DDIM written against diffusers' DDIMScheduler.step, CFG and mg_guidance applied by hand."""
    sched = DDIMScheduler.from_config(ddim_scheduler(pipe.train_cfg.diffusion).config)
    sched.set_timesteps(STEPS)
    text = pipe.encode_prompt(["", prompt])
    shape = (1, 4, pipe.num_frames, pipe.height // 8, pipe.width // 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for t in sched.timesteps:
        uncond = model(x, t, text[:1])
        cond = model(x, t, text[1:])
        w = cfg_scale(1 - int(t) / 1000, cfg_early, cfg_late, 0.7)  # the switch is on t/T
        eps = uncond + w * (cond - uncond)
        if mg_alpha:
            per_frame = x.shape[1] * x.shape[3] * x.shape[4]  # alpha is stated for 4 x 32 x 32 latent frames
            eps = mg_guidance(eps, x, sched.alphas_cumprod[int(t)], mg_alpha * per_frame / 4096)
        x = sched.step(eps, t, x).prev_sample
    return x


def test_cfg_switches_on_the_timestep_not_on_the_step_count(pipe):
    """HARIVO App. D: 10-15 while t > 0.7T. DDIM-25 (leading, offset 1) visits t = 961, 921, ..., 1: 7 steps
    have t > 700 (961 ... 721); switching on the fraction of steps taken gave 8."""
    from training.diffusion.samplers import discrete_schedule

    schedule = discrete_schedule(ddim_scheduler(pipe.train_cfg.diffusion), 25)
    scales = [cfg_scale(p) for p in pipe.progress(schedule.timesteps)]
    assert scales.count(12.5) == 7 and scales[:7] == [12.5] * 7
    assert [int(t) for t in schedule.timesteps[6:8]] == [721, 681]


def test_mg_inside_the_sampler_matches_an_independent_loop(pipe):
    p = with_cfg(pipe, **{"guidance.mg_alpha": 40.0, "guidance.cfg_early": 9.0, "guidance.cfg_late": 3.0})
    got = p.sample("a dog runs", seed=3).latents
    want = _independent_loop(p, "a dog runs", 3, lambda x, t, c: p.video(x, t, c), 40.0, 9.0, 3.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    no_mg = with_cfg(pipe, **{"guidance.mg_alpha": 0.0, "guidance.cfg_early": 9.0, "guidance.cfg_late": 3.0})
    assert not torch.allclose(no_mg.sample("a dog runs", seed=3).latents, got, atol=1e-3)  # MG did something


def test_jvid_with_p_video_one_is_pure_video_sampling_bit_for_bit(pipe):
    jvid = {
        "sampler.kind": "ddpm",
        "jvid.t_v": 1.0,
        "jvid.t_e": 1.0,
        "jvid.p_e": 1.0,
        "jvid.p_f": 1.0,
        "jvid.gamma": 0.1,
        "jvid.r": 0.5,
        "jvid.smooth_threshold": 0.0,
    }
    mixed = with_cfg(pipe, **{"jvid.enabled": True, **jvid}).sample("a cat", seed=5)
    pure = with_cfg(pipe, **{"jvid.enabled": False, **jvid}).sample("a cat", seed=5)
    assert all(mixed.video_steps)
    assert torch.equal(mixed.latents, pure.latents)


def test_jvid_with_p_video_zero_is_the_frozen_base_per_frame(pipe):
    jvid = {
        "jvid.enabled": True,
        "jvid.t_v": 0.0,
        "jvid.t_e": 0.0,
        "jvid.p_e": 0.0,
        "jvid.p_f": 0.0,
        "jvid.smooth_threshold": 0.0,
        "guidance.mg_alpha": 0.0,
    }
    p = with_cfg(pipe, **jvid)
    got = p.sample("a cat", seed=2)
    assert not any(got.video_steps)
    unet = p.video.unet

    def per_frame(x, t, text):  # the frozen SD UNet on every frame on its own
        frames = [unet(x[:, :, f], t, encoder_hidden_states=text).sample for f in range(x.shape[2])]
        return torch.stack(frames, dim=2)

    want = _independent_loop(p, "a cat", 2, per_frame, 0.0, 12.5, 7.5)
    torch.testing.assert_close(got.latents, want, rtol=1e-4, atol=1e-4)
    # A real mixture uses both models, is seeded, and smooths the final latents.
    mix = with_cfg(pipe, **{"jvid.enabled": True, "sampler.kind": "ddpm", "jvid.t_v": 0.0, "jvid.t_e": 0.5})
    a, b = mix.sample("a cat", seed=4), mix.sample("a cat", seed=4)
    assert torch.equal(a.latents, b.latents) and a.video_steps == b.video_steps


def test_edm_samplers_run_on_a_ddpm_checkpoint(pipe):
    for kind in ("euler", "heun"):
        out = with_cfg(pipe, **{"sampler.kind": kind}).sample("a cat", seed=0).latents
        assert out.shape == (1, 4, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "overrides",
    [
        {"jvid.enabled": False, "guidance.mg_alpha": 40.0, "noise.prior": "mixed", "noise.alpha": 1.0},
        {"jvid.enabled": False, "sampler.kind": "euler", "sampler.s_churn": 1.0},  # stochastic EDM steps
        {"jvid.enabled": True},  # per-seed model choices: grouped, entropy-reduced noise per video
        {"jvid.enabled": False, "sampler.kind": "ddpm", "guidance.cfg_early": 1.0, "guidance.cfg_late": 1.0},
    ],
)
def test_a_batch_of_videos_is_each_video_on_its_own(pipe, overrides):
    # 5 videos, batches of 2: each video's noise is its own seed's, so batching changes nothing but
    # float rounding; the order of the results is the order asked for.
    one = with_cfg(pipe, **overrides)
    batched = with_cfg(pipe, **overrides, **{"sampler.batch_size": 2})
    prompts = [
        "a red circle moves left",
        "a blue square",
        "a green triangle grows",
        "",
        "a red circle moves left",
    ]
    seeds = [3, 1, 4, 1, 5]
    together = batched.sample_batch(prompts, seeds)
    assert len(together) == 5
    for prompt, seed, got in zip(prompts, seeds, together):
        alone = one.sample(prompt, seed)
        assert got.video_steps == alone.video_steps and got.latents.shape == alone.latents.shape
        # rounding only: batched matmuls reduce in another order, and the sampler's steps carry it (a clean-clone
        # run on 2026-12-07 saw 2.0e-4 on 5 of 1,024 elements of the stochastic Euler case); a wrong seed, noise or
        # order moves latents by O(1)
        torch.testing.assert_close(got.latents, alone.latents, rtol=1e-3, atol=1e-3)
    # Not the same video: different seeds differ, and so do different prompts at one seed.
    assert not torch.allclose(together[1].latents, together[2].latents)
    assert not torch.allclose(together[1].latents, together[3].latents)


def test_merge_lora_matches_the_formula(tiny_zoo, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = dict(unet.named_modules())[name]
    before = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, before.shape[1], generator=g), torch.randn(before.shape[0], 4, generator=g)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8}), "format": "pt"}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"unet.{name}.lora_A.weight": a, f"unet.{name}.lora_B.weight": b}, str(path), metadata=meta)
    assert merge_lora({"unet": unet}, str(path), scale=0.5) == {"unet": 1}
    torch.testing.assert_close(layer.weight, before + 0.5 * (8 / 4) * b @ a)
    with pytest.raises(KeyError, match="no layer"):
        bad = tmp_path / "bad.safetensors"
        save_file({"unet.nope.to_q.lora_A.weight": a, "unet.nope.to_q.lora_B.weight": b}, str(bad))
        merge_lora({"unet": unet}, str(bad))


def test_personalised_bases_change_the_video(tiny_zoo, tiny_checkpoint, pipe, tmp_path):
    base = with_cfg(pipe, **{"guidance.mg_alpha": 0.0}).sample("a cat", seed=1).latents
    # DreamBooth-style: a fine-tuned copy of the base UNet.
    unet = UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet")
    with torch.no_grad():
        for p in unet.up_blocks.parameters():
            p.mul_(1.05)
    unet.save_pretrained(tmp_path / "dreambooth")
    over = {**FAST, "guidance.mg_alpha": 0.0}
    swapped = load_pipeline(
        tiny_checkpoint, load_config(SampleConfig, None, {**over, "base.unet": str(tmp_path / "dreambooth")})
    )
    assert not torch.allclose(swapped.sample("a cat", seed=1).latents, base, atol=1e-4)
    # LoRA on every self-attention query of the base.
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith("attn1.to_q"):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.3
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.3
    save_file(state, str(tmp_path / "lora.safetensors"))
    lora = load_pipeline(
        tiny_checkpoint,
        load_config(SampleConfig, None, {**over, "base.lora": str(tmp_path / "lora.safetensors")}),
    )
    assert not torch.allclose(lora.sample("a cat", seed=1).latents, base, atol=1e-4)


def test_controlnet_conditions_only_listed_frames(tiny_zoo, tiny_checkpoint, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    with torch.no_grad():  # its zero convs start at 0; make it "trained"
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    controlnet.save_pretrained(tmp_path / "controlnet")
    Image.fromarray(
        (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    ).save(tmp_path / "edges.png")
    per_frame = {
        **FAST,
        "jvid.enabled": True,
        "jvid.t_v": 0.0,
        "jvid.t_e": 0.0,
        "jvid.p_e": 0.0,
        "jvid.p_f": 0.0,
        "jvid.smooth_threshold": 0.0,
        "guidance.mg_alpha": 0.0,
    }
    control = {
        "controlnet.path": str(tmp_path / "controlnet"),
        "controlnet.images": [str(tmp_path / "edges.png")],
        "controlnet.frames": [0, -1],
    }
    plain = load_pipeline(tiny_checkpoint, load_config(SampleConfig, None, per_frame))
    ctrl = load_pipeline(tiny_checkpoint, load_config(SampleConfig, None, {**per_frame, **control}))
    a, b = plain.sample("a cat", seed=0).latents, ctrl.sample("a cat", seed=0).latents
    # With the per-frame image model frames are independent: only frames 0 and 3 may change.
    torch.testing.assert_close(b[:, :, 1:3], a[:, :, 1:3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b[:, :, 0], a[:, :, 0], atol=1e-3)
    assert not torch.allclose(b[:, :, 3], a[:, :, 3], atol=1e-3)
    # And through the video model (temporal layers on), all frames conditioned.
    video = load_pipeline(
        tiny_checkpoint, load_config(SampleConfig, None, {**FAST, **control, "controlnet.frames": None})
    )
    assert torch.isfinite(video.sample("a cat", seed=0).latents).all()


def test_the_pixel_size_comes_from_the_vaes_downsampling():
    """A VAE of three blocks (4x, the shapes world's `--vae-down 4`) makes 4x the latent size in pixels, SD's four
    blocks 8x, as diffusers' pipelines read `vae_scale_factor`; a size the VAE cannot make is refused."""
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.sampling.pipeline import VideoPipeline

    train_cfg = load_config(TrainConfig, None, {"model.latent_size": 16, "model.num_frames": 4})
    video = SimpleNamespace(frame_tokens=None)
    for blocks, pixels in (((8, 8, 8, 8), 128), ((8, 8, 8), 64)):
        vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=blocks))
        p = VideoPipeline(video, train_cfg, load_config(SampleConfig, None, FAST), vae, text=None)
        assert (p.vae_scale_factor, p.height, p.width) == (pixels // 16, pixels, pixels)
    odd = load_config(SampleConfig, None, {**FAST, "output.height": 72})
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(8,) * 5))  # 16x
    with pytest.raises(ValueError, match="multiples of the VAE's 16x"):
        VideoPipeline(video, train_cfg, odd, vae, text=None)


def test_a_zero_terminal_snr_v_model_samples_finite_latents_from_t_999_with_mg(pipe):
    """The whole discrete path on a zero-terminal-SNR, v-prediction training schedule (the shapes world's): trailing
    DDIM starts at abar = 0, where eps -> x0 and MG's x0 are undefined; the sampler stands 2^-24 in for it and MG
    skips that step, so the video stays the size it is without MG; MG still acts on the other steps."""
    from dataclasses import replace

    p = copy.copy(pipe)
    p.train_cfg = copy.deepcopy(pipe.train_cfg)
    p.train_cfg.diffusion = replace(
        p.train_cfg.diffusion, prediction_type="v_prediction", zero_terminal_snr=True
    )
    trailing = {"sampler.timestep_spacing": "trailing", "sampler.steps_offset": 0, "jvid.enabled": False}
    mg = with_cfg(p, **trailing, **{"guidance.mg_alpha": 40.0})
    mg.train_cfg = p.train_cfg
    plain = with_cfg(p, **trailing, **{"guidance.mg_alpha": 0.0})
    plain.train_cfg = p.train_cfg
    a, b = mg.sample("a cat", seed=0).latents, plain.sample("a cat", seed=0).latents
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # MG at abar = 2^-24 would scale x0's frame differences by (1 - abar) / abar ~ 1.7e7: measured 1.9e5 here
    assert a.abs().max() < 10 * b.abs().max()
    assert not torch.allclose(a, b)
