"""Config sections of the video model and its objectives (SPEC sections 2, 3, 5, 6).

Every constant of the papers is a field here, with the paper's value as default. Load with the one
config path shared by every CLI and Ray Tune:

    from pipeline.configlib import load_config
    cfg = load_config(TrainConfig, "training/configs/tiny.yaml", ["loss.lambda_trs=0.2"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.configlib import ANY, Range, RangeTable, above, at_least, between

# The runner's sections (how a run is fed, distributed and kept); importable from here as before.
from training.runner_config import DataConfig, DeepSpeedConfig, OptimConfig, RunConfig


@dataclass
class ModelConfig:
    """The frozen text-to-image UNet and the AnimateDiff-style temporal layers inserted into it."""

    RANGES: RangeTable = {
        "num_frames": at_least(1),
        "latent_size": at_least(1),
        "max_text_len": at_least(1),
        "temporal_heads": at_least(1),
        "temporal_layers": at_least(1),
        "max_frames": at_least(1),
    }

    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id or local directory of a diffusers Stable Diffusion model (SD 1.5 or 2.1 layout)."""
    subfolder: str | None = "unet"
    """Folder of the UNet inside `pretrained`; None when `pretrained` is the UNet directory itself."""
    revision: str | None = None
    """Hub revision of `pretrained` (None: the default branch)."""
    num_frames: int = 24
    """Frames per clip F (HARIVO: 24 = 4 s at 6 fps; PYoCo base: 16). Fixes the frame-token generator."""
    latent_size: int = 32
    """Latent height = width the contrastive head is built for (HARIVO: 256 px / 8)."""
    max_text_len: int = 77
    """Text tokens M per prompt (CLIP context length)."""
    temporal_heads: int = 8
    """Attention heads of each temporal transformer (AnimateDiff / diffusers MotionAdapter: 8)."""
    temporal_layers: int = 1
    """Transformer layers inside each temporal module (AnimateDiff: 1)."""
    max_frames: int = 32
    """Length of the sinusoidal frame position encoding; F may not exceed it (AnimateDiff: 32)."""
    temporal_mid_block: bool = True
    """Also put a temporal module in the UNet mid block (AnimateDiff v2 / MotionAdapter default)."""
    motion_adapter: str | None = None
    """Initialise the temporal layers from this diffusers MotionAdapter (hub id or dir) instead of zero-init."""
    gradient_checkpointing: bool = False
    """Recompute the temporal layers' activations in the backward pass (less memory, ~1/3 more compute)."""
    checkpoint_unet: bool = False
    """Recompute the whole video UNet's blocks (the frozen base's too, diffusers' block checkpointing, with
    the temporal layers inside) in the backward: the least activation memory, ~1 more forward of compute."""
    trainable_spatial: list[str] = field(default_factory=list)
    """Base-UNet parameters that train too, as fnmatch patterns over `unet.named_parameters()` names, e.g.
    ['*attentions*'] (the spatial transformers) or ['*'] (the whole UNet, PYoCo's joint fine-tuning). Empty: the
    base stays frozen (HARIVO). They train at `optim.spatial_lr` and are exported with the temporal layers."""
    text_conditioning: Literal["none", "cross_attention", "film"] = "none"
    """A text path into the temporal layers, beside HARIVO's (SPEC 10): 'none' (HARIVO / AnimateDiff: the motion
    modules attend to other frames only), 'cross_attention' (Video LDM / SVD: after each temporal transformer, the
    frame sequence at every position cross-attends to the caption's tokens, with a frame-position embedding and a
    zero-initialised output) or 'film' (the pooled caption through a zero-initialised linear map, added to the
    module's input as a shift and scale). Zero-initialised: at init the video model is the base frame by frame."""
    from_scratch: bool = False
    """Initialise the UNet randomly from `pretrained`'s UNet config instead of its weights: an image model trained
    from nothing (needs trainable_spatial=['*']; see data.image_only)."""


