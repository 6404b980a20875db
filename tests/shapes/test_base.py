"""The shapes base's parts: SD 1.5's directory layout, the open_clip -> CLIPTextModel conversion, the VAE layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.zoo import TINY_CLIP_CFG
from shapes.base import (
    VAE_CONFIG,
    check_base,
    random_text_encoder,
    reconstruction_read,
    stills,
    text_encoder_from_open_clip,
    write_base,
)
from shapes.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    frame_at,
    held_out_still,
    render,
    sample_scene,
    sample_still,
)


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
    image = pipe(captions[0], num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # the check draws held-out captions through this same pipeline and reads them back
    check = check_base(tmp_path / "base", n=4, steps=2, batch=2)
    assert check["summary"]["n"] == 4 and len(check["rows"]) == 4
    held = {
        f"a {c} {s} on a {b} background"
        for s in SHAPES
        for c in COLOURS
        for b in BACKGROUNDS
        if held_out_still(Scene(s, c, b, "grows", c, False))
    }
    assert {r["caption"] for r in check["rows"]} <= held
    assert all(0 <= check["summary"][k] <= 1 for k in ("colour", "shape", "colour_and_shape", "background"))
    assert reconstruction_read(x, x) == {"colour": 1.0, "shape": 1.0}  # the originals read as themselves


def test_stills_stand_where_the_videos_pass_and_say_what_they_show():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = sample_scene(rng)
        clip = render(scene, 5, 32, 32)
        assert all(np.array_equal(clip[i], frame_at(scene, i / 4, 32, 32)) for i in range(5))
    for _ in range(50):
        scene, frame = sample_still(rng, 64, 64)
        assert scene.motion != "changes colour"
        colour = np.array(COLOURS[scene.colour])
        assert (np.abs(frame.astype(int) - colour).sum(-1) == 0).sum() > 20  # the caption's colour is drawn
