"""diffusers users get the project's video (`training/sampling/diffusers_pipeline.py`, issue 16): an export's
motion adapter + scheduler in diffusers' own `AnimateDiffPipeline` (extras off), and the whole model as
`T2VRayPipeline` in one `from_pretrained` call (extras on), both against `VideoPipeline.sample`.

The README's two snippets are the calls below (`test_animatediff_...` and `test_the_exported_pipeline_...`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    UNet2DConditionModel,
)
from diffusers.utils import export_to_gif

from fixtures.checkpoints import perturb_trainable, tiny_train_config
from pipeline.configlib import load_config
from training.model.export import PIPELINE_INDEX, UNET_DIR, export_weights
from training.model.unet import VideoUNet
from training.sampling.config import SampleConfig
from training.sampling.diffusers_pipeline import T2VRayPipeline
from training.sampling.loading import load_pipeline

PROMPT, SEED, STEPS, FRAMES = "a red circle moves up", 3, 3, 4
TINY = {"harivo.mapping_heads": 2, "harivo.mapping_head_dim": 16}
EXTRAS_OFF = {"harivo.mapping_network": False, "harivo.frame_tokens": False}
TOL = 1e-4


def _export(sd, destination, **overrides):
    """A tiny model on HARIVO's 'linear' schedule (not the tiny SD's 'scaled_linear'), every trainable weight
    perturbed (seeded), exported as training.run exports it."""
    cfg = tiny_train_config(sd, **TINY, **overrides)
    torch.manual_seed(0)
    model = VideoUNet.from_pretrained(cfg.model, cfg.harivo)
    perturb_trainable(model)
    export_weights(model.trainable_state_dict(), dict(model.motion_adapter.config), cfg, str(destination))
    return destination, model


def _with(pipe: T2VRayPipeline, **components) -> T2VRayPipeline:
    """Another T2VRayPipeline on `pipe`'s components, some swapped."""
    return T2VRayPipeline(**{**pipe.components, **components}, train_config=pipe.config.train_config)


def _project(export, **sample):
    """The project's sampler on the export: final latents (1, C, F, h, w) and the pipeline."""
    pipe = load_pipeline(export, load_config(SampleConfig, None, {"sampler.steps": STEPS, **sample}))
    return pipe.sample(PROMPT, SEED).latents, pipe


@pytest.fixture(scope="module")
def extras_off(tiny_zoo, tmp_path_factory):
    return _export(tiny_zoo.sd, tmp_path_factory.mktemp("extras-off") / "export", **EXTRAS_OFF)[0]


@pytest.fixture(scope="module")
def extras_on(tiny_zoo, tmp_path_factory):
    return _export(tiny_zoo.sd, tmp_path_factory.mktemp("extras-on") / "export")[0]


@pytest.fixture(scope="module")
def full(extras_on):
    return T2VRayPipeline.from_pretrained(extras_on)


def test_animatediff_with_the_exported_scheduler_reproduces_the_sampler(tiny_zoo, extras_off):
    """Extras off (no mapping network, no frame tokens, MG 0, one CFG scale): diffusers' own pipeline on the
    export's adapter and scheduler is the project's DDIM. Same x_T without passing latents=: both draw
    randn((1, C, F, h, w)) from a CPU generator seeded with SEED."""
    want, _ = _project(
        extras_off, **{"guidance.mg_alpha": 0.0, "guidance.cfg_early": 7.5, "guidance.cfg_late": 7.5}
    )
    export = str(extras_off)
    pipe = AnimateDiffPipeline.from_pretrained(
        tiny_zoo.sd,  # the model.pretrained it was trained on
        motion_adapter=MotionAdapter.from_pretrained(f"{export}/motion_adapter"),
        scheduler=DDIMScheduler.from_pretrained(f"{export}/scheduler"),
    )
    call = dict(num_frames=FRAMES, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.5)
    got = pipe(PROMPT, **call, output_type="latent", generator=torch.Generator().manual_seed(SEED)).frames
    assert got.shape == want.shape == (1, 4, FRAMES, 8, 8)
    assert (got - want).abs().max() < TOL
    # The symptom: the SD folder's own schedule ('scaled_linear') samples another video.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_schedule="scaled_linear")
    other = pipe(PROMPT, **call, output_type="latent", generator=torch.Generator().manual_seed(SEED)).frames
    assert (other - want).abs().max() > 0.1


def test_the_exported_pipeline_reproduces_the_sampler_with_the_extras_on(tiny_zoo, extras_on, full, tmp_path):
    """Mapping network, frame tokens, MG (alpha 40) and HARIVO's CFG schedule: the project's defaults."""
    want, project = _project(extras_on)
    pipe = full  # T2VRayPipeline.from_pretrained(extras_on): the README's snippet
    assert pipe.harivo.mapping_network is not None and pipe.harivo.frame_tokens is not None
    got = pipe(
        PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="latent"
    ).frames
    assert got.shape == want.shape and (got - want).abs().max() < TOL
    frames = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED)).frames[0]
    export_to_gif(frames, str(tmp_path / "t2v-ray.gif"))
    pixels = torch.from_numpy(np.stack([np.asarray(f) for f in frames]))  # (F, H, W, 3) uint8
    decoded = (project.decode(want).permute(0, 2, 3, 1) * 255).round()  # (F, H, W, 3)
    assert len(frames) == FRAMES and (pixels.float() - decoded).abs().max() <= 1
    # AnimateDiff on the same export has no place for the extras (nor MG): another video.
    animatediff = AnimateDiffPipeline.from_pretrained(
        tiny_zoo.sd, motion_adapter=pipe.motion_adapter, scheduler=pipe.scheduler
    )
    without = animatediff(
        PROMPT,
        num_frames=FRAMES,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(SEED),
    ).frames
    assert (without - want).abs().max() > 0.1


