"""Config of `python -m training.sample` / `training.evaluate` (SPEC section 4).

Defaults are HARIVO's sampler (DDIM 25 steps, CFG 12.5 until 0.7T then 7.5, MG alpha 40, i.i.d. noise);
`training/configs/sample_jvid.yaml` switches to JVID's (DDPM 50 steps, guidance 2.0, mixture of an
image and a video denoiser, entropy reduction, latent smoothing). Load with the one config path:

    cfg = load_config(SampleConfig, "training/configs/sample_jvid.yaml", ["sampler.steps=10"])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Literal

from pipeline.configlib import ANY, Range, RangeTable, above, at_least, between


@dataclass
class SamplerConfig:
    """The reverse process. DDIM/DDPM use the checkpoint's training schedule; Euler/Heun its EDM preconditioning."""

    RANGES: RangeTable = {
        "steps": at_least(1),
        "eta": between(0, 1),
        "steps_offset": at_least(0),
        "sigma_min": above(0),
        "sigma_max": above(0),
        "rho": above(0),
        "s_churn": at_least(0),
        "s_tmin": at_least(0),
        "s_tmax": Range(0, infinite=True),
        "s_noise": at_least(0),
        "batch_size": at_least(1),
    }

    kind: Literal["ddim", "ddpm", "euler", "heun"] = "ddim"
    """'ddim' (HARIVO), 'ddpm' (JVID), 'euler'/'heun' (EDM ODE/SDE; for diffusion.objective=edm or any eps model)."""
    steps: int = 25
    """Reverse steps (HARIVO: DDIM 25; JVID: DDPM 50)."""
    batch_size: int = 1
    """Videos denoised together per model call (`training.sample`, `training.evaluate`); each keeps its own
    seed's noise, so a video is the same in any batch up to float rounding. A cascade samples one at a time."""
    eta: float = 0.0
    """DDIM stochasticity (0: deterministic DDIM as in seed 000 eq. 4)."""
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    """How the discrete timesteps are spread (diffusers; SD 1.5 pipelines: 'leading' with steps_offset 1)."""
    steps_offset: int = 1
    """Offset added to the 'leading' timesteps (SD 1.5: 1)."""
    sigma_min: float | None = None
    """EDM: smallest sigma (None: 0.002 for kind 'edm'/'modified', the schedule's smallest for 'sd21' / DDPM models)."""
    sigma_max: float | None = None
    """EDM: largest sigma (None: 80 for kind 'edm'/'modified', the schedule's largest for 'sd21' / DDPM models)."""
    rho: float = 7.0
    """EDM: Karras et al. sigma spacing exponent (EDM: 7)."""
    s_churn: float = 0.0
    """EDM stochastic sampling (Karras Alg. 2): total churn; 0 is the deterministic ODE."""
    s_tmin: float = 0.0
    """EDM: churn only for sigma >= s_tmin."""
    s_tmax: float = float("inf")
    """EDM: churn only for sigma <= s_tmax."""
    s_noise: float = 1.0
    """EDM: scale of the churn noise (EDM: 1.0-1.007)."""


@dataclass
class GuidanceConfig:
    """Classifier-free guidance with HARIVO's time-dependent scale, and MG sampling (Algorithm 1)."""

    RANGES: RangeTable = {
        "cfg_early": at_least(0),
        "cfg_late": at_least(0),
        "cfg_switch": between(0, 1),
        "mg_alpha": at_least(0),
        "mg_reference_elements": at_least(0),
    }

    cfg_early: float = 12.5
    """CFG scale while t > cfg_switch * T (HARIVO: 10-15; JVID: 2.0 throughout)."""
    cfg_late: float = 7.5
    """CFG scale once t <= cfg_switch * T (HARIVO: 7.5)."""
    cfg_switch: float = 0.7
    """Fraction of T where the scale switches (HARIVO: 0.7T)."""
    negative_prompt: str = ""
    """The unconditional prompt of CFG (SD: the empty string)."""
    mg_alpha: float = 40.0
    """MG sampling strength alpha of Algorithm 1 (HARIVO: 40, 40-50 good, harmless below 200); 0 disables."""
    mg_reference_elements: int = 4 * 32 * 32
    """C x H x W of the latent frame `mg_alpha` is stated for (HARIVO: 4 x 32 x 32, 256 px): alpha is scaled by
    (the sampled frame's C x H x W) / this, so it pulls as hard at any latent size as HARIVO's at 256 px (SPEC 10;
    the same as Algorithm 1 at 32 x 32; 8 x 8 x 4 latents: alpha 40 acts as 2.5). 0: Algorithm 1 as printed."""


