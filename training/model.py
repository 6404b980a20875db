"""The video UNet: a frozen diffusers `UNet2DConditionModel` plus trainable temporal layers (HARIVO 3.1, App. A).

Frames are folded into the batch for the 2D layers, `(B, C, F, H, W) <-> (B F, C, H, W)`. The
temporal layers are diffusers' AnimateDiff motion modules (`AnimateDiffTransformer3D`: GroupNorm,
sinusoidal frame positions, self-attention over frames), held in a diffusers `MotionAdapter` and run
at the places `UNetMotionModel` puts them: after every resnet(+attention) pair of the down and up
blocks and after the mid-block attention. So `model.motion_adapter.save_pretrained(dir)` is a
`MotionAdapter` that `UNetMotionModel.from_unet2d(unet, adapter)` and AnimateDiff pipelines load.

The base UNet keeps its own module tree and state dict; the temporal layers run from forward hooks on
its blocks that are inert outside `VideoUNet.forward`, so the same `unet` object still works as a
plain image model. `proj_out` of every motion module is zero-initialised: at init the video model is
the image model applied frame by frame.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.config import HarivoConfig, ModelConfig
from training.harivo import ContrastiveHead, FrameTokenGenerator, MappingNetwork

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """What one captured forward recorded (HARIVO's TRS and DC losses read it)."""

    attention_maps: list[torch.Tensor] = field(default_factory=list)
    """Decoder self-attention probabilities in forward order, each (B, F, heads, HW, HW)."""
    hspace: torch.Tensor | None = None
    """h-space, the UNet mid-block output, (B, F, ch, h, w)."""


class _RunState:
    """Per-forward state the hooks read; shared object so `copy.deepcopy(model)` stays consistent."""

    def __init__(self) -> None:
        self.num_frames: int | None = None  # None: outside VideoUNet.forward, hooks do nothing
        self.temporal = False
        self.checkpointing = False
        self.store: Captured | None = None
        self.capture_maps = False
        self.capture_hspace = False


class _TemporalHook:
    """Forward hook running one motion module on a spatial layer's output, `(B F, C, H, W)` in and out."""

    def __init__(self, motion_module: AnimateDiffTransformer3D, state: _RunState):
        self.motion_module, self.state = motion_module, state

    def __call__(self, module: nn.Module, args: tuple, output):
        s = self.state
        if s.num_frames is None or not s.temporal:
            return None
        if not isinstance(output, (tuple, torch.Tensor)):  # UNet blocks call layers with return_dict=False
            raise TypeError(f"temporal hook on {type(module).__name__} got a {type(output).__name__} output")
        hidden_states = output[0] if isinstance(output, tuple) else output  # (B F, C, H, W)
        if s.checkpointing and torch.is_grad_enabled():
            hidden_states = checkpoint(
                self.motion_module, hidden_states, num_frames=s.num_frames, use_reentrant=False
            )
        else:
            hidden_states = self.motion_module(hidden_states, num_frames=s.num_frames)
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states


class _AttentionMapHook:
    """Observer on a decoder self-attention (`attn1`): recomputes softmax(q k^T * scale) from its input.

    The attention's own output is untouched (the hook returns None), so capturing cannot change the
    model's outputs; the cost is one extra q/k projection and score matrix per captured layer.
    """

    def __init__(self, state: _RunState):
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
        s.store.attention_maps.append(probs.reshape(bf // s.num_frames, s.num_frames, heads, n, n))
        return None


class _HSpaceHook:
    """Observer on the mid block: records its output (B F, ch, h, w) as (B, F, ch, h, w)."""

    def __init__(self, state: _RunState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        s = self.state
        if s.store is not None and s.num_frames is not None and s.capture_hspace:
            h = output[0] if isinstance(output, tuple) else output
            s.store.hspace = h.reshape(
                h.shape[0] // s.num_frames, s.num_frames, *h.shape[1:]
            )  # (B, F, ch, h, w)
        return None


def build_motion_adapter(unet: UNet2DConditionModel, cfg: ModelConfig) -> MotionAdapter:
    """A diffusers `MotionAdapter` matching `unet`'s blocks, with zero-initialised output projections."""
    c = unet.config
    for ch in c.block_out_channels:
        if ch % cfg.temporal_heads or ch % c.norm_num_groups:
            raise ValueError(
                f"UNet block width {ch} is not divisible by model.temporal_heads={cfg.temporal_heads} "
                f"and norm_num_groups={c.norm_num_groups}"
            )
    adapter = MotionAdapter(
        block_out_channels=tuple(c.block_out_channels),
        motion_layers_per_block=c.layers_per_block,
        motion_transformer_layers_per_block=cfg.temporal_layers,
        motion_mid_block_layers_per_block=len(getattr(unet.mid_block, "attentions", [])) or 1,
        motion_transformer_layers_per_mid_block=cfg.temporal_layers,
        motion_num_attention_heads=cfg.temporal_heads,
        motion_norm_num_groups=c.norm_num_groups,
        motion_max_seq_length=cfg.max_frames,
        use_motion_mid_block=cfg.temporal_mid_block,
    )
    for module in adapter.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
    return adapter


def _hosts(block: nn.Module) -> nn.ModuleList:
    """The layers of a UNet block that a motion module follows: attentions if it has them, else resnets."""
    attentions = getattr(block, "attentions", None)
    return attentions if attentions is not None else block.resnets


class VideoUNet(nn.Module):
    """Frozen image UNet + temporal layers + HARIVO components; `(B, C, F, H, W)` in and out.

    Trainable: `motion_adapter`, `mapping_network`, `frame_tokens`, `contrastive_head` (those enabled).
    `forward(..., image_mode=True)` runs the same weights without temporal layers and frame tokens
    (HARIVO's `pass_motion_module`; the mapping network stays, as in its pseudo-code).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        cfg: ModelConfig | None = None,
        harivo: HarivoConfig | None = None,
        motion_adapter: MotionAdapter | None = None,
    ):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        harivo = harivo or HarivoConfig()
        self.unet = unet.requires_grad_(False).eval()
        self.motion_adapter = (
            motion_adapter if motion_adapter is not None else build_motion_adapter(unet, cfg)
        )
        self.mapping_network = (
            MappingNetwork(
                unet.config.in_channels,
                harivo.mapping_heads,
                harivo.mapping_head_dim,
                harivo.mapping_kernel_size,
            )
            if harivo.mapping_network
            else None
        )
        self.frame_tokens = (
            FrameTokenGenerator(
                unet.config.cross_attention_dim, cfg.max_text_len, harivo.tokens_per_frame, cfg.num_frames
            )
            if harivo.frame_tokens
            else None
        )
        mid_channels = unet.config.block_out_channels[-1]
        downsampling = 2 ** (len(unet.config.block_out_channels) - 1)
        if harivo.contrastive_head and cfg.latent_size % downsampling:
            raise ValueError(
                f"model.latent_size={cfg.latent_size} is not divisible by the UNet's {downsampling}"
            )
        self.contrastive_head = (
            ContrastiveHead(mid_channels, cfg.latent_size // downsampling)
            if harivo.contrastive_head
            else None
        )
        self._state = _RunState()
        self._state.checkpointing = cfg.gradient_checkpointing
        self._attach_hooks()

    @classmethod
    def from_pretrained(
        cls, cfg: ModelConfig, harivo: HarivoConfig | None = None, torch_dtype: torch.dtype | None = None
    ) -> VideoUNet:
        """Load the base UNet (hub id or local dir) and, if `cfg.motion_adapter` is set, the temporal layers."""
        unet = UNet2DConditionModel.from_pretrained(
            cfg.pretrained, subfolder=cfg.subfolder, revision=cfg.revision, torch_dtype=torch_dtype
        )
        adapter = MotionAdapter.from_pretrained(cfg.motion_adapter) if cfg.motion_adapter else None
        return cls(unet, cfg, harivo, adapter)

    def _attach_hooks(self) -> None:
        unet, adapter, state = self.unet, self.motion_adapter, self._state
        pairs: list[tuple[nn.ModuleList, nn.ModuleList, str]] = []
        for i, block in enumerate(unet.down_blocks):
            pairs.append((_hosts(block), adapter.down_blocks[i].motion_modules, f"down_blocks.{i}"))
        if adapter.mid_block is not None:
            pairs.append((unet.mid_block.attentions, adapter.mid_block.motion_modules, "mid_block"))
        for i, block in enumerate(unet.up_blocks):
            pairs.append((_hosts(block), adapter.up_blocks[i].motion_modules, f"up_blocks.{i}"))
        for hosts, motion_modules, name in pairs:
            if len(hosts) != len(motion_modules):
                raise ValueError(
                    f"motion adapter does not match the UNet at {name}: "
                    f"{len(motion_modules)} motion modules for {len(hosts)} layers"
                )
            for host, motion_module in zip(hosts, motion_modules):
                host.register_forward_hook(_TemporalHook(motion_module, state))
        for name, module in self.decoder_self_attentions():
            if module.group_norm is not None or module.spatial_norm is not None or module.norm_q is not None:
                raise NotImplementedError(f"attention-map capture does not support the norms of {name}")
            module.register_forward_hook(_AttentionMapHook(state), with_kwargs=True)
        unet.mid_block.register_forward_hook(_HSpaceHook(state))

    def decoder_self_attentions(self) -> list[tuple[str, nn.Module]]:
        """The N self-attention layers of the decoder (up blocks), in forward order (HARIVO eq. 3)."""
        return [(n, m) for n, m in self.unet.up_blocks.named_modules() if n.endswith("attn1")]

    @contextlib.contextmanager
    def capture(self, attention_maps: bool = True, hspace: bool = True) -> Iterator[Captured]:
        """Record decoder self-attention maps and/or h-space of the forwards run inside the block.

        Observers only: the model's outputs are the same with and without capture.
        """
        store = Captured()
        state = self._state
        state.store, state.capture_maps, state.capture_hspace = store, attention_maps, hspace
        try:
            yield store
        finally:
            state.store, state.capture_maps, state.capture_hspace = None, False, False

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        image_mode: bool = False,
    ) -> torch.Tensor:
        """model_pred (B, C, F, H, W) for noisy latents (B, C, F, H, W), timesteps (B,) and text (B, M, D)."""
        b, c, f, h, w = noisy_latents.shape  # (B, C, F, H, W)
        if not image_mode and f > self.cfg.max_frames:
            raise ValueError(f"{f} frames exceed model.max_frames={self.cfg.max_frames}")
        if self.mapping_network is not None:
            noisy_latents = self.mapping_network(noisy_latents)  # (B, C, F, H, W)
        sample = noisy_latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B F, C, H, W)
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(b)  # (B,)
        timesteps = timesteps.repeat_interleave(f)  # (B F,)
        text = self._frame_text(encoder_hidden_states, f, use_tokens=not image_mode)  # (B F, M [+K], D)
        state = self._state
        state.num_frames, state.temporal = f, not image_mode
        try:
            out = self.unet(sample, timesteps, encoder_hidden_states=text).sample  # (B F, C, H, W)
        finally:
            state.num_frames, state.temporal = None, False
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)

    def _frame_text(self, encoder_hidden_states: torch.Tensor, f: int, use_tokens: bool) -> torch.Tensor:
        """Per-frame cross-attention tokens: the text tokens, plus K frame-wise tokens in video mode."""
        b, m, d = encoder_hidden_states.shape  # (B, M, D)
        if self.frame_tokens is None or not use_tokens:
            return encoder_hidden_states.repeat_interleave(f, dim=0)  # (B F, M, D)
        if f != self.frame_tokens.num_frames:
            raise ValueError(
                f"the frame-token generator was built for model.num_frames={self.frame_tokens.num_frames}, got {f} frames"
            )
        tokens = self.frame_tokens(encoder_hidden_states)  # (B, F, K, D)
        text = encoder_hidden_states[:, None].expand(b, f, m, d)  # (B, F, M, D)
        return torch.cat([text, tokens], dim=2).reshape(b * f, m + tokens.shape[2], d)  # (B F, M + K, D)

    # ---- trainable weights, kept apart from the frozen base --------------------------------------

    def train(self, mode: bool = True) -> VideoUNet:
        super().train(mode)
        self.unet.eval()  # the frozen base never trains (no dropout / norm statistics drift)
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the temporal layers in the backward pass instead of storing their activations."""
        self._state.checkpointing = enabled

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight except the frozen base's (keys as in `state_dict()`, without `unet.`)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("unet.")}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        base = [k for k in state_dict if k.startswith("unet.")]
        if base:
            raise ValueError(f"trainable state dict holds frozen-base keys, e.g. {base[0]!r}")
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("unet.")]
        if strict and (missing or unexpected):
            raise KeyError(
                f"trainable state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def save_trainable(self, path: str | Path) -> Path:
        """The trainable weights alone, as one safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}, str(path)
        )
        return path

    def load_trainable(self, path: str | Path, strict: bool = True) -> None:
        self.load_trainable_state_dict(
            load_file(str(path), device=str(next(self.parameters()).device)), strict
        )
