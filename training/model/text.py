"""The caption in the temporal layers (SPEC 10, `model.text_conditioning`): beside HARIVO's, which has none.

One layer per AnimateDiff motion module, run by that module's `TemporalHook` on the clip's frames:

- `TemporalCrossAttention` ('cross_attention', Video LDM / SVD: Stability's `VideoTransformerBlock.attn2`) runs
  after the motion module: at every spatial position the frame sequence (F, C) attends to the caption's tokens
  (M, D), with AnimateDiff's sinusoidal frame-position embedding; output projection zero-initialised.
- `TemporalFiLM` ('film', the cheaper variant) runs before it: the caption's mean token through a
  zero-initialised Linear(D, 2C) gives a per-channel shift and scale of the module's input, x (1 + s) + b.

Both see the clip's caption tokens (B, M, D) alone, not HARIVO's frame-wise tokens: those already reach every
frame through the base's spatial cross-attention, they differ per frame (the keys would no longer be one set
per clip) and they tie a model to the F they were built for. Both are the identity at init, so the video model
is still the base frame by frame. `TemporalTextModules` holds them as a diffusers model: they have no place in
a `MotionAdapter` (whose `AnimateDiffTransformer3D`s take no text), so the export writes them beside it.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from torch import nn

from training.config import ModelConfig
from training.model.frames import per_frame

PREFIX = "temporal_text."
"""`VideoUNet` state-dict keys of these layers start with this (the `temporal_text` attribute)."""


def pooled_caption(text: torch.Tensor) -> torch.Tensor:
    """The caption as one vector, (B, M, D) -> (B, D): the mean over all M token states, padding included.
    SD's tokenizer pads with the end token, and CLIP's causal states there each summarise the whole caption;
    the mean needs no token ids, which picking CLIP's pooled end token would."""
    return text.mean(dim=1)


class TemporalCrossAttention(nn.Module):
    """Video LDM's temporal `attn2`: LayerNorm, frame positions, cross-attention to the caption, zero-init out.

    Keys and values are one set per clip (M tokens), the same for every position and frame, so "per position,
    the F frames attend to the caption repeated for each position" is one attention of the clip's H W F queries
    on its M keys: the caption is never repeated.
    """

    before_motion_module = False

    def __init__(self, channels: int, text_dim: int, heads: int, max_frames: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.pos_embed = SinusoidalPositionalEmbedding(channels, max_seq_length=max_frames)
        self.attn = Attention(
            query_dim=channels, cross_attention_dim=text_dim, heads=heads, dim_head=channels // heads
        )
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, hidden_states: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B F, C, H, W) with the clips' captions (B, M, D) -> (B F, C, H, W)."""
        bf, c, h, w = hidden_states.shape
        b = bf // num_frames
        x = hidden_states.reshape(b, num_frames, c, h * w).permute(0, 3, 1, 2)  # (B, HW, F, C)
        x = self.pos_embed(self.norm(x).reshape(b * h * w, num_frames, c))  # (B HW, F, C)
        x = self.attn(x.reshape(b, h * w * num_frames, c), encoder_hidden_states=text)  # (B, HW F, C)
        x = x.reshape(b, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)  # (B F, C, H, W)
        return hidden_states + x


class TemporalFiLM(nn.Module):
    """FiLM of a motion module's input by the pooled caption: x (1 + scale) + shift, per clip and channel."""

    before_motion_module = True

    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B F, C, H, W) with the clips' captions (B, M, D) -> (B F, C, H, W)."""
        shift, scale = self.proj(pooled_caption(text)).chunk(2, dim=-1)  # (B, C) each
        shift = per_frame(shift, num_frames)[:, :, None, None]  # (B F, C, 1, 1)
        scale = per_frame(scale, num_frames)[:, :, None, None]  # (B F, C, 1, 1)
        return hidden_states * (1 + scale) + shift


class TemporalTextModules(ModelMixin, ConfigMixin):
    """The text layers of `model.text_conditioning`, `layers[i]` for the i-th motion module in forward order
    (down blocks, mid block, up blocks: `VideoUNet.temporal_pairs`); `channels[i]` is its width C. A diffusers
    model, so an export's `temporal_text/` loads with `from_pretrained` (the `T2VRayPipeline` component)."""

    @register_to_config
    def __init__(
        self,
        kind: str = "cross_attention",
        channels: tuple[int, ...] = (),
        text_dim: int = 768,
        heads: int = 8,
        max_frames: int = 32,
    ):
        super().__init__()
        if kind == "cross_attention":
            layers = [TemporalCrossAttention(c, text_dim, heads, max_frames) for c in channels]
        elif kind == "film":
            layers = [TemporalFiLM(c, text_dim) for c in channels]
        else:
            raise ValueError(f"text conditioning kind {kind!r}: expected 'cross_attention' or 'film'")
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> TemporalTextModules:
        """The modules of a `VideoUNet` trainable state dict (its `temporal_text.*` keys): widths read off the
        weights, the kind, heads and frame positions from `cfg`; every key must fit (strict load)."""
        if cfg.text_conditioning == "none":
            raise ValueError("model.text_conditioning=none: the model has no temporal text layers")
        state = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
        count = len({k.split(".")[1] for k in state})  # layers.{i}.*
        if cfg.text_conditioning == "cross_attention":
            channels = [state[f"layers.{i}.norm.weight"].shape[0] for i in range(count)]  # LayerNorm(C)
            text_dim = state["layers.0.attn.to_k.weight"].shape[1]  # Linear(D, C)
        else:
            channels = [state[f"layers.{i}.proj.bias"].shape[0] // 2 for i in range(count)]  # Linear(D, 2C)
            text_dim = state["layers.0.proj.weight"].shape[1]
        modules = cls(cfg.text_conditioning, tuple(channels), text_dim, cfg.temporal_heads, cfg.max_frames)
        modules.load_state_dict(state)
        return modules