@dataclass
class InitNoiseConfig:
    """The initial latent noise x_T (PYoCo eq. 3-4)."""

    RANGES: RangeTable = {"alpha": at_least(0)}

    prior: Literal["train", "iid", "mixed", "progressive"] = "train"
    """'train': the prior the checkpoint was trained with; else 'iid', 'mixed' or 'progressive'."""
    alpha: float | None = None
    """PYoCo a for 'mixed'/'progressive' (None: the checkpoint's noise.alpha)."""


@dataclass
class JVIDConfig:
    """JVID's mixture of an image and a video denoiser (3.4-3.6, 4.3); Table 6 defaults are its 256^2 row."""

    RANGES: RangeTable = {
        "t_v": between(0, 1),
        "t_e": between(0, 1),
        "p_e": between(0, 1),
        "p_f": between(0, 1),
        "seed": at_least(0),
        "r": between(0, 1),
        "gamma": at_least(0),
        "smooth_threshold": at_least(0),
    }

    enabled: bool = False
    """Mix the image model into the reverse process (and apply entropy reduction and smoothing)."""
    image_model: str = "base"
    """'base': the frozen (possibly swapped) base UNet per frame; 'image_mode': the video model with temporal
    layers and frame tokens off; or a path: a T2V-Ray checkpoint (run in image mode) or a diffusers UNet/SD dir."""
    t_v: float = 0.1
    """P_V = 1 for the first t_v of the reverse steps (Table 6, 256^2: 0.1)."""
    t_e: float = 0.6
    """P_V falls linearly from 1 to p_e until t_e (256^2: 0.6)."""
    p_e: float = 0.2
    """P_V at t_e (256^2: 0.2)."""
    p_f: float = 0.1
    """P_V at the last step (256^2: 0.1)."""
    seed: int | None = None
    """Seed of the per-step model choice (None: the video's seed)."""
    r: float = 0.0
    """Entropy reduction (eq. 8-9): shared share of the step noise on image-model steps (JVID best: 0)."""
    gamma: float = 1.0
    """Entropy reduction: scale of the step noise on image-model steps (JVID: .02 at 64^2, .1 at 128^2, 1 at 256^2)."""
    smooth_threshold: float = 2.0
    """Temporal latent smoothing threshold c on the final latents (JVID: 2); 0 disables."""


@dataclass
class BaseConfig:
    """Personalisation (HARIVO 4.3): what the frozen text-to-image base is at sampling time."""

    RANGES: RangeTable = {"lora_scale": ANY}

    pretrained: str | None = None
    """SD directory / hub id for the VAE, text encoder and tokenizer (None: the checkpoint's model.pretrained)."""
    unet: str | None = None
    """A DreamBooth-style fine-tuned UNet (diffusers dir, or an SD dir with unet/) replacing the frozen base."""
    lora: str | None = None
    """LoRA weights in diffusers format (.safetensors file or dir), merged into the base UNet (and text encoder)."""
    lora_scale: float = 1.0
    """Strength of the merged LoRA."""


@dataclass
class ControlNetConfig:
    """A diffusers `ControlNetModel` conditioning all frames or a listed subset (HARIVO 4.3)."""

    RANGES: RangeTable = {"scale": at_least(0)}

    path: str | None = None
    """ControlNetModel directory or hub id (None: no ControlNet)."""
    images: list[str] = field(default_factory=list)
    """Conditioning images: one for every controlled frame, one shared by all, or one video file."""
    frames: list[int] | None = None
    """Frame indices to condition (e.g. [0, 23] = first and last); None: every frame."""
    scale: float = 1.0
    """controlnet_conditioning_scale."""


@dataclass
class OutputConfig:
    """What is generated and written."""

    RANGES: RangeTable = {
        "seed": at_least(0),
        "videos_per_prompt": at_least(1),
        "num_frames": at_least(1),
        "height": at_least(8),
        "width": at_least(8),
        "fps": above(0),
        "decode_chunk": at_least(1),
    }

    seed: int = 0
    """Seed of the first video; video k of prompt i uses seed + i * videos_per_prompt + k."""
    videos_per_prompt: int = 1
    """Videos per prompt (HARIVO's user study: 4)."""
    num_frames: int | None = None
    """Frames F (None: the checkpoint's model.num_frames; must match it when frame tokens are on)."""
    height: int | None = None
    """Pixel height (None: the VAE's scale factor (SD: 8) x the checkpoint's model.latent_size)."""
    width: int | None = None
    """Pixel width (None: the VAE's scale factor (SD: 8) x the checkpoint's model.latent_size)."""
    fps: float = 6.0
    """Frames per second of the written mp4/gif (HARIVO: 6)."""
    mp4: bool = True
    """Write an H.264 mp4 per video."""
    gif: bool = True
    """Write a gif per video."""
    save_latents: bool = True
    """Write the final latents (B=1, C, F, h, w) as safetensors (exact regeneration checks, latent metrics)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Model dtype: 'auto' is fp16 on GPU, fp32 on CPU."""
    decode_chunk: int = 8
    """Frames per VAE decode call."""


