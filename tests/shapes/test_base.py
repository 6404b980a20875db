"""The shapes base's parts: SD 1.5's directory layout, the open_clip -> CLIPTextModel conversion, the VAE layout
(8x or 4x downsampling, the latent size read from the VAE), the scheduler written from the training config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures.zoo import TINY_CLIP_CFG
from shapes.base import (
    BASE_TRAIN_CONFIG,
    VAE_CONFIG,
    base_pipeline,
    check_base,
    latent_size,
    random_text_encoder,
    reconstruction_read,
    stills,
    text_encoder_from_open_clip,
    vae_config,
    vae_scale_factor,
    write_base,
)
from shapes.world import (
    COLOURS,
    Scene,
    frame_at,
    held_out_still,
    render,
    sample_scene,
    sample_still,
)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(VAE_CONFIG | dict(block_out_channels=(8, 8, 8, 8))))


def _open_clip_model(quick_gelu: bool = False):
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP_CFG, quick_gelu=quick_gelu).eval()


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_the_converted_text_encoder_gives_open_clips_hidden_states(quick_gelu):
    import open_clip

    model = _open_clip_model(quick_gelu)
    encoder = text_encoder_from_open_clip(model)
    assert encoder.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red circle moves up on a grey background", "a cat"])
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        reference = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        ours = encoder(tokens).last_hidden_state
    assert torch.allclose(ours, reference, atol=1e-5)
    # causal as CLIP is: a later token does not change earlier states
    other = tokens.clone()
    other[0, 5] = 320
    with torch.no_grad():
        changed = encoder(other).last_hidden_state
    assert torch.equal(changed[0, :5], ours[0, :5]) and not torch.allclose(changed[0, 5:], ours[0, 5:])


def test_the_base_loads_as_stable_diffusion_15(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.register_to_config(scaling_factor=0.5)
    write_base(tmp_path / "base", vae, random_text_encoder(0), record={"vae": "untrained"})
    assert {p.name for p in (tmp_path / "base").iterdir()} >= {
        "vae",
        "text_encoder",
        "tokenizer",
        "unet",
        "scheduler",
    }
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    ids = pipe.tokenizer("a red circle on a grey background").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 9  # the real CLIP BPE, offline
    x, captions = stills(2, np.random.default_rng(0))
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 4, 8, 8)  # SD's latent layout: 4 channels, 8x downsampling
    assert pipe.unet.config.sample_size == latent_size(tmp_path / "base") == 8
    image = pipe(captions[0], num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # the check draws held-out captions through this same pipeline and reads them back
    check = check_base(tmp_path / "base", n=4, steps=2, batch=2)
    assert check["summary"]["n"] == 4 and len(check["rows"]) == 4
    for row in check["rows"]:  # "a small red circle at the left on a grey background"
        size, colour, shape, *_ = row["caption"].removeprefix("a ").split()
        background = row["caption"].split(" on a ")[1].removesuffix(" background")
        assert held_out_still(Scene(shape, colour, background, "grows", colour, False)), row["caption"]
    assert all(0 <= check["summary"][k] <= 1 for k in ("colour", "shape", "colour_and_shape", "background"))
    assert reconstruction_read(x, x) == {"colour": 1.0, "shape": 1.0}  # the originals read as themselves


def test_stills_stand_where_the_videos_pass_and_say_what_they_show():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = sample_scene(rng)
        clip = render(scene, 5, 32, 32)
        assert all(np.array_equal(clip[i], frame_at(scene, i / 4, 32, 32)) for i in range(5))
    for _ in range(50):
        scene, s, frame = sample_still(rng, 64, 64)
        assert np.array_equal(frame, frame_at(scene, s, 64, 64))
        assert scene.motion != "changes colour"
        colour = np.array(COLOURS[scene.colour])
        assert (np.abs(frame.astype(int) - colour).sum(-1) == 0).sum() > 20  # the caption's colour is drawn


def test_a_4x_vae_gives_16x16_latents_and_the_base_reads_its_size(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config(4))
    assert vae_scale_factor(vae.config) == 4 and vae_scale_factor(VAE_CONFIG) == 8
    x, _ = stills(2, np.random.default_rng(0))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (2, 4, 16, 16) and vae.decode(z).sample.shape == (2, 3, 64, 64)
    write_base(tmp_path / "base", vae, random_text_encoder(0))
    assert latent_size(tmp_path / "base") == 16
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16  # diffusers reads the VAE too
    latents = pipe(
        "a small red circle", num_inference_steps=1, height=64, width=64, output_type="latent"
    ).images
    assert latents.shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="one of"):
        vae_config(2)


def test_the_bases_scheduler_is_its_training_schedule(tmp_path):
    from pipeline.configlib import load_config
    from training.config import TrainConfig

    torch.manual_seed(0)
    vae = _tiny_vae()
    write_base(tmp_path / "eps", vae, random_text_encoder(0))
    written = json.loads((tmp_path / "eps" / "scheduler" / "scheduler_config.json").read_text())
    d = load_config(TrainConfig, BASE_TRAIN_CONFIG).diffusion
    assert written["_class_name"] == "DDIMScheduler"
    assert {k: written[k] for k in ("prediction_type", "beta_schedule", "beta_start", "beta_end")} == {
        "prediction_type": d.prediction_type,
        "beta_schedule": d.beta_schedule,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
    }
    assert written["clip_sample"] is False and written["set_alpha_to_one"] is False
    assert written["rescale_betas_zero_snr"] is d.zero_terminal_snr
    # another training config: its parameterisation travels in the file, and the check's DDIM samples with it
    eps_config = tmp_path / "eps.yaml"
    eps_config.write_text(
        f"extends: {BASE_TRAIN_CONFIG}\n"
        "diffusion: {prediction_type: epsilon, zero_terminal_snr: false, loss_weighting: default}\n"
    )
    write_base(tmp_path / "eps2", vae, random_text_encoder(0), train_config=eps_config)
    scheduler = base_pipeline(tmp_path / "eps2").scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert (scheduler.config.prediction_type, scheduler.config.timestep_spacing) == ("epsilon", "leading")
    assert not scheduler.config.rescale_betas_zero_snr
    shipped = base_pipeline(
        tmp_path / "eps"
    ).scheduler  # shapes_base.yaml: v, zero terminal SNR (pilots.md P5)
    assert (shipped.config.prediction_type, shipped.config.timestep_spacing) == ("v_prediction", "trailing")
    assert scheduler.config.clip_sample is False
    edm = tmp_path / "edm.yaml"
    edm.write_text(f"extends: {BASE_TRAIN_CONFIG}\ndiffusion: {{objective: edm}}\n")
    with pytest.raises(ValueError, match="objective"):
        write_base(tmp_path / "edm", vae, random_text_encoder(0), train_config=edm)


def test_the_vaes_object_mask_is_the_object():
    """`stills_with_masks` marks exactly the pixels that differ from the scene's background (the object), the same
    stills `stills` draws from the same generator; their pixels hold the caption's colour."""
    from shapes.base import stills_with_masks

    x, captions, mask = stills_with_masks(8, np.random.default_rng(3))
    x2, captions2 = stills(8, np.random.default_rng(3))
    assert torch.equal(x, x2) and captions == captions2 and mask.shape == (8, 1, 64, 64)
    fraction = mask.mean(dim=(1, 2, 3))
    assert (fraction > 0.01).all() and (fraction < 0.6).all()  # an object, never the whole frame
    # The masked pixels hold the caption's colour (stills keep the palette's colours).
    for i, caption in enumerate(captions):
        colour = caption.split()[2]  # "a small red circle at the left on ..."
        rgb = ((x[i] + 1) * 127.5).round().permute(1, 2, 0)[mask[i, 0].bool()]
        assert (rgb - torch.tensor(COLOURS[colour], dtype=torch.float32)).abs().max() < 1


def test_a_zsnr_base_samples_from_the_last_timestep(tmp_path):
    """A zero-terminal-SNR training config writes a v-prediction, rescaled, trailing scheduler (first step t = 999)."""
    from shapes.base import base_scheduler

    s = base_scheduler(
        BASE_TRAIN_CONFIG, ["diffusion.prediction_type=v_prediction", "diffusion.zero_terminal_snr=true"]
    )
    assert s.config.rescale_betas_zero_snr and s.config.timestep_spacing == "trailing"
    s.set_timesteps(15)
    assert int(s.timesteps[0]) == 999 and float(s.alphas_cumprod[-1]) == 0.0
