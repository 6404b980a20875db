"""One training step's objective: noise -> timesteps/sigmas -> noisy latents -> model_pred -> L_all terms.

`HarivoObjective(cfg)(model, latents, encoder_hidden_states)` returns every term of HARIVO eq. 5
separately. Single-device and framework-free: the runner calls it inside its loop and backpropagates
`terms.total` with whatever engine wraps the model.

Two forward processes:
- 'ddpm' (HARIVO): discrete t ~ U{0, T-1}, `noisy_latents = sqrt(abar_t) latents + sqrt(1-abar_t) noise`,
  L_simple on epsilon or v.
- 'edm' (PYoCo): sigma at t ~ U{0, T-1} of the base's levels (kind 'sd21') or ln sigma ~ N(P_mean, P_std^2)
  (`edm.sigma_sampling`), `x = latents + sigma noise`, L_simple replaced by
  lambda(sigma) ||D(x; sigma) - latents||^2 with the configured preconditioning. L_reg's lambda_t then
  uses the DDPM timestep whose sigma is nearest (the SD 2.1-as-EDM correspondence, seed 000 eq. 12).

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
    ddpm_sigmas,
    edm_loss,
    effective_sigma_data,
    sample_sigmas,
    sigma_to_timestep,
)
from training.diffusion.losses import (
    LossTerms,
    NegativeQueue,
    attention_frame_distances,
    dc_loss_from_hspace,
    reg_loss,
    simple_loss,
    trs_loss,
    weighted_total,
)
from training.diffusion.noise import video_noise
from training.diffusion.samplers import ddpm_scheduler
from training.model.unet import VideoUNet


class HarivoObjective(nn.Module):
    """L_all of HARIVO eq. 5 for a batch; holds the schedule and L_DC's negative queue (in its state_dict)."""

    def __init__(self, cfg: TrainConfig, hspace_channels: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.scheduler = ddpm_scheduler(cfg.diffusion)
        self.register_buffer("sigmas", ddpm_sigmas(self.scheduler.alphas_cumprod), persistent=False)
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

    def training_sigmas(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(n,) training noise levels: sigma_t at t ~ U{0, T-1} ('uniform_t') or ln sigma ~ N(P_mean, P_std^2)."""
        e = self.cfg.edm
        if e.sigmas_from == "uniform_t":
            t = torch.randint(0, len(self.sigmas), (n,), generator=generator, device=device)
            return self.sigmas.to(t.device)[t]
        return sample_sigmas(n, e.p_mean, e.p_std, generator, device)

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
    ) -> LossTerms:
        """All loss terms for clean latents (B, C, F, H, W) and text embeddings (B, M, D).

        `image_mode`: an image batch (F = 1, or frames to treat independently): temporal layers and
        frame tokens are skipped and only L_simple is computed (data.image_only).
        `generator` drives every random draw (noise, timesteps, positive frames): one per rank.
        `cond_latents` (B, C, F, h, w): the SR stage's low-resolution latents of the same frames.
        `images` (B, C, N, H, W) and `image_text` (B, N, M, D): N images per clip (joint training).
        """
        cfg, b, f = self.cfg, latents.shape[0], latents.shape[2]
        video = not image_mode and f > 1
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

        if cfg.diffusion.objective == "ddpm":
            # Timesteps uniform over the T training steps; the forward process in closed form.
            timesteps = torch.randint(
                0, cfg.diffusion.num_train_timesteps, (b,), generator=generator, device=gen_device
            )
            timesteps = timesteps.to(latents.device)
            latents, noise = with_images(latents, noise)
            if cfg.diffusion.noise_offset > 0:  # drawn last: with 0 the random stream is unchanged
                offset = torch.randn((b, noise.shape[1], 1, 1, 1), generator=generator, device=gen_device)
                noise = noise + cfg.diffusion.noise_offset * offset.to(noise.device, noise.dtype)
            noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)  # (B, C, F [+ N], H, W)
            if cfg.diffusion.prediction_type == "epsilon":
                target = noise
            else:  # v = sqrt(abar_t) noise - sqrt(1 - abar_t) latents
                target = self.scheduler.get_velocity(latents, noise, timesteps)

            def predict(x: torch.Tensor, image: bool, kwargs: dict) -> torch.Tensor:
                return model(x, timesteps, encoder_hidden_states, image_mode=image, **kwargs)

            with model.capture(False, need_dc, need_trs) as captured:  # outputs unchanged
                model_pred = predict(noisy_latents, image_mode, joint_kwargs)
            simple = simple_loss(model_pred, target)
            reg_timesteps = timesteps
        else:
            # EDM: sigmas (uniform over the base's discrete levels, or log-normal), variance-exploding noisy
            # input; the Denoiser owns the preconditioning.
            sigma = self.training_sigmas(b, generator, gen_device).to(latents.device)
            latents, noise = with_images(latents, noise)
            denoiser = self.denoiser(model)
            noisy_latents = latents + noise * sigma.reshape(b, 1, 1, 1, 1)  # (B, C, F [+ N], H, W)

            def predict(x: torch.Tensor, image: bool, kwargs: dict) -> torch.Tensor:
                return denoiser(
                    x,
                    sigma,
                    return_model_pred=True,
                    encoder_hidden_states=encoder_hidden_states,
                    image_mode=image,
                    **kwargs,
                )

            with model.capture(False, need_dc, need_trs) as captured:
                denoised, model_pred = predict(noisy_latents, image_mode, joint_kwargs)
            sigma_data = effective_sigma_data(cfg.edm.kind, cfg.edm.sigma_data)
            simple = edm_loss(denoised.float(), latents.float(), sigma, sigma_data).mean()
            reg_timesteps = sigma_to_timestep(sigma, self.sigmas)

        # L_reg: the same weights with temporal layers off (mapping network kept), on the clip only; no
        # L_simple on that path.
        reg = zero
        if need_reg:

            def image_path(x: torch.Tensor) -> torch.Tensor:
                pred = predict(x, True, stage_kwargs)
                return pred[1] if isinstance(pred, tuple) else pred

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