@dataclass
class CascadeSampleConfig:
    """`--cascade`: the PYoCo chain base -> interpolation -> super-resolution (training/sampling/cascade.py)."""

    RANGES: RangeTable = {
        "sr_aug_sigma": at_least(0),
        "interp_aug_sigma": at_least(0),
        "seed_stride": at_least(0),
        "window_overlap": at_least(0),
    }

    keyframe_replacement: bool = True
    """Interpolation: keep the base's keyframes exactly (they replace the denoised estimate at their frames at
    every step); False leaves them to the model, which sees them by concatenation only."""
    sr_aug_sigma: float = 0.1
    """Super-resolution: noise augmentation sigma of the upsampled conditioning at sampling (fed to the model,
    as in training; not given in PYoCo, ours)."""
    interp_aug_sigma: float = 0.1
    """Interpolation stage trained with cascade.interp_aug_sigma_max > 0: the keyframes' augmentation sigma at
    sampling (fed to the model; ignored for a stage trained on clean keyframes)."""
    seed_stride: int = 1_000_003
    """Stage k samples with seed + k * seed_stride (independent noise per stage, reproducible)."""
    window_overlap: int = 4
    """A stage asked for more frames than it was trained on (SR: 76 frames, trained on 16-frame windows) predicts
    in windows of its trained length sharing this many frames, averaged where they overlap at every step, so
    no frame position or attention length is one the model never saw."""


@dataclass
class EvalConfig:
    """`python -m training.evaluate`: the metrics and their reference data."""

    RANGES: RangeTable = {
        "max_reference": at_least(1),
        "fvd_frames": at_least(1),
        "real_fps": above(0),
        "real_stride": at_least(1),
        "real_seed": at_least(0),
        "min_videos": at_least(1),
        "max_prompts": at_least(1),
        "domain_min_videos": at_least(2),
    }

    clip_model: str | None = "ViT-B-32"
    """open_clip model for CLIPSIM / frame consistency, pinned to ViT-B/32 as the papers' baselines report; also
    'hf-hub:...' or 'local-dir:...' (which need no clip_pretrained). None: skip."""
    clip_pretrained: str | None = None
    """open_clip weights for `clip_model`: a local file (its SHA-256 is recorded) or a tag such as 'openai' (which
    open_clip downloads). None with a bare model name: CLIPSIM is skipped (nothing downloads by default)."""
    i3d_path: str | None = None
    """StyleGAN-V's i3d_torchscript.pt (None: no FVD)."""
    reference: str | None = None
    """FVD's real videos, decoded (never VAE reconstructions): the user's webdataset shards (dir, glob or URI), a
    pipeline output dir (the shards its summary.json records), 'ucf101:ROOT[:split:fold]', 'msrvtt:ROOT', or a
    dir of video files (training/evaluation/reference.py)."""
    max_reference: int = 2048
    """At most this many real videos, one random window each (StyleGAN-V protocol: 2048)."""
    fvd_frames: int = 16
    """Frames per video in FVD (FVD16, StyleGAN-V / PYoCo): the first `fvd_frames` of each generated video and
    windows of that length of the real ones."""
    real_fps: float | None = None
    """Frame rate of the real windows (None: output.fps, the generated videos' rate)."""
    real_stride: int | None = None
    """Instead of real_fps: every k-th source frame (StyleGAN-V: 1, consecutive frames)."""
    real_seed: int = 0
    """Seeds the real windows' random starts (per video)."""
    min_videos: int = 2048
    """FVD needs at least this many real and generated videos (StyleGAN-V / PYoCo: 2048; fewer than I3D's 400
    feature dimensions give a singular covariance)."""
    allow_few_videos: bool = False
    """Compute FVD on fewer than `min_videos` anyway (warned about, recorded as below_min_videos in the report)."""
    max_prompts: int | None = None
    """Use only the first N prompts of the prompt file (None: all)."""
    domain_evaluator: str | None = None
    """A domain evaluator directory (evaluator.pt + evaluator.json, `python -m shapes.evaluator`): motion and
    attribute accuracy against the prompts, and with `reference` a domain FVD / FID (training/evaluation/domain.py)."""
    domain_sha256: str | None = None
    """The evaluator file's pinned SHA-256 (None: only the card's own checksum is checked)."""
    domain_min_videos: int = 512
    """Domain FVD / FID need at least this many real and generated videos (its 256-d video features need N > 256
    for a non-singular covariance); fewer only with `allow_few_videos` (recorded as below_min_videos)."""

    @property
    def clipsim_enabled(self) -> bool:
        """CLIPSIM runs when the CLIP's weights are named (a bare model name alone would download them)."""
        m = self.clip_model
        return bool(m) and (bool(self.clip_pretrained) or m.startswith(("local-dir:", "hf-hub:")))


