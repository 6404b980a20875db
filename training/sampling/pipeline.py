"""The denoising pipeline (SPEC section 4): one reverse step is guided prediction -> eps/D -> MG -> update.

`VideoPipeline.sample(prompt, seed)` -> latents; `decode` -> frames. One reverse step (`VideoPipeline._predict`):
the chosen denoiser (video model, or JVID's image model) predicts for [uncond, cond] -> CFG with the
time-dependent scale -> eps -> MG (Algorithm 1) -> the sampler's update. The noise schedule is the one the
checkpoint was trained with. Loading lives in `training/sampling/loading.py`, writing in `write.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.models import TextEncoder
from training.config import DEFAULT_ALPHA, TrainConfig
from training.diffusion.cascade import StageCondition
from training.diffusion.edm import Denoiser, ddpm_sigmas, sigma_to_timestep
from training.diffusion.guidance import cfg_scale, mg_guidance
from training.diffusion.jvid import choose_video_steps, entropy_reduced_noise, smooth_latents
from training.diffusion.noise import video_noise
from training.diffusion.samplers import (
    ZERO_SNR_ALPHA_BAR,
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
from training.model.frames import frame_windows
from training.sampling.config import SampleConfig
from training.sampling.personalize import ControlNetHook

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
        text: TextEncoder,
        image_model=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        checkpoint: str | None = None,
        controlnet: ControlNetHook | None = None,
    ):
        self.video, self.train_cfg, self.cfg = video, train_cfg, cfg
        self.image_model, self.device, self.dtype = image_model, torch.device(device), dtype
        self.vae, self.text = vae, text
        self.checkpoint, self.controlnet = checkpoint, controlnet
        self._condition: StageCondition | None = None  # set by `sample` for a cascade stage
        o, m = cfg.output, train_cfg.model
        self.num_frames = o.num_frames or m.num_frames
        # pixels per latent position, as diffusers' pipelines take it from the VAE (SD: 8; the shapes world: 8 or 4)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.height = o.height or self.vae_scale_factor * m.latent_size
        self.width = o.width or self.vae_scale_factor * m.latent_size
        if self.height % self.vae_scale_factor or self.width % self.vae_scale_factor:
            raise ValueError(
                f"output.height x width = {self.height} x {self.width} must be multiples of the VAE's "
                f"{self.vae_scale_factor}x downsampling"
            )
        if video.frame_tokens is not None and self.num_frames != video.frame_tokens.num_frames:
            raise ValueError(
                f"output.num_frames={self.num_frames}: this checkpoint's frame tokens need {m.num_frames} frames"
            )
        self.noise_prior = train_cfg.noise.prior if cfg.noise.prior == "train" else cfg.noise.prior
        if cfg.noise.alpha is not None:
            self.noise_alpha = cfg.noise.alpha
        elif train_cfg.noise.alpha is not None or cfg.noise.prior == "train":
            self.noise_alpha = train_cfg.noise.strength
        else:  # another prior than the checkpoint's, no alpha given: that prior's default
            self.noise_alpha = DEFAULT_ALPHA[self.noise_prior]
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
        x_in, n = x.to(self.dtype), x.shape[0]  # text: (2N, 77, D), the N negatives then the N prompts
        if scale == 1.0:
            return fn(x_in, level, text[n:]).float()
        pred = fn(torch.cat([x_in, x_in]), level, text).float()  # (2N, C, F, h, w)
        uncond, cond = pred.chunk(2)
        return uncond + scale * (cond - uncond)

    def _model(self, i: int, video_steps: list[bool]):
        return self._video_fn if video_steps[i] else self.image_model

    def _video_fn(self, x, t, text):
        """The video model on (N, C, F, h, w); longer than it was trained on: in overlapping windows of its
        trained length, averaged where they overlap (`cascade.window_overlap`)."""
        f, trained = x.shape[2], self.train_cfg.model.num_frames
        windows = frame_windows(f, trained, self.cfg.cascade.window_overlap)
        if len(windows) == 1:
            return self._video_window(x, t, text, 0, f)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        count = torch.zeros(f, device=x.device)
        for s, e in windows:
            out[:, :, s:e] += self._video_window(x[:, :, s:e], t, text, s, e).float()
            count[s:e] += 1
        return (out / count.reshape(1, 1, -1, 1, 1)).to(x.dtype)

    def _video_window(self, x, t, text, start: int, end: int):
        c = self._condition
        if c is None:
            return self.video(x, t, text)
        n = x.shape[0]  # CFG runs [uncond, cond] in one batch: both see the same conditioning
        cond = (
            c.cond[:, :, start:end].to(x.device, x.dtype).expand(n, -1, -1, -1, -1)
        )  # (N, C_cond, F', h, w)
        level = None if c.level is None else c.level.to(x.device).reshape(-1).expand(n)  # (N,)
        return self.video(x, t, text, cond=cond, cond_level=level)

    def _mg(self, eps: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        g = self.cfg.guidance
        return mg_guidance(eps, x_t, a_t, g.mg_alpha, g.mg_reference_elements) if g.mg_alpha > 0 else eps

    # -- sampling --

    def _step_noise(self, shape, generator: torch.Generator, video_steps: list[bool]):
        j = self.cfg.jvid

        def noise(i: int) -> torch.Tensor:
            if not video_steps[i]:  # JVID eq. 8-9 on image-model steps
                return entropy_reduced_noise(shape, j.r, j.gamma, generator).to(self.device)
            return torch.randn(shape, generator=generator).to(self.device)

        return noise

    def video_steps(self, seed: int, progress: list[float]) -> list[bool]:
        """JVID's seeded per-step model choice at each step's `progress` (all video without JVID)."""
        j = self.cfg.jvid
        if not j.enabled:
            return [True] * len(progress)
        return choose_video_steps(progress, j.t_v, j.t_e, j.p_e, j.p_f, seed if j.seed is None else j.seed)

    def progress(self, levels: torch.Tensor) -> list[float]:
        """The one clock of CFG's schedule and JVID's P_V: 1 - t/T of each reverse step's noise level (t the
        timestep; for EDM samplers the discrete timestep whose sigma is nearest), 0 at pure noise."""
        if self.cfg.sampler.kind in ("ddim", "ddpm"):
            t = levels.double()
        else:
            t = sigma_to_timestep(levels.float(), self.ddpm_sigmas).double()
        return (1 - t / len(self.ddpm_sigmas)).clamp(0, 1).tolist()

    @torch.no_grad()
    def sample(self, prompt: str, seed: int, condition: StageCondition | None = None) -> SampleResult:
        """The final latents (1, C, F, h, w) for one prompt and seed (CPU generator: same noise on any device).

        `condition`: a cascade stage's conditioning (`training/diffusion/cascade.py`); its known latents (the
        interpolation keyframes) replace the denoised estimate at their frames at every step.
        """
        if condition is not None and (self.cfg.jvid.enabled or self.cfg.sampler.kind in ("ddim", "ddpm")):
            raise ValueError("a conditioned cascade stage samples with sampler.kind=euler/heun and no JVID")
        self._condition = condition
        try:
            return self._sample([prompt], [seed], condition)[0]
        finally:
            self._condition = None

    @torch.no_grad()
    def sample_batch(self, prompts: list[str], seeds: list[int]) -> list[SampleResult]:
        """`sample(prompt, seed)` for each pair, `sampler.batch_size` videos per model call: each video's noise
        comes from its own seed's generator in the same order, so a video does not depend on its batch
        (equal up to float rounding of batched kernels). Videos whose JVID model choices differ (per-seed
        schedules) go in separate batches."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
        progress = self._schedule()[2]
        groups: dict[tuple, list[int]] = {}
        for k, seed in enumerate(seeds):
            groups.setdefault(tuple(self.video_steps(seed, progress)), []).append(k)
        results: list[SampleResult | None] = [None] * len(prompts)
        size = self.cfg.sampler.batch_size
        for members in groups.values():
            for i in range(0, len(members), size):
                chunk = members[i : i + size]
                for k, r in zip(
                    chunk, self._sample([prompts[k] for k in chunk], [seeds[k] for k in chunk], None)
                ):
                    results[k] = r
        return results

    def _schedule(self):
        """(discrete schedule or None, EDM sigmas or None, each reverse step's progress) of `sampler`."""
        s = self.cfg.sampler
        if s.kind in ("ddim", "ddpm"):
            if self.train_cfg.diffusion.objective != "ddpm":
                raise ValueError(
                    f"sampler.kind={s.kind} needs a DDPM-trained checkpoint; use euler/heun for EDM"
                )
            make = ddim_scheduler if s.kind == "ddim" else ddpm_scheduler
            schedule = discrete_schedule(
                make(self.train_cfg.diffusion, s.timestep_spacing, s.steps_offset), s.steps
            )
            return schedule, None, self.progress(schedule.timesteps)
        sigmas = self._sigmas()
        return None, sigmas, self.progress(sigmas[:-1])

    def _sample(
        self, prompts: list[str], seeds: list[int], condition: StageCondition | None
    ) -> list[SampleResult]:
        cfg, s = self.cfg, self.cfg.sampler
        n = len(prompts)
        text = self.encode_prompt([cfg.guidance.negative_prompt] * n + prompts)  # (2N, 77, D): [uncond, cond]
        h, w = self.height // self.vae_scale_factor, self.width // self.vae_scale_factor  # latent size
        shape = (1, self.video.unet.config.in_channels, self.num_frames, h, w)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        x = torch.cat([video_noise(shape, self.noise_prior, self.noise_alpha, g) for g in generators]).to(
            self.device
        )  # (N, C, F, h, w)
        discrete = s.kind in ("ddim", "ddpm")
        schedule, sigmas, progress = self._schedule()
        steps = self.video_steps(seeds[0], progress)
        if any(self.video_steps(seed, progress) != steps for seed in seeds[1:]):
            raise ValueError(
                "a batch's videos must share their JVID model choices (sample_batch groups them)"
            )
        per_video = [self._step_noise(shape, g, steps) for g in generators]

        def step_noise(i: int) -> torch.Tensor:
            return torch.cat([noise(i) for noise in per_video])  # each video's draw from its own generator

        g = cfg.guidance

        def scale(i: int) -> float:
            return cfg_scale(progress[i], g.cfg_early, g.cfg_late, g.cfg_switch)

        if discrete:
            v_pred = self.train_cfg.diffusion.prediction_type == "v_prediction"

            def eps_fn(x_t: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
                a_t = schedule.alpha_bar[i].to(x_t.device)
                pred = self._predict(self._model(i, steps), x_t, t.to(self.device), text, scale(i))
                eps = v_to_eps(pred, x_t, a_t) if v_pred else pred
                # Algorithm 1 reads x0 from eps, undefined at zero terminal SNR's first step (abar = 0): no MG there
                # (the schedule's CPU value: no device sync).
                return self._mg(eps, x_t, a_t) if schedule.alpha_bar[i] > ZERO_SNR_ALPHA_BAR else eps

            if s.kind == "ddim":
                x = sample_ddim(eps_fn, x, schedule, step_noise, eta=s.eta)
            else:
                x = sample_ddpm(eps_fn, x, schedule, step_noise)
            levels = schedule.timesteps.tolist()
        else:
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
        x = x.float().cpu()
        return [SampleResult(x[k : k + 1], steps, levels) for k in range(n)]

    def _sigmas(self) -> torch.Tensor:
        s, tc = self.cfg.sampler, self.train_cfg
        continuous = tc.diffusion.objective == "edm" and tc.edm.kind in ("edm", "modified")
        lo = s.sigma_min or (0.002 if continuous else float(self.ddpm_sigmas[0]))
        hi = s.sigma_max or (80.0 if continuous else float(self.ddpm_sigmas[-1]))
        return karras_sigmas(s.steps, lo, hi, s.rho)

    def _denoiser(self, fn):
        """D(x; sigma) around fn(x, level, text): the training preconditioning, or a DDPM-trained UNet read
        as EDM (kind 'sd21', seed 000 eq. 9-12; v-prediction models included). Float32 outside the model."""
        if fn is None:
            return None
        tc = self.train_cfg
        if tc.diffusion.objective == "edm":  # as trained (`HarivoObjective.denoiser`)
            kind, sigma_data = tc.edm.kind, tc.edm.sigma_data
            prediction_type = tc.diffusion.prediction_type if kind == "sd21" else "epsilon"
        else:
            kind, sigma_data, prediction_type = "sd21", 1.0, tc.diffusion.prediction_type
        den = Denoiser(
            lambda x_in, c_noise, text: fn(x_in.to(self.dtype), c_noise, text).float(),
            kind,
            sigma_data,
            self.ddpm_sigmas,
            prediction_type,
        )
        return lambda x, sigma, text: den(x.float(), sigma.to(x.device).float().expand(x.shape[0]), text=text)
