"""`T2VRayPipeline`: an export (`RUN_DIR/export/`) as a diffusers pipeline, loaded in one call and sampled as
`python -m training.sample` samples it.

    pipe = T2VRayPipeline.from_pretrained("RUN_DIR/export")
    frames = pipe("a dog runs on the beach", generator=torch.Generator().manual_seed(0)).frames[0]

The export's `model_index.json` (written by `training/model/export.py`) names what the export holds:
`motion_adapter/` (a diffusers `MotionAdapter`), `harivo/` (`HarivoModules`: mapping network and frame tokens),
`temporal_text/` (`TemporalTextModules`: the temporal layers' text path, model.text_conditioning), `scheduler/`
(DDIM on the training noise schedule), `unet/` when the base's own layers trained, and the resolved
TrainConfig. The frozen base's VAE, text encoder, tokenizer (and UNet) are not copied into the export: they are
null there, and `from_pretrained` loads them from the base the model was trained on (`model.pretrained`).

`__call__` runs the project's sampler itself: a `VideoPipeline` (`pipeline.py`) on the pipeline's own
components, so CFG with HARIVO's time-dependent scale, MG, the training noise prior, the mapping network and the
frame tokens are the same formulas, not copies. The scheduler component picks the sampler (`DDIMScheduler`: DDIM,
`DDPMScheduler`: ancestral DDPM) and its timestep spacing; its noise schedule must be the training one (another
is refused: it would read every timestep at the wrong noise level). JVID, the PYoCo cascade, ControlNet and
LoRA stay `python -m training.sample`'s and are refused here, naming it; a swapped (DreamBooth-style) base is a
`unet=` / `text_encoder=` component given to `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import replace
from os import PathLike

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, MotionAdapter, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from pipeline.configlib import Overrides, from_dict, load_config, to_dict
from pipeline.models import TextEncoder
from training.config import TrainConfig
from training.diffusion.samplers import ddim_scheduler, ddpm_scheduler
from training.model.export import BASE_COMPONENTS, HarivoModules
from training.model.text import TemporalTextModules
from training.model.unet import VideoUNet
from training.sampling.config import BaseConfig, ControlNetConfig, SampleConfig
from training.sampling.pipeline import VideoPipeline

SAMPLERS = {DDIMScheduler: ("ddim", ddim_scheduler), DDPMScheduler: ("ddpm", ddpm_scheduler)}
"""Scheduler class -> (sampler.kind, the project's scheduler of that kind on a DiffusionConfig)."""
SCHEDULER_FIELDS = ("sampler.kind", "sampler.timestep_spacing", "sampler.steps_offset")
"""SampleConfig fields the scheduler component sets (an override may not contradict it)."""


class T2VRayPipeline(DiffusionPipeline):
    """Text-to-video with a T2V-Ray video model: the frozen SD base, the temporal layers (`motion_adapter`),
    HARIVO's modules (`harivo`, None when the model has neither), the temporal text layers (`temporal_text`, None
    with model.text_conditioning=none) and the training schedule (`scheduler`).
    `train_config`: the model's resolved TrainConfig as a dict (the export's model_index.json records it)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["harivo", "temporal_text"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder,
        tokenizer,
        unet: UNet2DConditionModel,
        motion_adapter: MotionAdapter,
        scheduler: DDIMScheduler | DDPMScheduler,
        harivo: HarivoModules | None = None,
        temporal_text: TemporalTextModules | None = None,
        train_config: dict | None = None,
    ):
        super().__init__()
        if train_config is None:
            raise ValueError(
                "T2VRayPipeline needs train_config: the model's TrainConfig, as an export records it"
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            motion_adapter=motion_adapter,
            scheduler=scheduler,
            harivo=harivo,
            temporal_text=temporal_text,
        )
        self.register_to_config(train_config=train_config)
        self.train_cfg = from_dict(TrainConfig, train_config)
        self.sampler_fields()  # fail at load time on a scheduler the project cannot sample with
        self.video = video_model(unet, motion_adapter, harivo, self.train_cfg, temporal_text)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | PathLike, base_model: str | None = None, **kwargs
    ) -> T2VRayPipeline:
        """Load an export (or a `save_pretrained` copy of this pipeline) in one call.

        Components its model_index.json leaves null (the frozen base) are loaded from `model.pretrained`, the SD
        the model was trained on, or from `base_model`, a diffusers SD dir or hub id holding the same base
        elsewhere. Components passed as keyword arguments are used as given (another `unet` is a swapped base,
        as `base.unet` in `training.sample`; a scheduler must keep the training schedule); other keywords go to
        diffusers' `from_pretrained`."""
        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
        index = cls.load_config(
            pretrained_model_name_or_path, **{k: kwargs[k] for k in hub_keys if k in kwargs}
        )
        if "train_config" not in index:
            raise ValueError(
                f"{pretrained_model_name_or_path}: model_index.json has no train_config; not a T2V-Ray export"
            )
        missing = [n for n in BASE_COMPONENTS if n not in kwargs and (index.get(n) or [None])[0] is None]
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        kwargs.update(load_base(from_dict(TrainConfig, index["train_config"]), missing, base_model, dtype))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # -- the sampling config --

    def sampler_fields(self) -> dict:
        """The SampleConfig fields the scheduler component sets; refuses a scheduler the project does not sample
        with, or one whose noise schedule (or any other setting) is not the training one."""
        s = self.scheduler
        if type(s) not in SAMPLERS:
            raise ValueError(
                f"scheduler {type(s).__name__}: T2VRayPipeline samples with DDIMScheduler (DDIM) or DDPMScheduler "
                "(ancestral DDPM), the project's discrete samplers; EDM samplers are python -m training.sample's"
            )
        kind, make = SAMPLERS[type(s)]
        want = make(self.train_cfg.diffusion, s.config.timestep_spacing, s.config.steps_offset).config
        diff = {
            k: (s.config.get(k), v) for k, v in want.items() if not k.startswith("_") and s.config.get(k) != v
        }
        if diff:
            fields = ", ".join(
                f"{k}={got!r} (trained: {trained!r})" for k, (got, trained) in sorted(diff.items())
            )
            raise ValueError(
                f"scheduler {type(s).__name__} is not the schedule this model was trained with: {fields}; use the "
                f"export's scheduler/ (or {type(s).__name__}.from_config(its config))"
            )
        return dict(zip(SCHEDULER_FIELDS, (kind, s.config.timestep_spacing, s.config.steps_offset)))

    def sample_config(
        self,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        eta: float | None = None,
        overrides: Overrides = (),
    ) -> SampleConfig:
        """The SampleConfig `__call__` samples with: the project's defaults (HARIVO: 25 steps, CFG 12.5 then
        7.5 from 0.7T, MG alpha 40, the training noise prior), the scheduler's sampler, the arguments given
        (`guidance_scale` is one CFG scale throughout, as diffusers' pipelines use it), then dotted `overrides`
        ("guidance.mg_alpha=0", as the CLI takes them)."""
        named = {
            "output.num_frames": num_frames,
            "output.height": height,
            "output.width": width,
            "sampler.steps": num_inference_steps,
            "guidance.cfg_early": guidance_scale,
            "guidance.cfg_late": guidance_scale,
            "guidance.negative_prompt": negative_prompt,
            "sampler.eta": eta,
        }
        scheduler = self.sampler_fields()
        cfg = load_config(
            SampleConfig, None, {**scheduler, **{k: v for k, v in named.items() if v is not None}}
        )
        if overrides:
            cfg = from_dict(SampleConfig, to_dict(cfg), overrides)
        got = dict(
            zip(SCHEDULER_FIELDS, (cfg.sampler.kind, cfg.sampler.timestep_spacing, cfg.sampler.steps_offset))
        )
        if got != scheduler:
            raise ValueError(
                f"overrides set {got}, the scheduler {type(self.scheduler).__name__} {scheduler}: the scheduler "
                "component picks the sampler (load another scheduler instead)"
            )
        refused = {
            "jvid.enabled": cfg.jvid.enabled,
            "base": cfg.base != BaseConfig(),
            "controlnet": cfg.controlnet != ControlNetConfig(),
        }
        if any(refused.values()):
            names = ", ".join(k for k, v in refused.items() if v)
            raise ValueError(
                f"{names}: T2VRayPipeline samples the exported model alone; JVID, ControlNet, LoRA and swapped "
                "bases are python -m training.sample's (or pass another unet / text_encoder component)"
            )
        return cfg

    # -- sampling --

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        overrides: Overrides = (),
    ) -> AnimateDiffPipelineOutput | tuple:
        """One video for `prompt`: `.frames` is [F PIL images] ("pil"), (1, F, H, W, 3) in [0, 1] ("np"),
        (1, F, 3, H, W) ("pt") or the final latents (1, C, F, h, w) ("latent"), as AnimateDiffPipeline's.

        `generator`: its seed (`initial_seed()`) seeds the project's CPU noise stream, so
        `torch.Generator(device).manual_seed(s)` gives on any device the video `python -m training.sample`
        writes for seed s (the generator's state is neither read nor advanced); None: `output.seed` (0).
        Unset arguments keep the project's defaults (`sample_config`)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be one string, got {type(prompt).__name__}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}: expected 'pil', 'np', 'pt' or 'latent'")
        cfg = self.sample_config(
            num_frames, height, width, num_inference_steps, guidance_scale, negative_prompt, eta, overrides
        )
        device = self._execution_device
        sampler = VideoPipeline(
            self.video,
            self.train_cfg,
            cfg,
            self.vae,
            TextEncoder(self.tokenizer, self.text_encoder, device),
            device=device,
            dtype=self.unet.dtype,
        )
        seed = cfg.output.seed if generator is None else generator.initial_seed()
        latents = sampler.sample(prompt, seed).latents  # (1, C, F, h, w)
        if output_type == "latent":
            frames = latents
        else:
            video = sampler.decode(latents)  # (F, 3, H, W) in [0, 1]
            if output_type == "pt":
                frames = video[None]  # (1, F, 3, H, W)
            else:
                frames = video.permute(0, 2, 3, 1).numpy()[None]  # (1, F, H, W, 3)
                if output_type == "pil":
                    frames = [VaeImageProcessor.numpy_to_pil(frames[0])]
        self.maybe_free_model_hooks()
        return AnimateDiffPipelineOutput(frames=frames) if return_dict else (frames,)


def video_model(
    unet: UNet2DConditionModel,
    motion_adapter: MotionAdapter,
    harivo: HarivoModules | None,
    cfg: TrainConfig,
    temporal_text: TemporalTextModules | None = None,
) -> VideoUNet:
    """The `VideoUNet` running on the pipeline's own component modules (shared, not copied, so moving the
    pipeline moves it). Refuses components that do not match the recorded config."""
    if cfg.cascade.stage != "none":
        raise ValueError(
            f"cascade.stage={cfg.cascade.stage!r}: a PYoCo stage samples in python -m training.sample --cascade"
        )
    has = {
        "mapping_network": harivo is not None and harivo.mapping_network is not None,
        "frame_tokens": harivo is not None and harivo.frame_tokens is not None,
    }
    want = {name: getattr(cfg.harivo, name) for name in has}
    if has != want:
        raise ValueError(f"harivo component has {has}, the model was trained with harivo.{want}")
    if (temporal_text is None) != (cfg.model.text_conditioning == "none"):
        raise ValueError(
            f"temporal_text component is {'missing' if temporal_text is None else 'given'}, the model was "
            f"trained with model.text_conditioning={cfg.model.text_conditioning}"
        )
    # The unet component already holds any trained spatial weights; the contrastive head only trains.
    video = VideoUNet(
        unet,
        replace(cfg.model, trainable_spatial=[]),
        replace(cfg.harivo, mapping_network=False, frame_tokens=False, contrastive_head=False),
        motion_adapter,
        temporal_text=temporal_text,
    )
    if harivo is not None:
        video.mapping_network, video.frame_tokens = harivo.mapping_network, harivo.frame_tokens
    return video.eval().requires_grad_(False)


def load_base(
    cfg: TrainConfig, names: list[str], base_model: str | None, dtype: torch.dtype | dict | None
) -> dict:
    """The frozen base's components `names` (of vae, text_encoder, tokenizer, unet), loaded as `load_pipeline`
    loads them, from `model.pretrained` or else from the SD dir / hub id `base_model`."""
    m, out = cfg.model, {}
    if base_model is None and m.subfolder is None and set(names) - {"unet"}:
        raise ValueError(
            f"model.pretrained={m.pretrained} is a bare UNet dir; pass base_model= an SD dir or hub id for the "
            "VAE, text encoder and tokenizer"
        )
    base, rev = (m.pretrained, m.revision) if base_model is None else (base_model, None)

    def dtype_of(name: str) -> torch.dtype:
        if isinstance(dtype, dict):  # diffusers' per-component dtypes
            return dtype.get(name, dtype.get("default", torch.float32))
        return dtype or torch.float32

    if "unet" in names:
        if m.from_scratch:
            raise ValueError("model.from_scratch: the trained UNet is the export's unet/, and it is missing")
        unet_dir = m.subfolder if base_model is None else (m.subfolder or "unet")
        out["unet"] = UNet2DConditionModel.from_pretrained(
            base, subfolder=unet_dir, revision=rev, dtype=dtype_of("unet")
        )
    if "vae" in names:
        out["vae"] = AutoencoderKL.from_pretrained(base, subfolder="vae", revision=rev, dtype=dtype_of("vae"))
    if {"text_encoder", "tokenizer"} & set(names):
        text = TextEncoder.from_pretrained(base, "cpu", rev, dtype_of("text_encoder"))
        out.update(
            {k: v for k, v in (("text_encoder", text.model), ("tokenizer", text.tokenizer)) if k in names}
        )
    return out
