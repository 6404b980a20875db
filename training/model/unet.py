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

from training.config import CascadeConfig, HarivoConfig, ModelConfig
from training.model.cascade import LevelEmbedding, cond_channels, zero_conv_like
from training.model.frames import fold_frames, per_frame, unfold_frames
from training.model.harivo import ContrastiveHead, FrameTokenGenerator, MappingNetwork

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
        self.cond: torch.Tensor | None = None  # (B F, C_cond, H, W): cascade conditioning for conv_in
        self.level_emb: torch.Tensor | None = None  # (B F, D_temb): conditioning augmentation level


class _ConditionHook:
    """Forward hook on `unet.conv_in`: adds the zero-initialised extra input channels' output.

    `conv_in(x) + extra(cond)` is `conv_in` widened to `cat([x, cond])` (conv is linear in its input
    channels), while the frozen base keeps its own weights and state dict.
    """

    def __init__(self, extra: nn.Conv2d, state: _RunState):
        self.extra, self.state = extra, state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        cond = self.state.cond
        if cond is None:
            return None
        return output + self.extra(cond.to(self.extra.weight.dtype)).to(output.dtype)


class _LevelHook:
    """Forward hook on `unet.time_embedding`: adds the conditioning-augmentation level embedding."""

    def __init__(self, state: _RunState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        emb = self.state.level_emb
        return None if emb is None else output + emb.to(output.dtype)


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

    Trainable: `motion_adapter`, `mapping_network`, `frame_tokens`, `contrastive_head` (those enabled),
    and for a PYoCo cascade stage (`training/diffusion/cascade.py`) `cond_conv_in` (zero-initialised extra input
    channels for the concatenated conditioning) and `level_embedding` (SR's augmentation level).
    `forward(..., image_mode=True)` runs the same weights without temporal layers and frame tokens
    (HARIVO's `pass_motion_module`; the mapping network stays, as in its pseudo-code).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        cfg: ModelConfig | None = None,
        harivo: HarivoConfig | None = None,
        motion_adapter: MotionAdapter | None = None,
        cascade: CascadeConfig | None = None,
    ):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        harivo = harivo or HarivoConfig()
        cascade_cfg = cascade or CascadeConfig()
        self.stage = cascade_cfg.stage
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
        # Cascade conditioning (PYoCo sec. 4): extra conv_in channels, and SR's augmentation level.
        extra = cond_channels(self.stage, unet.config.in_channels)
        self.cond_conv_in = zero_conv_like(unet.conv_in, extra) if extra else None
        self.level_embedding = (
            LevelEmbedding(
                unet.config.block_out_channels[0],
                unet.time_embedding.linear_2.out_features,
                unet.config.flip_sin_to_cos,
                unet.config.freq_shift,
            )
            if self.stage == "sr" or (self.stage == "interp" and cascade_cfg.interp_aug_sigma_max > 0)
            else None
        )
        self._state = _RunState()
        self._state.checkpointing = cfg.gradient_checkpointing
        self._attach_hooks()

    @classmethod
    def from_pretrained(
        cls,
        cfg: ModelConfig,
        harivo: HarivoConfig | None = None,
        torch_dtype: torch.dtype | None = None,
        cascade: CascadeConfig | None = None,
    ) -> VideoUNet:
        """Load the base UNet (hub id or local dir) and, if `cfg.motion_adapter` is set, the temporal layers."""
        unet = UNet2DConditionModel.from_pretrained(
            cfg.pretrained, subfolder=cfg.subfolder, revision=cfg.revision, torch_dtype=torch_dtype
        )
        adapter = MotionAdapter.from_pretrained(cfg.motion_adapter) if cfg.motion_adapter else None
        return cls(unet, cfg, harivo, adapter, cascade)

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
        if self.cond_conv_in is not None:
            unet.conv_in.register_forward_hook(_ConditionHook(self.cond_conv_in, state))
        if self.level_embedding is not None:
            unet.time_embedding.register_forward_hook(_LevelHook(state))

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
        cond: torch.Tensor | None = None,
        cond_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """model_pred (B, C, F, H, W) for noisy latents (B, C, F, H, W), timesteps (B,) and text (B, M, D).

        A cascade stage also takes its conditioning `cond` (B, C_cond, F, H, W), concatenated to the input
        by the extra conv_in channels, and (SR) `cond_level` (B,), the conditioning's augmentation sigma.
        """
        b, c, f, h, w = noisy_latents.shape  # (B, C, F, H, W)
        if not image_mode and f > self.cfg.max_frames:
            raise ValueError(f"{f} frames exceed model.max_frames={self.cfg.max_frames}")
        self._check_condition(noisy_latents, cond, cond_level)
        if self.mapping_network is not None:
            noisy_latents = self.mapping_network(noisy_latents)  # (B, C, F, H, W)
        sample = fold_frames(noisy_latents)  # (B F, C, H, W)
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(b)  # (B,)
        timesteps = per_frame(timesteps, f)  # (B F,)
        text = self._frame_text(encoder_hidden_states, f, use_tokens=not image_mode)  # (B F, M [+K], D)
        state = self._state
        state.num_frames, state.temporal = f, not image_mode
        if cond is not None:
            state.cond = fold_frames(cond)  # (B F, C_cond, H, W)
        if cond_level is not None:
            level = torch.as_tensor(cond_level, device=sample.device).reshape(-1).expand(b)  # (B,)
            state.level_emb = self.level_embedding(per_frame(level, f))  # (B F, D_temb)
        try:
            out = self.unet(sample, timesteps, encoder_hidden_states=text).sample  # (B F, C, H, W)
        finally:
            state.num_frames, state.temporal = None, False
            state.cond = state.level_emb = None
        return unfold_frames(out, f)  # (B, C, F, H, W)

    def _check_condition(
        self, noisy_latents: torch.Tensor, cond: torch.Tensor | None, cond_level: torch.Tensor | None
    ) -> None:
        """A stage gets exactly the conditioning it was built for (no silent zero conditioning)."""
        b, _, f, h, w = noisy_latents.shape
        if self.cond_conv_in is None:
            if cond is not None or cond_level is not None:
                raise ValueError(f"this video model (cascade stage {self.stage!r}) takes no conditioning")
            return
        want = (b, self.cond_conv_in.in_channels, f, h, w)
        if cond is None or tuple(cond.shape) != want:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cascade stage {self.stage!r} needs cond of shape {want}, got {got}")
        if self.level_embedding is not None and cond_level is None:
            raise ValueError(f"cascade stage {self.stage!r} needs cond_level (the augmentation sigma)")
        if self.level_embedding is None and cond_level is not None:
            raise ValueError(f"cascade stage {self.stage!r} takes no cond_level")

    def _frame_text(self, encoder_hidden_states: torch.Tensor, f: int, use_tokens: bool) -> torch.Tensor:
        """Per-frame cross-attention tokens: the text tokens, plus K frame-wise tokens in video mode."""
        b, m, d = encoder_hidden_states.shape  # (B, M, D)
        if self.frame_tokens is None or not use_tokens:
            return per_frame(encoder_hidden_states, f)  # (B F, M, D)
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