@dataclass
class HarivoConfig:
    """HARIVO's extra trainable components (sec. 3.2-3.5 and the appendix pseudo-code)."""

    RANGES: RangeTable = {
        "mapping_heads": at_least(1),
        "mapping_head_dim": at_least(1),
        "mapping_kernel_size": at_least(1),
        "tokens_per_frame": at_least(1),
    }

    mapping_network: bool = True
    """Put the mapping network l^M in front of the UNet, on the noisy latent (sec. 3.2)."""
    mapping_heads: int = 8
    """Heads of the mapping network's temporal self-attention (pseudo-code: 8)."""
    mapping_head_dim: int = 64
    """Channels per head of that attention (pseudo-code: 64)."""
    mapping_kernel_size: int = 3
    """Kernel size over frames of the mapping network's temporal conv residual block (not given; ours)."""
    frame_tokens: bool = True
    """Concatenate generated frame-wise tokens to the text tokens of every frame (sec. 3.5)."""
    tokens_per_frame: int = 3
    """Frame-wise tokens K per frame (sec. 3.5: 3)."""
    frame_text: Literal["tokens", "residual", "basis"] = "tokens"
    """What `frame_tokens` adds to each frame's text: `tokens` (HARIVO: K generated tokens after the M text
    tokens), `residual` (ours: a zero-initialised residual on each of the M text states, from the state, the
    mean state and a learned frame embedding, so a frame's caption can move toward the state the frame shows and
    the model at init is the base frame by frame) or `basis` (ours: the same residual as a learned time basis of
    4 polynomials times zero-initialised text terms, so a word can set the sign of a trend over the frames)."""
    frame_text_previous: bool = False
    """`residual` / `basis` also read each caption state with the one before it (ours), so word order can set a
    direction ("from left to right" against "from right to left": the same words)."""
    contrastive_head: bool = True
    """Build the projection g on the h-space needed by L_DC (sec. 3.4); training only."""


@dataclass
class LossConfig:
    """HARIVO's objective L_all = L_simple + l_TRS L_TRS + l_reg L_reg + l_DC L_DC (eq. 5)."""

    RANGES: RangeTable = {
        "lambda_trs": at_least(0),
        "lambda_reg": at_least(0),
        "lambda_dc": at_least(0),
        "tau": above(0),
        "queue_size": at_least(1),
        "cond_drop_prob": between(0, 1),
        "trs_chunk_heads": at_least(0),
        "trs_chunk_frames": at_least(0),
        "temporal_off_every": at_least(0),
        "temporal_off_shift": above(0),
    }

    lambda_trs: float = 0.1
    """Weight of the temporal regularised self-attention loss (sec. 4: 0.1)."""
    lambda_reg: float = 0.1
    """Weight of the image-model regulariser L_reg (sec. 4: 0.1)."""
    lambda_dc: float = 0.1
    """Weight of the decoupled contrastive loss on h-space (sec. 4: 0.1)."""
    tau: float = 0.1
    """Temperature of L_DC (eq. 4: 0.1)."""
    queue_size: int = 4096
    """Length of L_DC's FIFO queue of earlier positives used as negatives (not given in the paper; ours)."""
    dc_in_batch_negatives: bool = True
    """Also use the other videos of the batch as L_DC negatives (ours); false: the queue only (eq. 4 as printed)."""
    trs_reduction: Literal["sum", "mean"] = "sum"
    """L_TRS over the F - 1 frame pairs and N decoder layers: 'sum' (eq. 3) or 'mean' (sum / ((F - 1) N)), which
    keeps its scale independent of the clip length and UNet depth."""
    reg_recompute: bool = False
    """L_reg's image-mode forward keeps only its input and is recomputed in the backward (activation
    checkpointing): its gradient (to the mapping network, trainable spatial layers) without its activations,
    for one more image-mode forward of compute. Nothing on that path trains: no graph is kept either way."""
    trs_chunk_heads: int = 1
    """L_TRS builds each layer's attention maps this many heads at a time (0: all), recomputed in the backward,
    so memory holds one chunk's maps, not (B, F, heads, HW, HW) per layer; the value and gradient are the same."""
    trs_chunk_frames: int = 0
    """... and this many consecutive frame pairs at a time (0: all)."""
    temporal_off_every: int = 0
    """Every this many optimiser steps (0: never) one trains with the temporal layers and the mapping network off
    and the per-frame text (harivo.frame_tokens) on, L_simple only (ours, pilots.md D6d, V14): with them on, they
    read a clip's trajectory off its noisy frames and the text route gets little loss to learn the motion's
    direction from; on these steps the frame text alone has to draw each frame's state. The same steps on every
    rank."""
    temporal_off_shift: float | None = None
    """The timestep shift of those steps' noise levels (diffusion.timestep_shift's formula; None: that one). Where
    the latent already shows the object, the frame text has nothing to add, and the v-loss weighs those levels most:
    with the shift at 3 the off steps did not learn up from down in 200 steps, at 30 (84% of draws at t >= 850)
    they did (pilots.md V14c-d)."""
    cond_drop_prob: float = 0.1
    """Caption dropout for classifier-free guidance: the probability that a training caption's embedding is
    replaced by the empty prompt's (AnimateDiff: 0.1; JVID 4.1: 0.3); 0 never trains the unconditional branch."""