def test_the_frame_text_residual_exports_and_loads_with_the_harivo_modules(tiny_zoo, tmp_path):
    """harivo.frame_text=residual (ours): the harivo/ component rebuilds it from its keys; same video as the
    project's sampler."""
    export, model = _export(tiny_zoo.sd, tmp_path / "export", **{"harivo.frame_text": "residual"})
    want, _ = _project(export)
    pipe = T2VRayPipeline.from_pretrained(export)
    assert pipe.harivo.config.frame_text == "residual"
    assert type(pipe.harivo.frame_tokens) is type(model.frame_tokens)
    got = pipe(
        PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="latent"
    ).frames
    assert got.shape == want.shape and (got - want).abs().max() < TOL


def test_the_scheduler_component_picks_the_sampler(extras_on, full):
    """DDPMScheduler on the same config samples the project's ancestral DDPM (same step-noise stream)."""
    want, _ = _project(extras_on, **{"sampler.kind": "ddpm"})
    ddpm = _with(full, scheduler=DDPMScheduler.from_config(full.scheduler.config))
    got = ddpm(
        PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="latent"
    ).frames
    assert (got - want).abs().max() < TOL


def test_another_schedule_or_sampler_is_refused(tiny_zoo, extras_on, full):
    base = DDIMScheduler.from_pretrained(tiny_zoo.sd, subfolder="scheduler")  # the SD folder's own
    with pytest.raises(ValueError, match=r"beta_schedule='scaled_linear' \(trained: 'linear'\)"):
        _with(full, scheduler=base)
    with pytest.raises(ValueError, match="samples with DDIMScheduler .* or DDPMScheduler"):
        _with(full, scheduler=EulerDiscreteScheduler.from_config(base.config))
    with pytest.raises(ValueError, match="scheduler component picks the sampler"):
        full(PROMPT, overrides=["sampler.kind=euler"])
    with pytest.raises(ValueError, match="jvid.enabled: T2VRayPipeline samples the exported model alone"):
        full(PROMPT, overrides={"jvid.enabled": True})
    with pytest.raises(ValueError, match="controlnet"):
        full(PROMPT, overrides=["controlnet.path=x", "controlnet.images=[a.png]"])
    with pytest.raises(ValueError, match="frame tokens need 4 frames"):
        full(PROMPT, num_frames=6)


def test_components_the_export_holds_and_the_ones_it_leaves_to_the_base(tiny_zoo, extras_on, full, tmp_path):
    index = json.loads((extras_on / PIPELINE_INDEX).read_text())
    assert [index[n] for n in ("vae", "text_encoder", "tokenizer", "unet")] == [[None, None]] * 4
    from transformers import CLIPTextModel

    base = {
        "vae": AutoencoderKL.from_pretrained(tiny_zoo.sd, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_zoo.sd, subfolder="text_encoder"),
        "unet": UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet"),
    }
    for name, module in base.items():  # the frozen base as model.pretrained holds it
        got, want = getattr(full, name).state_dict(), module.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
    assert full.tokenizer.model_max_length == 77
    # save_pretrained writes a self-contained copy (the base's components too) that loads back the same.
    full.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / PIPELINE_INDEX).read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["harivo"][1] == "HarivoModules"
    again = T2VRayPipeline.from_pretrained(tmp_path / "copy")
    for name in ("vae", "text_encoder", "unet", "motion_adapter", "harivo"):
        got, want = getattr(again, name).state_dict(), getattr(full, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name


@pytest.mark.parametrize("kind", ["cross_attention", "film"])
def test_temporal_text_layers_round_trip_through_both_loaders(tiny_zoo, tmp_path, kind):
    """model.text_conditioning: `load_pipeline` (training.sample) rebuilds the text layers from the config and
    trainable.safetensors, `T2VRayPipeline` takes them from temporal_text/; both sample the trained model."""
    export, model = _export(
        tiny_zoo.sd, tmp_path / "export", **EXTRAS_OFF, **{"model.text_conditioning": kind}
    )
    want, project = _project(export)
    pipe = T2VRayPipeline.from_pretrained(export)
    assert pipe.video.temporal_text is pipe.temporal_text  # the component itself runs, not a copy
    trained = model.temporal_text.state_dict()
    for loaded in (project.video.temporal_text, pipe.temporal_text):
        got = loaded.state_dict()
        assert loaded.config.kind == kind and got.keys() == trained.keys()
        assert all(torch.equal(got[k], trained[k]) for k in trained)
    got = pipe(
        PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="latent"
    ).frames
    assert got.shape == want.shape and (got - want).abs().max() < TOL
    with pytest.raises(ValueError, match="temporal_text component is missing"):
        _with(pipe, temporal_text=None)


def test_trained_spatial_layers_load_from_the_export(tiny_zoo, tmp_path):
    """model.trainable_spatial: the pipeline's UNet is the export's unet/, not the frozen base."""
    export, model = _export(tiny_zoo.sd, tmp_path / "export", **{"model.trainable_spatial": ["*attentions*"]})
    assert json.loads((export / PIPELINE_INDEX).read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (export / UNET_DIR).is_dir()
    pipe = T2VRayPipeline.from_pretrained(export)
    got, trained = pipe.unet.state_dict(), model.unet.state_dict()
    assert all(torch.equal(got[k], trained[k]) for k in trained)
    trained_keys = [k for k in model.trainable_state_dict() if k.startswith("unet.")]
    assert trained_keys and all(k[len("unet.") :] in got for k in trained_keys)
