"""Text-to-video sampling from a trained checkpoint (SPEC section 4): DDIM/DDPM/EDM, CFG, MG, JVID.

    python -m training.sample --checkpoint runs/demo/train --prompt "a dog runs" --output runs/demo/samples
    python -m training.sample --checkpoint RUN --prompts prompts.txt --output OUT --config \\
        training/configs/sample_jvid.yaml sampler.steps=30 jvid.gamma=0.1
    python -m training.sample --replay OUT/000-0_a-dog-runs.json --output OUT2   # regenerate exactly
    python -m training.sample --cascade base=RUN_B,interp=RUN_I,sr=RUN_S --prompt "a dog runs" \
        --output OUT --config training/configs/sample_pyoco.yaml      # PYoCo chain (training/cascade_sample.py)

Per video it writes `<name>.mp4`, `<name>.gif`, `<name>.latents.safetensors` and `<name>.json` (the
checkpoint, the full resolved `SampleConfig`, prompt, seed, timesteps and JVID's per-step model choice),
plus `samples.json` listing them all.

One reverse step (`VideoPipeline._eps`): the chosen denoiser (video model, or JVID's image model)
predicts for [uncond, cond] -> CFG with the time-dependent scale -> eps -> MG (Algorithm 1) -> the
sampler's update. The noise schedule is the one the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.config import add_config_args, from_dict, load_config, to_dict
from training.cascade import StageCondition
from training.config import TrainConfig
from training.data import TextEncoder
from training.edm import Denoiser, ddpm_sigmas, sigma_to_timestep
from training.guidance import cfg_scale, mg_guidance
from training.jvid import choose_video_steps, entropy_reduced_noise, p_video, smooth_latents
from training.model import VideoUNet
from training.noise import video_noise
from training.personalize import ControlNetHook, load_unet, merge_lora
from training.sample_config import SampleConfig
from training.samplers import (
    ddim_scheduler,
    ddpm_scheduler,
    discrete_schedule,
    karras_sigmas,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_heun,
    v_to_eps,
)
from training.video_io import VIDEO_SUFFIXES, read_image, read_video, resize_frames, write_gif, write_mp4

__all__ = ["VideoPipeline", "generate", "load_pipeline", "main", "mg_guidance", "p_video", "smooth_latents"]

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
SAMPLEABLE_KINDS = ("harivo", "pyoco_base")
"""Kinds `--checkpoint` samples on their own; the conditioned cascade stages run only in `--cascade`."""

# ---- checkpoints ------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """The trainable.safetensors of an export dir, of RUN_DIR/export, or the file itself."""
    p = Path(path)
    for candidate in (p, p / TRAINABLE_FILE, p / "export" / TRAINABLE_FILE):
        if candidate.is_file():
            return candidate
    if p.is_dir() and any(p.glob("checkpoint_*")):
        raise FileNotFoundError(
            f"{p} has training checkpoints but no export/{TRAINABLE_FILE}: DeepSpeed shards are not for "
            "sampling; let the run finish (it exports at the end)"
        )
    raise FileNotFoundError(
        f"--checkpoint {p}: expected an export dir, a run dir with export/, or {TRAINABLE_FILE}"
    )


def read_train_config(
    trainable: Path, kinds: tuple[str, ...] = SAMPLEABLE_KINDS, role: str = "training.sample"
) -> tuple[TrainConfig, str]:
    """(TrainConfig, kind) recorded with a checkpoint (file metadata, else config.yaml beside it).

    A checkpoint whose kind is not in `kinds` is refused, naming both (`role` says who needs which)."""
    with safe_open(str(trainable), framework="pt") as f:
        meta = f.metadata() or {}
    text = meta.get("t2v.config")
    if text is None and (trainable.parent / "config.yaml").is_file():
        text = (trainable.parent / "config.yaml").read_text()
    if text is None:
        raise ValueError(f"{trainable} records no training config (no t2v.config metadata, no config.yaml)")
    tree = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    kind = meta.get("t2v.kind", "harivo")
    if kind not in kinds:
        hint = (
            " (a cascade stage: use --cascade base=...,interp=...,sr=...)"
            if kind.startswith("pyoco_")
            else ""
        )
        raise ValueError(f"{trainable} is a {kind!r} checkpoint; {role} needs {' or '.join(kinds)}{hint}")
    return from_dict(TrainConfig, tree), kind


def _schedule_of(cfg: TrainConfig) -> tuple:
    d = cfg.diffusion
    return (d.objective, d.num_train_timesteps, d.beta_start, d.beta_end, d.beta_schedule)


# ---- the pipeline -------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    latents: torch.Tensor
    """Final latents (1, C, F, h, w), float32, after smoothing."""
    video_steps: list[bool]
    """Per reverse step: True where the video model predicted (all True without JVID)."""
    levels: list[float] = field(default_factory=list)
    """Timesteps (DDIM/DDPM) or sigmas (EDM) of the reverse steps."""


class VideoPipeline:
    """A loaded video model plus base components; `sample(prompt, seed)` -> latents, `decode` -> frames."""

    def __init__(
        self,
        video,
        train_cfg: TrainConfig,
        cfg: SampleConfig,
        vae,
        tokenizer,
        text_encoder,
        image_model=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        checkpoint: str | None = None,
        controlnet: ControlNetHook | None = None,
    ):
        self.video, self.train_cfg, self.cfg = video, train_cfg, cfg
        self.image_model, self.device, self.dtype = image_model, torch.device(device), dtype
        self.vae, self.text = vae, TextEncoder(tokenizer, text_encoder, self.device)
        self.checkpoint, self.controlnet = checkpoint, controlnet
        self._condition: StageCondition | None = None  # set by `sample` for a cascade stage
        o, m = cfg.output, train_cfg.model
        self.num_frames = o.num_frames or m.num_frames
        self.height = o.height or 8 * m.latent_size
        self.width = o.width or 8 * m.latent_size
        if video.frame_tokens is not None and self.num_frames != video.frame_tokens.num_frames:
            raise ValueError(
                f"output.num_frames={self.num_frames}: this checkpoint's frame tokens need {m.num_frames} frames"
            )
        self.noise_prior = train_cfg.noise.prior if cfg.noise.prior == "train" else cfg.noise.prior
        self.noise_alpha = train_cfg.noise.alpha if cfg.noise.alpha is None else cfg.noise.alpha
        self.ddpm_sigmas = ddpm_sigmas(ddpm_scheduler(train_cfg.diffusion).alphas_cumprod)
        if cfg.guidance.mg_alpha > 0 and self.num_frames < 3:
            raise ValueError(f"MG sampling needs >= 3 frames, got {self.num_frames}; set guidance.mg_alpha=0")

    # -- text, latents, pixels --

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, D) last hidden states of the base's text encoder, as training encoded captions."""
        return self.text(prompts).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (1, C, F, h, w) -> frames (F, 3, H, W) in [0, 1], frame by frame through the VAE."""
        c = self.vae.config
        z = latents[0].permute(1, 0, 2, 3) / c.scaling_factor  # (F, C, h, w)
        if getattr(c, "shift_factor", None):
            z = z + c.shift_factor
        frames = [
            self.vae.decode(chunk.to(self.device, self.vae.dtype)).sample.float()
            for chunk in z.split(self.cfg.output.decode_chunk)
        ]
        return ((torch.cat(frames) + 1) / 2).clamp(0, 1).cpu()  # (F, 3, H, W)

    # -- one guided prediction --

    def _predict(
        self, fn, x: torch.Tensor, level: torch.Tensor, text: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """CFG: pred(uncond) + w (pred(cond) - pred(uncond)), both halves in one batch; w = 1 skips uncond."""
        x_in = x.to(self.dtype)
        if scale == 1.0:
            return fn(x_in, level, text[1:]).float()
        pred = fn(torch.cat([x_in, x_in]), level, text).float()  # (2, C, F, h, w)
        uncond, cond = pred.chunk(2)
        return uncond + scale * (cond - uncond)

    def _model(self, i: int, video_steps: list[bool]):
        return self._video_fn if video_steps[i] else self.image_model

    def _video_fn(self, x, t, text):
        c = self._condition
        if c is None:
            return self.video(x, t, text)
        n = x.shape[0]  # CFG runs [uncond, cond] in one batch: both see the same conditioning
        cond = c.cond.to(x.device, x.dtype).expand(n, -1, -1, -1, -1)  # (N, C_cond, F, h, w)
        level = None if c.level is None else c.level.to(x.device).reshape(-1).expand(n)  # (N,)
        return self.video(x, t, text, cond=cond, cond_level=level)

    def _mg(self, eps: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        g = self.cfg.guidance
        return mg_guidance(eps, x_t, a_t, g.mg_alpha) if g.mg_alpha > 0 else eps

    # -- sampling --

    def _step_noise(self, shape, generator: torch.Generator, video_steps: list[bool]):
        j = self.cfg.jvid

        def noise(i: int) -> torch.Tensor:
            if not video_steps[i]:  # JVID eq. 8-9 on image-model steps
                return entropy_reduced_noise(shape, j.r, j.gamma, generator).to(self.device)
            return torch.randn(shape, generator=generator).to(self.device)

        return noise

    def video_steps(self, seed: int) -> list[bool]:
        """JVID's seeded per-step model choice (all video without JVID)."""
        j, n = self.cfg.jvid, self.cfg.sampler.steps
        if not j.enabled:
            return [True] * n
        return choose_video_steps(n, j.t_v, j.t_e, j.p_e, j.p_f, seed if j.seed is None else j.seed)

    @torch.no_grad()
    def sample(self, prompt: str, seed: int, condition: StageCondition | None = None) -> SampleResult:
        """The final latents (1, C, F, h, w) for one prompt and seed (CPU generator: same noise on any device).

        `condition`: a cascade stage's conditioning (`training/cascade.py`); its known latents (the
        interpolation keyframes) replace the denoised estimate at their frames at every step.
        """
        if condition is not None and (self.cfg.jvid.enabled or self.cfg.sampler.kind in ("ddim", "ddpm")):
            raise ValueError("a conditioned cascade stage samples with sampler.kind=euler/heun and no JVID")
        self._condition = condition
        try:
            return self._sample(prompt, seed, condition)
        finally:
            self._condition = None

    def _sample(self, prompt: str, seed: int, condition: StageCondition | None) -> SampleResult:
        cfg, s = self.cfg, self.cfg.sampler
        text = self.encode_prompt([cfg.guidance.negative_prompt, prompt])  # (2, 77, D): [uncond, cond]
        shape = (1, self.video.unet.config.in_channels, self.num_frames, self.height // 8, self.width // 8)
        generator = torch.Generator().manual_seed(seed)
        x = video_noise(shape, self.noise_prior, self.noise_alpha, generator).to(
            self.device
        )  # (1, C, F, h, w)
        steps = self.video_steps(seed)
        step_noise = self._step_noise(shape, generator, steps)
        g = cfg.guidance

        def scale(i: int) -> float:
            return cfg_scale(i / s.steps, g.cfg_early, g.cfg_late, g.cfg_switch)

        if s.kind in ("ddim", "ddpm"):
            if self.train_cfg.diffusion.objective != "ddpm":
                raise ValueError(
                    f"sampler.kind={s.kind} needs a DDPM-trained checkpoint; use euler/heun for EDM"
                )
            make = ddim_scheduler if s.kind == "ddim" else ddpm_scheduler
            schedule = discrete_schedule(
                make(self.train_cfg.diffusion, s.timestep_spacing, s.steps_offset), s.steps
            )
            v_pred = self.train_cfg.diffusion.prediction_type == "v_prediction"

            def eps_fn(x_t: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
                a_t = schedule.alpha_bar[i].to(x_t.device)
                pred = self._predict(self._model(i, steps), x_t, t.to(self.device), text, scale(i))
                eps = v_to_eps(pred, x_t, a_t) if v_pred else pred
                return self._mg(eps, x_t, a_t)

            if s.kind == "ddim":
                x = sample_ddim(eps_fn, x, schedule, step_noise, eta=s.eta)
            else:
                x = sample_ddpm(eps_fn, x, schedule, step_noise)
            levels = schedule.timesteps.tolist()
        else:
            sigmas = self._sigmas()
            denoise = {True: self._denoiser(self._video_fn), False: self._denoiser(self.image_model)}

            def known(d: torch.Tensor) -> torch.Tensor:
                """Keep the given latents (interpolation keyframes) where they are known."""
                if condition is None or condition.known is None:
                    return d
                mask = condition.known_mask.to(d.device).reshape(1, 1, -1, 1, 1)  # (1, 1, F, 1, 1)
                return torch.where(mask, condition.known.to(d.device, d.dtype), d)

            def denoise_fn(x_s: torch.Tensor, sigma: torch.Tensor, i: int) -> torch.Tensor:
                fn = denoise[steps[i]]
                d = self._predict(fn, x_s, sigma.reshape(1), text, scale(i))  # CFG on D is CFG on eps
                if g.mg_alpha <= 0:
                    return known(d)
                # MG in DDPM terms: x_t = x / sqrt(1 + sigma^2), abar = 1 / (1 + sigma^2), eps = (x - D) / sigma.
                a_t = 1 / (1 + sigma.float() ** 2)
                eps = self._mg((x_s - d) / sigma, x_s * a_t**0.5, a_t)
                return known(x_s - sigma * eps)

            sampler = sample_euler if s.kind == "euler" else sample_heun
            x = sampler(
                denoise_fn, x * sigmas[0], sigmas, step_noise, s.s_churn, s.s_tmin, s.s_tmax, s.s_noise
            )
            levels = sigmas[:-1].tolist()
        if cfg.jvid.enabled and cfg.jvid.smooth_threshold > 0:
            x = smooth_latents(x, cfg.jvid.smooth_threshold)  # JVID 3.6, on the final latent video
        return SampleResult(x.float().cpu(), steps, levels)

    def _sigmas(self) -> torch.Tensor:
        s, tc = self.cfg.sampler, self.train_cfg
        continuous = tc.diffusion.objective == "edm" and tc.edm.kind in ("edm", "modified")
        lo = s.sigma_min or (0.002 if continuous else float(self.ddpm_sigmas[0]))
        hi = s.sigma_max or (80.0 if continuous else float(self.ddpm_sigmas[-1]))
        return karras_sigmas(s.steps, lo, hi, s.rho)

    def _denoiser(self, fn):
        """D(x; sigma) around fn(x, level, text): the training preconditioning, or an eps model read as EDM."""
        if fn is None:
            return None
        tc = self.train_cfg
        if tc.diffusion.objective == "edm":
            den = Denoiser(
                lambda x_in, c_noise, text: fn(x_in, c_noise, text),
                tc.edm.kind,
                tc.edm.sigma_data,
                self.ddpm_sigmas,
            )
            return lambda x, sigma, text: den(x, sigma.to(x.device).float().expand(x.shape[0]), text=text)
        v_pred = tc.diffusion.prediction_type == "v_prediction"

        def eps_model(x, sigma, text):  # seed 000 eq. 9-12 (plus v -> eps for v-prediction models)
            sigma = sigma.to(x.device).float()
            a_t = 1 / (1 + sigma**2)
            x_t = x * a_t**0.5
            t = sigma_to_timestep(sigma, self.ddpm_sigmas).reshape(-1).expand(x.shape[0])
            pred = fn(x_t.to(self.dtype), t, text).float()
            eps = v_to_eps(pred, x_t.float(), a_t) if v_pred else pred
            return x.float() - sigma * eps

        return eps_model


# ---- loading ----------------------------------------------------------------------------------------------


def _device_dtype(cfg: SampleConfig) -> tuple[torch.device, torch.dtype]:
    o = cfg.output
    device = torch.device(
        "cuda"
        if o.device == "auto" and torch.cuda.is_available()
        else ("cpu" if o.device == "auto" else o.device)
    )
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = names.get(o.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _per_frame(unet):
    """The image model as JVID uses it: frames folded into the batch, `(B, C, F, h, w)` in and out."""

    def fn(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        sample = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B F, C, h, w)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).repeat_interleave(f)  # (B F,)
        out = unet(sample, t, encoder_hidden_states=text.repeat_interleave(f, dim=0)).sample
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)

    return fn


def _build_video_model(trainable: Path, train_cfg: TrainConfig, base_unet, device, dtype) -> VideoUNet:
    model = (
        VideoUNet(base_unet, train_cfg.model, train_cfg.harivo, cascade=train_cfg.cascade)
        if base_unet is not None
        else VideoUNet.from_pretrained(train_cfg.model, train_cfg.harivo, cascade=train_cfg.cascade)
    )
    model.load_trainable(trainable)
    return model.to(device, dtype).eval().requires_grad_(False)


def _check_base_schedule(path: str, train_cfg: TrainConfig) -> None:
    sched = Path(path) / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return
    sc, d = json.loads(sched.read_text()), train_cfg.diffusion
    base = (sc.get("num_train_timesteps"), sc.get("beta_start"), sc.get("beta_end"), sc.get("beta_schedule"))
    mine = (d.num_train_timesteps, d.beta_start, d.beta_end, d.beta_schedule)
    if base != mine:  # e.g. SD 1.5 'scaled_linear' vs HARIVO's 'linear' fine-tuning schedule
        log.warning(
            "JVID image model %s was trained with schedule %s, the video model with %s; JVID assumes "
            "both share one schedule",
            path,
            base,
            mine,
        )


def _image_model(cfg: SampleConfig, video: VideoUNet, train_cfg: TrainConfig, device, dtype):
    """JVID's image denoiser fn(x, t, text) on `(B, C, F, h, w)`."""
    spec = cfg.jvid.image_model
    if spec == "image_mode":
        return lambda x, t, text: video(x, t, text, image_mode=True)
    if spec == "base":
        if train_cfg.diffusion.objective == "edm" and train_cfg.edm.kind != "sd21":
            raise ValueError(
                f"jvid.image_model=base is an eps model, but this checkpoint is EDM kind "
                f"{train_cfg.edm.kind!r}; use jvid.image_model=image_mode"
            )
        _check_base_schedule(cfg.base.unet or train_cfg.model.pretrained, train_cfg)
        return _per_frame(video.unet)
    p = Path(spec)
    try:
        trainable = resolve_checkpoint(p)
    except FileNotFoundError:
        trainable = None
    if trainable is not None:
        other_cfg, _ = read_train_config(trainable)
        if _schedule_of(other_cfg) != _schedule_of(train_cfg):
            raise ValueError(
                f"jvid.image_model={spec} was trained with schedule {_schedule_of(other_cfg)}, the "
                f"video model with {_schedule_of(train_cfg)}; JVID needs one shared schedule"
            )
        other = _build_video_model(trainable, other_cfg, None, device, dtype)
        return lambda x, t, text: other(x, t, text, image_mode=True)
    _check_base_schedule(spec, train_cfg)
    return _per_frame(load_unet(spec).to(device, dtype).eval().requires_grad_(False))


def _control_images(cfg: SampleConfig, frames: list[int], height: int, width: int) -> torch.Tensor:
    """(len(frames), 3, H, W) in [0, 1] from controlnet.images."""
    files = cfg.controlnet.images
    if len(files) == 1 and Path(files[0]).suffix.lower() in VIDEO_SUFFIXES:
        video = read_video(files[0])
        if max(frames) >= len(video):
            raise ValueError(
                f"controlnet.images={files[0]} has {len(video)} frames, frame {max(frames)} needed"
            )
        images = video[frames]
    else:
        images = torch.stack([read_image(f) for f in files])
        if len(images) == 1:
            images = images.expand(len(frames), -1, -1, -1)
        elif len(images) != len(frames):
            raise ValueError(f"{len(images)} controlnet.images for {len(frames)} controlled frames")
    return resize_frames(images, height, width)


def load_pipeline(
    checkpoint: str | Path,
    cfg: SampleConfig,
    kinds: tuple[str, ...] = SAMPLEABLE_KINDS,
    role: str = "training.sample --checkpoint",
) -> VideoPipeline:
    """Load the video model of `checkpoint` with its base (or the swapped one) and the sampler's extras.

    `kinds`: the checkpoint kinds accepted (a cascade loads each stage with its own)."""
    from diffusers import AutoencoderKL, ControlNetModel
    from transformers import CLIPTextModel, CLIPTokenizer

    trainable = resolve_checkpoint(checkpoint)
    train_cfg, _ = read_train_config(trainable, kinds, role)
    device, dtype = _device_dtype(cfg)
    base_dir = cfg.base.pretrained or train_cfg.model.pretrained
    if cfg.base.pretrained is None and train_cfg.model.subfolder is None:
        raise ValueError(
            f"model.pretrained={base_dir} is a bare UNet dir; set base.pretrained to an SD dir "
            "for the VAE, text encoder and tokenizer"
        )
    rev = train_cfg.model.revision if cfg.base.pretrained is None else None
    tokenizer = CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer", revision=rev)
    text_encoder = CLIPTextModel.from_pretrained(
        base_dir, subfolder="text_encoder", revision=rev, dtype=dtype
    )
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae", revision=rev, torch_dtype=dtype)
    base_unet = load_unet(cfg.base.unet) if cfg.base.unet else None  # DreamBooth-style swap
    if cfg.base.lora:
        if base_unet is None:
            from diffusers import UNet2DConditionModel

            m = train_cfg.model
            base_unet = UNet2DConditionModel.from_pretrained(
                m.pretrained, subfolder=m.subfolder, revision=m.revision
            )
        merge_lora({"unet": base_unet, "text_encoder": text_encoder}, cfg.base.lora, cfg.base.lora_scale)
    video = _build_video_model(trainable, train_cfg, base_unet, device, dtype)
    vae.to(device).eval().requires_grad_(False)
    image_model = _image_model(cfg, video, train_cfg, device, dtype) if cfg.jvid.enabled else None
    pipe = VideoPipeline(
        video,
        train_cfg,
        cfg,
        vae,
        tokenizer,
        text_encoder,
        image_model,
        device,
        dtype,
        str(trainable.resolve()),
    )
    if cfg.controlnet.path:
        c = cfg.controlnet
        frames = list(range(pipe.num_frames)) if c.frames is None else [f % pipe.num_frames for f in c.frames]
        controlnet = ControlNetModel.from_pretrained(c.path).to(device, dtype).eval().requires_grad_(False)
        cond = _control_images(cfg, frames, pipe.height, pipe.width)
        pipe.controlnet = ControlNetHook(controlnet, cond, pipe.num_frames, frames, c.scale).attach(
            video.unet
        )
    return pipe


# ---- writing ------------------------------------------------------------------------------------------------


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def write_videos(
    sample_one: Callable[[str, int], tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor], dict]],
    cfg: SampleConfig,
    prompts: list[str],
    output: str | Path,
    keep: bool = False,
) -> list[dict]:
    """Every prompt x videos_per_prompt through `sample_one(prompt, seed)` -> (frames (F, 3, H, W), latents
    (one tensor, or one per cascade stage), record fields); writes mp4 / gif / latents and a JSON record per
    video, then `samples.json`. Returns the records (with the tensors if `keep`)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    o = cfg.output
    records = []
    for i, prompt in enumerate(prompts):
        for k in range(o.videos_per_prompt):
            seed = o.seed + i * o.videos_per_prompt + k
            name = f"{i:03d}-{k}_{_slug(prompt)}"
            t0 = time.perf_counter()
            frames, latents, fields = sample_one(prompt, seed)
            files = {}
            if o.mp4:
                files["mp4"] = write_mp4(frames, out / f"{name}.mp4", o.fps).name
            if o.gif:
                files["gif"] = write_gif(frames, out / f"{name}.gif", o.fps).name
            if o.save_latents:
                tensors = latents if isinstance(latents, dict) else {"latents": latents}
                save_file(
                    {s: v.contiguous() for s, v in tensors.items()}, str(out / f"{name}.latents.safetensors")
                )
                files["latents"] = f"{name}.latents.safetensors"
            record = {"prompt": prompt, "seed": seed, "name": name, "files": files, "config": to_dict(cfg)}
            record.update(fields, seconds=round(time.perf_counter() - t0, 3))
            (out / f"{name}.json").write_text(json.dumps(record, indent=2))
            if keep:
                record = {**record, "latents": latents, "frames": frames}
            records.append(record)
            log.info("wrote %s (%s, seed %d)", name, prompt, seed)
    index = [{k: v for k, v in r.items() if k not in ("latents", "frames", "config")} for r in records]
    (out / "samples.json").write_text(json.dumps({"config": to_dict(cfg), "videos": index}, indent=2))
    return records


def generate(pipe: VideoPipeline, prompts: list[str], output: str | Path, keep: bool = False) -> list[dict]:
    """Sample, decode and write every prompt x videos_per_prompt; returns the records (with tensors if `keep`)."""
    import diffusers

    def sample_one(prompt: str, seed: int):
        result = pipe.sample(prompt, seed)
        resolved = {
            "num_frames": pipe.num_frames,
            "height": pipe.height,
            "width": pipe.width,
            "fps": pipe.cfg.output.fps,
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "noise_prior": pipe.noise_prior,
            "noise_alpha": pipe.noise_alpha,
            "levels": result.levels,
            "video_steps": result.video_steps,
            "train_diffusion": to_dict(pipe.train_cfg.diffusion),
        }
        versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
        fields = {"checkpoint": pipe.checkpoint, "resolved": resolved, "versions": versions}
        return pipe.decode(result.latents), result.latents, fields

    return write_videos(sample_one, pipe.cfg, prompts, output, keep)


def replay(record_path: str | Path, output: str | Path, checkpoint: str | None = None) -> dict:
    """Regenerate one video exactly from the JSON `generate` (or the cascade's) wrote next to it."""
    rec = json.loads(Path(record_path).read_text())
    cfg = from_dict(SampleConfig, rec["config"])
    cfg.output.seed, cfg.output.videos_per_prompt = rec["seed"], 1
    if "checkpoints" in rec:  # a --cascade record: every stage's checkpoint
        from training.cascade_sample import generate_cascade, load_cascade

        return generate_cascade(load_cascade(rec["checkpoints"], cfg), [rec["prompt"]], output)[0]
    pipe = load_pipeline(checkpoint or rec["checkpoint"], cfg)
    return generate(pipe, [rec["prompt"]], output)[0]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m training.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="export dir, RUN_DIR (uses RUN_DIR/export) or trainable.safetensors")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--output", required=True, help="directory for mp4/gif/latents/JSON")
    p.add_argument("--replay", help="a JSON written by an earlier run: regenerate that video exactly")
    p.add_argument(
        "--cascade",
        help="PYoCo chain base=CKPT,interp=CKPT,sr=CKPT (interp and sr optional): sample, upsample, decode",
    )
    add_config_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.replay:
        return [replay(a.replay, a.output, a.checkpoint)]
    if bool(a.checkpoint) == bool(a.cascade):
        p.error("give exactly one of --checkpoint and --cascade (unless --replay)")
    prompts = list(a.prompt) + (read_prompts(a.prompts) if a.prompts else [])
    if not prompts:
        p.error("give --prompt and/or --prompts")
    cfg = load_config(SampleConfig, a.config, a.overrides)
    if a.cascade:
        from training.cascade_sample import generate_cascade, load_cascade, parse_cascade

        records = generate_cascade(load_cascade(parse_cascade(a.cascade), cfg), prompts, a.output)
        print(f"wrote {len(records)} cascade videos to {a.output}")
        return records
    records = generate(load_pipeline(a.checkpoint, cfg), prompts, a.output)
    print(f"wrote {len(records)} videos to {a.output}")
    return records


if __name__ == "__main__":
    main()