DEFAULT_ALPHA = {"iid": 0.0, "mixed": 1.0, "progressive": 2.0}
"""noise.alpha when unset: PYoCo's best per prior (sec. 5.3: mixed a = 1, progressive a = 2)."""


@dataclass
class NoiseConfig:
    """The training noise prior (PYoCo eq. 3-4); the same function draws the initial sampling noise."""

    RANGES: RangeTable = {"alpha": Range(0, infinite=True)}

    prior: Literal["iid", "mixed", "progressive"] = "iid"
    """'iid' (HARIVO, which lets the mapping network learn correlations), 'mixed' or 'progressive' (PYoCo)."""
    alpha: float | None = None
    """Correlation strength a of 'mixed'/'progressive'; 0 is i.i.d., inf a frozen video. None: the prior's best
    (PYoCo 5.3: mixed 1, progressive 2; i.i.d. 0): see `strength`."""

    @property
    def strength(self) -> float:
        """The alpha in use: `alpha`, or the prior's default when unset."""
        return DEFAULT_ALPHA[self.prior] if self.alpha is None else self.alpha


@dataclass
class DiffusionConfig:
    """Forward process and parameterisation of the training objective."""

    RANGES: RangeTable = {
        "num_train_timesteps": at_least(1),
        "beta_start": above(0),
        "beta_end": between(0, 1),
        "noise_offset": at_least(0),
        "snr_gamma": above(0),
        "timestep_shift": above(0),
    }

    objective: Literal["ddpm", "edm"] = "ddpm"
    """'ddpm': discrete timesteps and L_simple (HARIVO); 'edm': log-normal sigmas and lambda(sigma) (PYoCo)."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts under 'ddpm' (SD 1.5: epsilon; SD 2.1 768: v_prediction)."""
    num_train_timesteps: int = 1000
    """Discrete timesteps T (HARIVO App. D: 1000)."""
    beta_start: float = 0.00085
    """First beta of the schedule (HARIVO App. D)."""
    beta_end: float = 0.012
    """Last beta of the schedule (HARIVO App. D)."""
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    """diffusers beta_schedule: HARIVO/AnimateDiff train with 'linear'; SD 1.5 itself used 'scaled_linear'."""
    zero_terminal_snr: bool = False
    """'ddpm' only: rescale the betas so the last step keeps no signal, abar_T = 0 (Lin et al. 2024, Algorithm 1;
    diffusers `rescale_betas_zero_snr`). Needs prediction_type=v_prediction (epsilon is undefined at SNR 0);
    sample with sampler.timestep_spacing=trailing so the first step is t = T - 1. SD's scaled_linear otherwise
    keeps sqrt(abar_T) = 0.068 of the signal, a mean-brightness leak a model learns to rely on."""
    loss_weighting: Literal["default", "min_snr"] = "default"
    """Per-sample weight of L_simple over noise levels: 'default' (the parameterisation's own MSE: epsilon or v
    under 'ddpm', lambda(sigma) under 'edm') or 'min_snr' (Hang et al. 2023: in x0 units min(SNR, snr_gamma), i.e.
    epsilon MSE x min(SNR, gamma) / SNR, v MSE x min(SNR, gamma) / (SNR + 1))."""
    snr_gamma: float = 5.0
    """gamma of loss_weighting=min_snr (Hang et al.: 5)."""
    timestep_shift: float = 1.0
    """Training timesteps drawn toward more noise: t / T = s u / (1 + (s - 1) u), u ~ U(0, 1) (the shift of SD3,
    Esser et al. 2024, eq. 23, in DDPM time; `noise.shifted_timesteps`). 1: t ~ U{0, T-1}, HARIVO's and SD's own.
    A layout, and a motion, is decided at high noise; SVD (Blattmann et al. 2023, sec. 4) found video models need
    the training noise shifted there. 'ddpm' and edm.sigma_sampling=uniform_t only."""
    noise_offset: float = 0.0
    """Add `noise_offset` x a per-sample, per-channel N(0, 1) constant (shared over frames and
    pixels) to the training noise (offset noise, as diffusers' training scripts' `--noise_offset`). A schedule
    whose last step keeps signal (SD's: sqrt(abar_T) = 0.068) leaks each image's mean colour into x_T, so a model
    learns to read it there and at sampling takes a random colour from the noise (Lin et al. 2023, sec. 2); on
    8x8 latents that leak is strong (the shapes world's base: shapes_base.yaml). 0: off, the draws unchanged."""


