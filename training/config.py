"""Config sections of the video model and its objectives (SPEC sections 2, 3, 5, 6).

Every constant of the papers is a field here, with the paper's value as default. Load with the one
config path shared by every CLI and Ray Tune:

    from pipeline.config import load_config
    cfg = load_config(TrainConfig, "training/configs/tiny.yaml", ["loss.lambda_trs=0.2"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """The frozen text-to-image UNet and the AnimateDiff-style temporal layers inserted into it."""

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


@dataclass
class HarivoConfig:
    """HARIVO's extra trainable components (sec. 3.2-3.5 and the appendix pseudo-code)."""

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
    contrastive_head: bool = True
    """Build the projection g on the h-space needed by L_DC (sec. 3.4); training only."""


@dataclass
class LossConfig:
    """HARIVO's objective L_all = L_simple + l_TRS L_TRS + l_reg L_reg + l_DC L_DC (eq. 5)."""

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


@dataclass
class NoiseConfig:
    """The training noise prior (PYoCo eq. 3-4); the same function draws the initial sampling noise."""

    prior: Literal["iid", "mixed", "progressive"] = "iid"
    """'iid' (HARIVO, which lets the mapping network learn correlations), 'mixed' or 'progressive' (PYoCo)."""
    alpha: float = 2.0
    """Correlation strength a of 'mixed'/'progressive'; 0 is i.i.d., inf a frozen video (PYoCo best: 1 / 2)."""


@dataclass
class DiffusionConfig:
    """Forward process and parameterisation of the training objective."""

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


@dataclass
class EDMConfig:
    """EDM preconditioning (PYoCo sec. 3, seed 000 eq. 8-17); used when diffusion.objective = 'edm'."""

    kind: Literal["edm", "sd21", "modified"] = "edm"
    """'edm' (Karras et al.), 'sd21' (SD 2.1 as EDM, eq. 9-12) or 'modified' (eq. 14-17, sigma_data = 1)."""
    sigma_data: float = 0.5
    """Data standard deviation of kind 'edm' (PYoCo: 0.5)."""
    p_mean: float = -1.2
    """Mean of ln(sigma) for training (PYoCo / EDM: -1.2)."""
    p_std: float = 1.2
    """Standard deviation of ln(sigma) for training (PYoCo / EDM: 1.2)."""


@dataclass
class TrainConfig:
    """Everything the single-device model and objective read; the runner extends it (optim, data, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    harivo: HarivoConfig = field(default_factory=HarivoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)

    def validate(self) -> None:
        """Cross-field checks; raises ValueError naming the field and its value."""
        m = self.model
        if not 1 <= m.num_frames <= m.max_frames:
            raise ValueError(
                f"model.num_frames={m.num_frames} must be in [1, model.max_frames={m.max_frames}]"
            )
        if m.latent_size < 1:
            raise ValueError(f"model.latent_size={m.latent_size} must be positive")
        if self.harivo.tokens_per_frame < 1:
            raise ValueError(f"harivo.tokens_per_frame={self.harivo.tokens_per_frame} must be >= 1")
        if self.loss.tau <= 0:
            raise ValueError(f"loss.tau={self.loss.tau} must be positive")
        if self.loss.queue_size < 1:
            raise ValueError(f"loss.queue_size={self.loss.queue_size} must be >= 1")
        for name in ("lambda_trs", "lambda_reg", "lambda_dc"):
            if getattr(self.loss, name) < 0:
                raise ValueError(f"loss.{name}={getattr(self.loss, name)} must be >= 0")
        if self.loss.lambda_dc > 0 and not self.harivo.contrastive_head:
            raise ValueError(f"loss.lambda_dc={self.loss.lambda_dc} needs harivo.contrastive_head=true")
        if not self.noise.alpha >= 0:  # also catches nan
            raise ValueError(f"noise.alpha={self.noise.alpha} must be >= 0 (inf allowed)")
        d = self.diffusion
        if not 0 < d.beta_start < d.beta_end < 1:
            raise ValueError(
                f"need 0 < diffusion.beta_start={d.beta_start} < diffusion.beta_end={d.beta_end} < 1"
            )
        if self.edm.sigma_data <= 0 or self.edm.p_std <= 0:
            raise ValueError(
                f"edm.sigma_data={self.edm.sigma_data} and edm.p_std={self.edm.p_std} must be positive"
            )