@dataclass
class SampleConfig:
    """Generation (and evaluation) of videos from a trained checkpoint."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    noise: InitNoiseConfig = field(default_factory=InitNoiseConfig)
    jvid: JVIDConfig = field(default_factory=JVIDConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cascade: CascadeSampleConfig = field(default_factory=CascadeSampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Cross-field checks; raises ValueError naming the field and its value."""
        if self.sampler.steps < 1:
            raise ValueError(f"sampler.steps={self.sampler.steps} must be >= 1")
        if self.sampler.eta < 0:
            raise ValueError(f"sampler.eta={self.sampler.eta} must be >= 0")
        if not 0.0 <= self.guidance.cfg_switch <= 1.0:
            raise ValueError(f"guidance.cfg_switch={self.guidance.cfg_switch} must be in [0, 1]")
        if self.guidance.mg_alpha < 0:
            raise ValueError(f"guidance.mg_alpha={self.guidance.mg_alpha} must be >= 0")
        j = self.jvid
        if not 0.0 <= j.t_v <= j.t_e <= 1.0:
            raise ValueError(f"need 0 <= jvid.t_v={j.t_v} <= jvid.t_e={j.t_e} <= 1")
        for name in ("p_e", "p_f", "r"):
            if not 0.0 <= getattr(j, name) <= 1.0:
                raise ValueError(f"jvid.{name}={getattr(j, name)} must be in [0, 1]")
        if j.gamma < 0 or j.smooth_threshold < 0:
            raise ValueError(
                f"jvid.gamma={j.gamma} and jvid.smooth_threshold={j.smooth_threshold} must be >= 0"
            )
        if self.output.videos_per_prompt < 1:
            raise ValueError(f"output.videos_per_prompt={self.output.videos_per_prompt} must be >= 1")
        if self.output.fps <= 0:
            raise ValueError(f"output.fps={self.output.fps} must be positive")
        for name in ("height", "width"):
            v = getattr(self.output, name)
            if v is not None and (v < 8 or v % 8):
                raise ValueError(f"output.{name}={v} must be a positive multiple of 8 (the VAE's factor)")
        if self.cascade.sr_aug_sigma < 0:
            raise ValueError(f"cascade.sr_aug_sigma={self.cascade.sr_aug_sigma} must be >= 0")
        if self.controlnet.images and self.controlnet.path is None:
            raise ValueError("controlnet.images given without controlnet.path")
        if self.controlnet.path is not None and not self.controlnet.images:
            raise ValueError(f"controlnet.path={self.controlnet.path} needs controlnet.images")


def frame_baseline(cfg: SampleConfig) -> SampleConfig:
    """The frame-by-frame baseline (issue 18): every frame an independent sample of the frozen image model for the
    same prompt, seed, sampler, CFG and MG as the video model (issue 34: one judge for both). JVID with P_V = 0 at
    every step (its image model, `jvid.image_model`: 'base', the frozen base per frame, unless set otherwise), i.i.d.
    initial and step noise (no PYoCo prior, JVID r = 0, gamma = 1) and no latent smoothing. MG is kept: it is part
    of the sampler both are judged with (its pull between frames is what it is for either model)."""
    out = copy.deepcopy(cfg)
    out.jvid = replace(
        cfg.jvid, enabled=True, t_v=0.0, t_e=0.0, p_e=0.0, p_f=0.0, r=0.0, gamma=1.0, smooth_threshold=0.0
    )
    out.noise = replace(cfg.noise, prior="iid", alpha=None)
    return out
