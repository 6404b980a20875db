"""Forward hooks that run the temporal layers and observe the base UNet (see `unet.py`).

The base UNet keeps its own module tree; `VideoUNet.forward` sets a shared `RunState` and the hooks on its
blocks read it: outside a `VideoUNet.forward` (num_frames None) every hook is inert, so the same `unet`
still works as a plain image model. With images in the batch (joint image-video training) the last N of
the folded frames are images: the temporal layers and the observers see the clip's F frames only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class AttentionQK:
    """What softmax(q k^T * scale) of one self-attention layer needs, for the clip's frames."""

    query: torch.Tensor
    """(B, F, heads, HW, d)"""
    key: torch.Tensor
    """(B, F, heads, HW, d)"""
    scale: float
    upcast_softmax: bool


@dataclass
class Captured:
    """What one captured forward recorded (HARIVO's TRS and DC losses read it)."""

    attention_maps: list[torch.Tensor] = field(default_factory=list)
    """Decoder self-attention probabilities in forward order, each (B, F, heads, HW, HW)."""
    attention_qk: list[AttentionQK] = field(default_factory=list)
    """The same layers' queries and keys, from which L_TRS builds the maps a chunk at a time."""
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
        self.in_checkpoint = False  # inside a block `checkpoint_replaying` recomputes: no nested checkpoint
        self.store: Captured | None = None
        self.capture_maps = False
        self.capture_hspace = False
        self.capture_qk = False
        self.cond: torch.Tensor | None = None  # (B F, C_cond, H, W): cascade conditioning for conv_in
        self.level_emb: torch.Tensor | None = None  # (B F, D_temb): conditioning augmentation level
        self.text: torch.Tensor | None = None  # (B, M, D): the clip's caption, for the temporal text layers

    SETTINGS = ("checkpointing", "in_checkpoint")
    """Fields that are settings of the model, not state of one forward: never replayed."""

    def snapshot(self) -> dict:
        """The per-forward fields as they are now, inside a forward (a block's recompute replays them)."""
        return {k: v for k, v in vars(self).items() if k not in self.SETTINGS}

    @contextlib.contextmanager
    def replay(self, snapshot: dict) -> Iterator[None]:
        """Run with `snapshot`'s fields (what a checkpointed block saw in its forward), then back to idle. What
        the hooks capture meanwhile goes to a throwaway store: the forward already recorded it."""
        vars(self).update(snapshot)
        if self.store is not None:
            self.store = Captured()
        try:
            yield
        finally:
            vars(self).update(RunState().snapshot())


def checkpoint_replaying(state: RunState):
    """diffusers' `gradient_checkpointing_func` for the frozen UNet's blocks: `torch.utils.checkpoint` that
    replays the hooks' per-forward state when the backward recomputes a block (by then the forward has
    finished and the state is idle: without the replay the temporal layers and captures would not run, and
    the recompute would not match the forward)."""

    def checkpoint_block(module: nn.Module, *args):
        live = state.snapshot()

        def run(*inputs):
            outer, state.in_checkpoint = state.in_checkpoint, True
            try:
                if state.num_frames is not None:  # the forward itself (or a recompute inside another forward)
                    return module(*inputs)
                with state.replay(live):
                    return module(*inputs)
            finally:
                state.in_checkpoint = outer

        return checkpoint(run, *args, use_reentrant=False)

    return checkpoint_block


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
    """Forward hook running one motion module on a spatial layer's output, `(B F, C, H, W)` in and out, and its
    text layer if the model has them (`text.py`: FiLM before the module, cross-attention after it)."""

    def __init__(
        self, motion_module: AnimateDiffTransformer3D, state: RunState, text_layer: nn.Module | None = None
    ):
        self.motion_module, self.state, self.text_layer = motion_module, state, text_layer

    def temporal(self, clip: torch.Tensor, text: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """The temporal layers on the clip's frames (B F, C, H, W) with their captions (B, M, D)."""
        layer = self.text_layer
        if layer is not None and layer.before_motion_module:
            clip = layer(clip, text, num_frames)
        clip = self.motion_module(clip, num_frames=num_frames)
        if layer is not None and not layer.before_motion_module:
            clip = layer(clip, text, num_frames)
        return clip

    def __call__(self, module: nn.Module, args: tuple, output):
        s = self.state
        if s.num_frames is None or not s.temporal:
            return None
        if not isinstance(output, (tuple, torch.Tensor)):  # UNet blocks call layers with return_dict=False
            raise TypeError(f"temporal hook on {type(module).__name__} got a {type(output).__name__} output")
        hidden_states = output[0] if isinstance(output, tuple) else output  # (B (F + N), C, H, W)
        clip, images = split_images(hidden_states, s.num_frames, s.video_frames)  # (B F, ...), (B, N, ...)
        if s.checkpointing and not s.in_checkpoint and torch.is_grad_enabled():
            # state is idle when the backward recomputes: pass what the layers read
            clip = checkpoint(self.temporal, clip, s.text, s.video_frames, use_reentrant=False)
        else:
            clip = self.temporal(clip, s.text, s.video_frames)
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
    """Observer on a decoder self-attention (`attn1`): recomputes softmax(q k^T * scale) from its input
    (`capture(attention_maps=True)`), or keeps only its queries and keys (`capture(attention_qk=True)`,
    what training uses: L_TRS then builds the maps a chunk at a time, never all of them at once).

    The attention's own output is untouched (the hook returns None), so capturing cannot change the
    model's outputs; the cost is one extra q/k projection (and score matrix) per captured layer.
    """

    def __init__(self, state: RunState):
        self.state = state

    def __call__(self, attn: nn.Module, args: tuple, kwargs: dict, output) -> None:
        s = self.state
        if s.store is None or s.num_frames is None or not (s.capture_maps or s.capture_qk):
            return None
        hidden_states = args[0] if args else kwargs["hidden_states"]  # (B F, HW, C), after norm1
        query = attn.head_to_batch_dim(attn.to_q(hidden_states), out_dim=4)  # (B F, heads, HW, d)
        key = attn.head_to_batch_dim(attn.to_k(hidden_states), out_dim=4)  # (B F, heads, HW, d)
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        bf, heads, n, d = query.shape
        if s.capture_qk:
            clip = lambda x: x.reshape(bf // s.num_frames, s.num_frames, heads, n, d)[:, : s.video_frames]  # noqa: E731
            s.store.attention_qk.append(AttentionQK(clip(query), clip(key), attn.scale, attn.upcast_softmax))
        if s.capture_maps:
            scores = (query @ key.transpose(-1, -2)) * attn.scale  # (B F, heads, HW, HW)
            probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
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
