"""Forward hooks that run the temporal layers and observe the base UNet (see `unet.py`).

The base UNet keeps its own module tree; `VideoUNet.forward` sets a shared `RunState` and the hooks on its
blocks read it: outside a `VideoUNet.forward` (num_frames None) every hook is inert, so the same `unet`
still works as a plain image model. With images in the batch (joint image-video training) the last N of
the folded frames are images: the temporal layers and the observers see the clip's F frames only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Captured:
    """What one captured forward recorded (HARIVO's TRS and DC losses read it)."""

    attention_maps: list[torch.Tensor] = field(default_factory=list)
    """Decoder self-attention probabilities in forward order, each (B, F, heads, HW, HW)."""
    hspace: torch.Tensor | None = None
    """h-space, the UNet mid-block output, (B, F, ch, h, w)."""


class RunState:
    """Per-forward state the hooks read; shared object so `copy.deepcopy(model)` stays consistent."""

    def __init__(self) -> None:
        self.num_frames: int | None = None  # None: outside VideoUNet.forward, hooks do nothing
        self.video_frames: int | None = (
            None  # the first video_frames of num_frames are the clip, the rest images
        )
        self.temporal = False
        self.checkpointing = False
        self.store: Captured | None = None
        self.capture_maps = False
        self.capture_hspace = False
        self.cond: torch.Tensor | None = None  # (B F, C_cond, H, W): cascade conditioning for conv_in
        self.level_emb: torch.Tensor | None = None  # (B F, D_temb): conditioning augmentation level


class ConditionHook:
    """Forward hook on `unet.conv_in`: adds the zero-initialised extra input channels' output.

    `conv_in(x) + extra(cond)` is `conv_in` widened to `cat([x, cond])` (conv is linear in its input
    channels), while the frozen base keeps its own weights and state dict.
    """

    def __init__(self, extra: nn.Conv2d, state: RunState):
        self.extra, self.state = extra, state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        cond = self.state.cond
        if cond is None:
            return None
        return output + self.extra(cond.to(self.extra.weight.dtype)).to(output.dtype)


class LevelHook:
    """Forward hook on `unet.time_embedding`: adds the conditioning-augmentation level embedding."""

    def __init__(self, state: RunState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        emb = self.state.level_emb
        return None if emb is None else output + emb.to(output.dtype)


class TemporalHook:
    """Forward hook running one motion module on a spatial layer's output, `(B F, C, H, W)` in and out."""

    def __init__(self, motion_module: AnimateDiffTransformer3D, state: RunState):
        self.motion_module, self.state = motion_module, state

    def __call__(self, module: nn.Module, args: tuple, output):
        s = self.state
        if s.num_frames is None or not s.temporal:
            return None
        if not isinstance(output, (tuple, torch.Tensor)):  # UNet blocks call layers with return_dict=False
            raise TypeError(f"temporal hook on {type(module).__name__} got a {type(output).__name__} output")
        hidden_states = output[0] if isinstance(output, tuple) else output  # (B (F + N), C, H, W)
        clip, images = split_images(hidden_states, s.num_frames, s.video_frames)  # (B F, ...), (B, N, ...)
        if s.checkpointing and torch.is_grad_enabled():
            clip = checkpoint(self.motion_module, clip, num_frames=s.video_frames, use_reentrant=False)
        else:
            clip = self.motion_module(clip, num_frames=s.video_frames)
        hidden_states = join_images(clip, images, s.video_frames)  # (B (F + N), C, H, W)
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states


def split_images(
    folded: torch.Tensor, frames: int, video_frames: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(clip (B F, ...), images (B, N, ...) or None) of a folded (B (F + N), ...) batch whose last N frames are
    images (joint image-video training)."""
    if video_frames == frames:
        return folded, None
    grouped = folded.reshape(-1, frames, *folded.shape[1:])  # (B, F + N, ...)
    clip = grouped[:, :video_frames].reshape(-1, *folded.shape[1:])  # (B F, ...)
    return clip, grouped[:, video_frames:]


def join_images(clip: torch.Tensor, images: torch.Tensor | None, video_frames: int) -> torch.Tensor:
    """The inverse of `split_images`: (B (F + N), ...)."""
    if images is None:
        return clip
    grouped = clip.reshape(-1, video_frames, *clip.shape[1:])  # (B, F, ...)
    return torch.cat([grouped, images], dim=1).reshape(-1, *clip.shape[1:])


class AttentionMapHook:
    """Observer on a decoder self-attention (`attn1`): recomputes softmax(q k^T * scale) from its input.

    The attention's own output is untouched (the hook returns None), so capturing cannot change the
    model's outputs; the cost is one extra q/k projection and score matrix per captured layer.
    """

    def __init__(self, state: RunState):
        self.state = state

    def __call__(self, attn: nn.Module, args: tuple, kwargs: dict, output) -> None:
        s = self.state
        if s.store is None or s.num_frames is None or not s.capture_maps:
            return None
        hidden_states = args[0] if args else kwargs["hidden_states"]  # (B F, HW, C), after norm1
        query = attn.head_to_batch_dim(attn.to_q(hidden_states), out_dim=4)  # (B F, heads, HW, d)
        key = attn.head_to_batch_dim(attn.to_k(hidden_states), out_dim=4)  # (B F, heads, HW, d)
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = (query @ key.transpose(-1, -2)) * attn.scale  # (B F, heads, HW, HW)
        probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
        bf, heads, n, _ = probs.shape
        probs = probs.reshape(bf // s.num_frames, s.num_frames, heads, n, n)  # (B, F + N, heads, HW, HW)
        s.store.attention_maps.append(probs[:, : s.video_frames])  # the clip's frames only
        return None


class HSpaceHook:
    """Observer on the mid block: records its output (B F, ch, h, w) as (B, F, ch, h, w)."""

    def __init__(self, state: RunState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        s = self.state
        if s.store is not None and s.num_frames is not None and s.capture_hspace:
            h = output[0] if isinstance(output, tuple) else output
            h = h.reshape(h.shape[0] // s.num_frames, s.num_frames, *h.shape[1:])  # (B, F + N, ch, h, w)
            s.store.hspace = h[:, : s.video_frames]  # (B, F, ch, h, w): the clip's frames only
        return None
