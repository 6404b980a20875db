"""One training step's objective: noise -> noise levels -> noisy latents -> D(x) -> L_all terms.

`HarivoObjective(cfg)(model, latents, encoder_hidden_states)` returns every term of HARIVO eq. 5
separately. Single-device and framework-free: the runner calls it inside its loop and backpropagates
`terms.total` with whatever engine wraps the model.

One forward process, k-diffusion style: a noise level per sample (`training_levels`), the noisy input
(`add_noise`), the model's x0 D(x) from its raw output (`denoise`: the parameterisation), and L_simple as a
weighted x0 error (`loss_weight`: the weighting), `losses.simple_loss`. Two kinds fill these in:
- 'ddpm' (HARIVO): t ~ U{0, T-1}, `x_t = sqrt(abar_t) latents + sqrt(1 - abar_t) noise` (diffusers' schedule,
  optionally zero terminal SNR); the UNet predicts epsilon or v (`samplers.prediction_to_x0`), weighted by SNR or
  SNR + 1, which is the epsilon or v MSE.
- 'edm' (PYoCo): sigma at t ~ U{0, T-1} of the base's levels (kind 'sd21') or ln sigma ~ N(P_mean, P_std^2)
  (`edm.sigma_sampling`), `x = latents + sigma noise`, D from the configured preconditioning (`edm.Denoiser`),
  weighted by lambda(sigma). L_reg's lambda_t then uses the DDPM timestep whose sigma is nearest (the SD
  2.1-as-EDM correspondence, seed 000 eq. 12).
`diffusion.loss_weighting=min_snr` replaces either weight by min(SNR, gamma).

Joint image-video training (PYoCo): `images` (B, C, N, H, W) with their captions are concatenated after the
clip's F frames; they share the clip's noise level with i.i.d. noise, skip the temporal layers (see
`VideoUNet.forward`), and count in L_simple only.

A PYoCo cascade stage (`cfg.cascade.stage`) adds its conditioning to every forward: the keyframes and
mask (interp), or the upsampled, noise-augmented low-resolution latents and their level (sr); see
`training/diffusion/cascade.py`. The loss is the same denoising loss on all frames.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.config import TrainConfig
from training.diffusion.cascade import training_condition
from training.diffusion.edm import (
    Denoiser,
    append_dims,
    ddpm_sigmas,
    effective_sigma_data,
    loss_weight,
    sample_sigmas,
    sigma_to_timestep,
)
from training.diffusion.losses import (
    LossTerms,
    NegativeQueue,
    attention_frame_distances,
    dc_loss_from_hspace,
    min_snr_weight,
    prediction_weight,
    reg_loss,
    simple_loss,
    trs_loss,
    weighted_total,
)
from training.diffusion.noise import shifted_timesteps, video_noise
from training.diffusion.samplers import ddpm_scheduler, prediction_to_x0
from training.model.unet import VideoUNet


class HarivoObjective(nn.Module):
    """L_all of HARIVO eq. 5 for a batch; holds the schedule and L_DC's negative queue (in its state_dict)."""

    def __init__(self, cfg: TrainConfig, hspace_channels: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.scheduler = ddpm_scheduler(cfg.diffusion)
        self.register_buffer("alpha_bar", self.scheduler.alphas_cumprod.clone(), persistent=False)
        self.register_buffer("sigmas", ddpm_sigmas(self.alpha_bar), persistent=False)
        self.queue = (
            NegativeQueue(cfg.loss.queue_size, hspace_channels)
            if hspace_channels is not None and cfg.loss.lambda_dc > 0
            else None
        )

    @classmethod
    def for_model(cls, cfg: TrainConfig, model: VideoUNet) -> HarivoObjective:
        """The objective sized for `model`'s contrastive head (the queue stores its outputs)."""
        head = model.contrastive_head
        return cls(cfg, head.layers[-1].out_features if head is not None else None)

    def denoiser(self, model) -> Denoiser:
        """D(x; sigma) around `model` with the configured preconditioning; kind 'sd21' reads the base's
        `diffusion.prediction_type` (epsilon or v) as the discrete UNet predicts it."""
        e, d = self.cfg.edm, self.cfg.diffusion
        prediction_type = d.prediction_type if e.kind == "sd21" else "epsilon"
        return Denoiser(model, e.kind, e.sigma_data, self.sigmas, prediction_type)

    def training_sigmas(
        self, n: int, generator: torch.Generator | None, device, shift: float | None = None
    ) -> torch.Tensor:
        """(n,) training noise levels: sigma_t at t ~ U{0, T-1} ('uniform_t') or ln sigma ~ N(P_mean, P_std^2).
        `shift`: the timestep shift (default diffusion.timestep_shift)."""
        e = self.cfg.edm
        if e.sigmas_from == "uniform_t":
            shift = self.cfg.diffusion.timestep_shift if shift is None else shift
            t = shifted_timesteps(n, len(self.sigmas), shift, generator, device)
            return self.sigmas.to(t.device)[t]
        return sample_sigmas(n, e.p_mean, e.p_std, generator, device)

    @property
    def discrete(self) -> bool:
        return self.cfg.diffusion.objective == "ddpm"

    def training_levels(
        self, n: int, generator: torch.Generator | None, device, shift: float | None = None
    ) -> torch.Tensor:
        """(n,) noise levels: timesteps t ~ U{0, T-1} (int64, 'ddpm') or sigmas (`training_sigmas`, 'edm'), with
        the timestep shift `shift` (default diffusion.timestep_shift)."""
        d = self.cfg.diffusion
        if self.discrete:
            shift = d.timestep_shift if shift is None else shift
            return shifted_timesteps(n, d.num_train_timesteps, shift, generator, device)
        return self.training_sigmas(n, generator, device, shift)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The noisy input: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise ('ddpm') or x0 + sigma noise ('edm')."""
        if self.discrete:
            return self.scheduler.add_noise(latents, noise, level)
        return latents + noise * append_dims(level, latents.ndim)

    def snr(self, level: torch.Tensor) -> torch.Tensor:
        """(B,) signal-to-noise ratio abar_t / (1 - abar_t) = 1 / sigma^2 of each level (0 at zero terminal SNR)."""
        if self.discrete:
            a = self.alpha_bar[level]
            return a / (1 - a)
        return level.float().pow(-2)

    def loss_weight(self, level: torch.Tensor) -> torch.Tensor:
        """(B,) weight of L_simple in x0 units (`losses.simple_loss`): the parameterisation's own, or min-SNR-gamma."""
        d, e = self.cfg.diffusion, self.cfg.edm
        if d.loss_weighting == "min_snr":
            return min_snr_weight(self.snr(level), d.snr_gamma)
        if self.discrete:
            return prediction_weight(self.snr(level), d.prediction_type)
        return loss_weight(level.float(), effective_sigma_data(e.kind, e.sigma_data))

    def denoise(
        self, model: VideoUNet, x: torch.Tensor, level: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(x), the model's raw output): x0 read from the UNet's epsilon or v ('ddpm'), or the EDM denoiser."""
        if self.discrete:
            model_pred = model(x, level, **kwargs)
            a = append_dims(self.alpha_bar[level], x.ndim)
            return prediction_to_x0(
                model_pred.float(), x.float(), a, self.cfg.diffusion.prediction_type
            ), model_pred
        return self.denoiser(model)(x, level, return_model_pred=True, **kwargs)

    def forward(
        self,
        model: VideoUNet,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        generator: torch.Generator | None = None,
        image_mode: bool = False,
        cond_latents: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_text: torch.Tensor | None = None,
        temporal: bool = True,
    ) -> LossTerms:
        """All loss terms for clean latents (B, C, F, H, W) and text embeddings (B, M, D).

        `image_mode`: an image batch (F = 1, or frames to treat independently): temporal layers and
        frame tokens are skipped and only L_simple is computed (data.image_only).
        `temporal=False`: the clip with its temporal layers and mapping network off and its per-frame text on,
        L_simple only (a step of loss.temporal_off_every): the frame-text module alone has to draw each frame's state.
        `generator` drives every random draw (noise, timesteps, positive frames): one per rank.
        `cond_latents` (B, C, F, h, w): the SR stage's low-resolution latents of the same frames.
        `images` (B, C, N, H, W) and `image_text` (B, N, M, D): N images per clip (joint training).
        """
        cfg, b, f = self.cfg, latents.shape[0], latents.shape[2]
        video = not image_mode and f > 1 and temporal  # the auxiliary terms need the temporal layers
        zero = latents.new_zeros((), dtype=torch.float32)
        need_reg = video and cfg.loss.lambda_reg > 0
        need_trs = video and cfg.loss.lambda_trs > 0
        need_dc = video and cfg.loss.lambda_dc > 0
        if need_dc and (self.queue is None or model.contrastive_head is None):
            raise ValueError(
                "loss.lambda_dc > 0 needs the model's contrastive head (HarivoObjective.for_model)"
            )
        if (images is None) != (image_text is None):
            raise ValueError("images and image_text go together")

        # Cascade conditioning (none for HARIVO / the base stage), drawn before the noise.
        cond, cond_level = training_condition(cfg.cascade, latents, cond_latents, generator)
        stage_kwargs = {"cond": cond, "cond_level": cond_level} if cond is not None else {}
        if not temporal:
            stage_kwargs = {**stage_kwargs, "temporal": False}
        joint_kwargs = {**stage_kwargs, "image_text": image_text} if images is not None else stage_kwargs

        # Noise: the configured prior, correlated along F (i.i.d. for HARIVO, PYoCo mixed/progressive).
        noise = video_noise(
            latents.shape,
            cfg.noise.prior,
            cfg.noise.strength,
            generator,
            device=latents.device,
            dtype=latents.dtype,
        )  # (B, C, F, H, W)
        gen_device = generator.device if generator is not None else latents.device

        def with_images(latents: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Images after the clip on the time axis, with i.i.d. noise drawn after the clip's draws."""
            if images is None:
                return latents, noise
            image_noise = torch.randn(images.shape, generator=generator, device=gen_device)
            noise = torch.cat([noise, image_noise.to(latents.device, latents.dtype)], dim=2)
            return torch.cat([latents, images.to(latents.dtype)], dim=2), noise  # (B, C, F + N, H, W)

        # An off step draws its own levels: toward the ones where the caption sets the layout.
        shift = None if temporal else cfg.loss.temporal_off_shift
        level = self.training_levels(b, generator, gen_device, shift).to(latents.device)  # (B,) t or sigma
        latents, noise = with_images(latents, noise)
        if cfg.diffusion.noise_offset > 0:  # drawn last: with 0 the random stream is unchanged
            offset = torch.randn((b, noise.shape[1], 1, 1, 1), generator=generator, device=gen_device)
            noise = noise + cfg.diffusion.noise_offset * offset.to(noise.device, noise.dtype)
        noisy_latents = self.add_noise(latents, noise, level)  # (B, C, F [+ N], H, W)

        def predict(x: torch.Tensor, image: bool, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
            return self.denoise(
                model, x, level, encoder_hidden_states=encoder_hidden_states, image_mode=image, **kwargs
            )

        with model.capture(False, need_dc, need_trs) as captured:  # outputs unchanged
            denoised, model_pred = predict(noisy_latents, image_mode, joint_kwargs)
        simple = simple_loss(denoised, latents, self.loss_weight(level))
        reg_timesteps = level if self.discrete else sigma_to_timestep(level, self.sigmas)

        # L_reg: the same weights with temporal layers off (mapping network kept), on the clip only; no
        # L_simple on that path.
        reg = zero
        if need_reg:

            def image_path(x: torch.Tensor) -> torch.Tensor:
                return predict(x, True, stage_kwargs)[1]

            clip = noisy_latents[:, :, :f]
            if cfg.loss.reg_recompute and torch.is_grad_enabled():  # keep its input, not its activations
                image_pred = checkpoint(image_path, clip, use_reentrant=False)
            else:
                image_pred = image_path(clip)
            reg = reg_loss(model_pred[:, :, :f], image_pred, reg_timesteps, cfg.diffusion.num_train_timesteps)
        # L_TRS on the decoder self-attention maps of the frozen layers, L_DC on the h-space (the clip's frames).
        trs = zero
        if need_trs:
            chunks = (cfg.loss.trs_chunk_heads, cfg.loss.trs_chunk_frames)
            distances = [
                attention_frame_distances(a.query, a.key, a.scale, a.upcast_softmax, *chunks)
                for a in captured.attention_qk
            ]
            trs = trs_loss(distances, cfg.loss.trs_reduction)
        dc = zero
        if need_dc:
            dc = dc_loss_from_hspace(
                model.contrastive_head,
                captured.hspace,
                self.queue,
                cfg.loss.tau,
                generator,
                cfg.loss.dc_in_batch_negatives,
            )
        return weighted_total(simple, reg, trs, dc, cfg.loss)