@dataclass
class EDMConfig:
    """EDM preconditioning (PYoCo sec. 3, seed 000 eq. 8-17); used when diffusion.objective = 'edm'."""

    RANGES: RangeTable = {"sigma_data": above(0), "p_mean": ANY, "p_std": above(0)}

    kind: Literal["edm", "sd21", "modified"] = "sd21"
    """'sd21' (SD 2.1 as EDM, eq. 9-12: the base's own discrete timesteps, so a frozen base reads its inputs as it
    was trained), 'edm' (Karras et al.) or 'modified' (eq. 14-17, sigma_data = 1). 'edm' / 'modified' feed
    c_noise = ln(sigma)/4 (about -1.5..1.1) into a timestep embedding trained on 0..999: they are refused unless
    the base's spatial layers train (model.trainable_spatial)."""
    sigma_data: float = 0.5
    """Data standard deviation of kind 'edm' (PYoCo: 0.5)."""
    p_mean: float = -1.2
    """Mean of ln(sigma) for training (PYoCo / EDM: -1.2)."""
    p_std: float = 1.2
    """Standard deviation of ln(sigma) for training (PYoCo / EDM: 1.2)."""
    sigma_sampling: Literal["auto", "uniform_t", "lognormal"] = "auto"
    """Training noise levels: 'lognormal' (ln sigma ~ N(p_mean, p_std^2), tuned for pixels with sigma_data 0.5),
    'uniform_t' (t ~ U{0, T-1}, sigma = sigma_t of the base's discrete levels: HARIVO's / SD's own distribution;
    on SD latents the log-normal puts ~8% of samples at t >= 500, uniform t 50%). 'auto': uniform_t for kind
    'sd21', lognormal otherwise (see `sigmas_from`; the export records the config, so the choice with it)."""

    @property
    def sigmas_from(self) -> str:
        """The training sigma distribution in use ('auto' resolved by kind)."""
        if self.sigma_sampling != "auto":
            return self.sigma_sampling
        return "uniform_t" if self.kind == "sd21" else "lognormal"


@dataclass
class CascadeConfig:
    """PYoCo cascade stage (sec. 4, Fig. 3): which stage this run trains and how it is conditioned.

    Conditioning enters by channel concatenation (survey 2.1/4.1) through zero-initialised extra input
    channels, so every stage starts as the pretrained model. Stages need diffusion.objective = 'edm'.
    """

    RANGES: RangeTable = {
        "keyframe_stride": at_least(1),
        "scale": at_least(1),
        "aug_sigma_max": at_least(0),
        "interp_aug_sigma_max": at_least(0),
    }

    stage: Literal["none", "base", "interp", "sr"] = "none"
    """'none': a plain video model (HARIVO); 'base', 'interp' or 'sr': a PYoCo stage, exported as kind
    pyoco_<stage> (base: 16 keyframes; interp: fills the frames between them; sr: latent super-resolution)."""
    keyframe_stride: int = 5
    """Interpolation: frames from one keyframe to the next (PYoCo: 5, the base's frame skip; 16 -> 76 frames)."""
    cond_view: str | None = None
    """Super-resolution: the pipeline view holding the low-resolution latents of the same frames as data.view."""
    scale: int = 2
    """Super-resolution: spatial factor from cond_view's latents to data.view's (PYoCo: x4 per stage in pixels;
    here x2 in latent space)."""
    upsample: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    """Super-resolution: how the low-resolution latents are upsampled before concatenation."""
    aug_sigma_max: float = 1.0
    """Super-resolution: training noise augmentation of the conditioning, sigma_aug ~ U(0, aug_sigma_max) per
    clip (not given in PYoCo; ours). The sampler picks a fixed level (SampleConfig cascade.sr_aug_sigma)."""
    interp_aug_sigma_max: float = 0.0
    """Interpolation: the same noise augmentation of the keyframes, sigma_aug ~ U(0, max) per clip with its level
    fed to the model as SR's is (0: clean keyframes, no level embedding). Sampling: cascade.interp_aug_sigma."""


@dataclass
class TrainConfig:
    """A training run: the single-device model and objective, then optimiser, data, DeepSpeed and Ray Train."""

    model: ModelConfig = field(default_factory=ModelConfig)
    harivo: HarivoConfig = field(default_factory=HarivoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """Cross-field checks (each field's own range is in its RANGES); raises ValueError naming the fields."""
        m = self.model
        if not 1 <= m.num_frames <= m.max_frames:
            raise ValueError(
                f"model.num_frames={m.num_frames} must be in [1, model.max_frames={m.max_frames}]"
            )
        if self.loss.lambda_dc > 0 and not self.harivo.contrastive_head:
            raise ValueError(f"loss.lambda_dc={self.loss.lambda_dc} needs harivo.contrastive_head=true")
        if self.harivo.frame_text_previous and self.harivo.frame_text == "tokens":
            raise ValueError("harivo.frame_text_previous=true needs harivo.frame_text=residual or basis")
        if self.loss.temporal_off_every > 0 and not self.harivo.frame_tokens:
            raise ValueError(
                f"loss.temporal_off_every={self.loss.temporal_off_every} trains the per-frame text alone: it needs "
                "harivo.frame_tokens=true"
            )
        if self.edm.sigmas_from == "uniform_t" and self.edm.kind != "sd21":
            raise ValueError(
                f"edm.sigma_sampling=uniform_t needs the discrete levels of edm.kind=sd21, got edm.kind={self.edm.kind}"
            )
        d = self.diffusion
        shifts = {
            "diffusion.timestep_shift": d.timestep_shift,
            "loss.temporal_off_shift": self.loss.temporal_off_shift,
        }
        for name, shift in shifts.items():
            if shift not in (None, 1) and d.objective == "edm" and self.edm.sigmas_from != "uniform_t":
                raise ValueError(
                    f"{name}={shift} shifts discrete timesteps: it needs diffusion.objective=ddpm "
                    "or edm.sigma_sampling=uniform_t (lognormal sigmas move with edm.p_mean)"
                )
        if not 0 < d.beta_start < d.beta_end < 1:
            raise ValueError(
                f"need 0 < diffusion.beta_start={d.beta_start} < diffusion.beta_end={d.beta_end} < 1"
            )
        if d.zero_terminal_snr and (d.objective != "ddpm" or d.prediction_type != "v_prediction"):
            raise ValueError(
                "diffusion.zero_terminal_snr=true needs diffusion.objective=ddpm and prediction_type=v_prediction "
                f"(epsilon is undefined at SNR 0), got {d.objective} / {d.prediction_type}"
            )
        if self.run.grad_norm_every > 0 and self.deepspeed.zero_stage == 3:
            raise ValueError(
                f"run.grad_norm_every={self.run.grad_norm_every} needs deepspeed.zero_stage <= 2 (ZeRO-3 partitions the "
                "parameters the per-term gradients are taken of)"
            )
        o = self.optim
        if o.min_lr > o.lr:
            raise ValueError(f"need optim.min_lr={o.min_lr} <= optim.lr={o.lr}")
        self._validate_image_path()
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.data.val_fraction} must be in [0, 1)")
        self._validate_cascade()

    def _validate_image_path(self) -> None:
        """What trains on images, the EDM kinds a frozen base reads, and what joint training combines with."""
        m, d, o = self.model, self.data, self.optim
        spatial = bool(m.trainable_spatial)
        if m.from_scratch and "*" not in m.trainable_spatial:
            raise ValueError(
                f"model.from_scratch=true needs model.trainable_spatial=['*'], got {m.trainable_spatial}"
            )
        if o.spatial_lr is not None and not spatial:
            raise ValueError(f"optim.spatial_lr={o.spatial_lr} needs model.trainable_spatial")
        if self.diffusion.objective == "edm" and self.edm.kind != "sd21" and not spatial:
            raise ValueError(
                f"edm.kind={self.edm.kind} feeds c_noise = ln(sigma)/4 into the frozen base's timestep embedding "
                "(trained on 0..999): use edm.kind=sd21, or train the base (model.trainable_spatial)"
            )
        if (d.images_per_clip > 0 or d.image_only) and not spatial:
            field_ = "data.image_only=true" if d.image_only else f"data.images_per_clip={d.images_per_clip}"
            raise ValueError(
                f"{field_} trains nothing: images pass only the base UNet, which is frozen; set "
                "model.trainable_spatial (e.g. ['*attentions*'] or ['*'])"
            )
        if d.images_per_clip > 0:
            if d.image_only or not d.image_path:
                raise ValueError(
                    f"data.images_per_clip={d.images_per_clip} needs data.image_path (an image store from "
                    "pipeline.run) and excludes data.image_only"
                )
            if self.cascade.stage in ("interp", "sr"):
                raise ValueError(
                    f"cascade.stage={self.cascade.stage}: data.images_per_clip must be 0 (an image has no "
                    "keyframes or low-resolution frames to be conditioned on)"
                )
        if d.image_only:
            if m.num_frames != 1:
                raise ValueError(f"data.image_only=true needs model.num_frames=1, got {m.num_frames}")
            if self.harivo.mapping_network or self.cascade.stage != "none":
                raise ValueError(
                    "data.image_only=true trains a plain image UNet: set harivo.mapping_network=false and "
                    f"cascade.stage=none (got {self.harivo.mapping_network}, {self.cascade.stage})"
                )

    def _validate_cascade(self) -> None:
        c = self.cascade
        if c.stage == "none":
            return
        if self.diffusion.objective != "edm":
            raise ValueError(
                f"cascade.stage={c.stage} needs diffusion.objective=edm (PYoCo's preconditioning), "
                f"got {self.diffusion.objective}"
            )
        if c.stage == "interp":
            f, k = self.model.num_frames, c.keyframe_stride
            if k < 1 or (f - 1) % k:
                raise ValueError(
                    f"cascade.stage=interp: model.num_frames={f} must be (keyframes - 1) x "
                    f"cascade.keyframe_stride={k} + 1, so the first and last frames are keyframes"
                )
        if c.stage == "sr":
            if not c.cond_view:
                raise ValueError("cascade.stage=sr needs cascade.cond_view (the low-resolution view)")
            if c.cond_view == self.data.view:
                raise ValueError(f"cascade.cond_view={c.cond_view} must differ from data.view")
