"""The video UNet: a frozen diffusers `UNet2DConditionModel` plus trainable temporal layers (HARIVO 3.1, App. A).

Frames are folded into the batch for the 2D layers, `(B, C, F, H, W) <-> (B F, C, H, W)`. The
temporal layers are diffusers' AnimateDiff motion modules (`AnimateDiffTransformer3D`: GroupNorm,
sinusoidal frame positions, self-attention over frames), held in a diffusers `MotionAdapter` and run
at the places `UNetMotionModel` puts them: after every resnet(+attention) pair of the down and up
blocks and after the mid-block attention. So `model.motion_adapter.save_pretrained(dir)` is a
`MotionAdapter` that `UNetMotionModel.from_unet2d(unet, adapter)` and AnimateDiff pipelines load.

The base UNet keeps its own module tree and state dict; the temporal layers run from forward hooks on
its blocks (`hooks.py`) that are inert outside `VideoUNet.forward`, so the same `unet` object still works as a
plain image model. `proj_out` of every motion module is zero-initialised: at init the video model is
the image model applied frame by frame. `model.text_conditioning` adds a text layer beside every motion
module (`text.py`, zero-initialised too), run by the same hook. The base stays frozen unless
`model.trainable_spatial` names some of its parameters (joint image-video training, or an image model
trained from scratch).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from safetensors.torch import load_file, save_file
from torch import nn

from training.config import CascadeConfig, HarivoConfig, ModelConfig
from training.model.cascade import LevelEmbedding, cond_channels, zero_conv_like
from training.model.frames import fold_frames, per_frame, unfold_frames
from training.model.harivo import ContrastiveHead, FrameTextBasis, FrameTextResidual, harivo_modules
from training.model.hooks import (
    AttentionMapHook,
    Captured,
    ConditionHook,
    HSpaceHook,
    LevelHook,
    RunState,
    TemporalHook,
    checkpoint_replaying,
)
from training.model.text import TemporalTextModules

log = logging.getLogger(__name__)


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


def spatial_parameter_names(unet: nn.Module, patterns: list[str]) -> frozenset[str]:
    """The names of `unet`'s parameters matching any fnmatch pattern (model.trainable_spatial); a pattern that
    matches nothing is an error (a typo would otherwise silently train nothing)."""
    names = [n for n, _ in unet.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ValueError(
                f"model.trainable_spatial pattern {pattern!r} matches no UNet parameter (e.g. {names[0]!r})"
            )
        chosen.update(hits)
    return frozenset(chosen)


def _hosts(block: nn.Module) -> nn.ModuleList:
    """The layers of a UNet block that a motion module follows: attentions if it has them, else resnets."""
    attentions = getattr(block, "attentions", None)
    return attentions if attentions is not None else block.resnets


class VideoUNet(nn.Module):
    """Frozen image UNet + temporal layers + HARIVO components; `(B, C, F, H, W)` in and out.

    Trainable: `motion_adapter`, `temporal_text` (model.text_conditioning), `mapping_network`,
    `frame_tokens`, `contrastive_head` (those enabled), for a PYoCo cascade stage
    (`training/diffusion/cascade.py`) `cond_conv_in` (zero-initialised extra input channels for the
    concatenated conditioning) and `level_embedding` (SR's augmentation level), and the base UNet's
    parameters named by `model.trainable_spatial` (`spatial_names`; joint image-video training).
    `forward(..., image_mode=True)` runs the same weights without temporal layers (text layers included) and
    frame tokens (HARIVO's `pass_motion_module`; the mapping network stays, as in its pseudo-code).
    `forward(..., image_text=...)` takes N images concatenated after the clip's F frames (PYoCo's joint
    training): they skip the temporal layers, mapping network and frame tokens, each with its own caption.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        cfg: ModelConfig | None = None,
        harivo: HarivoConfig | None = None,
        motion_adapter: MotionAdapter | None = None,
        cascade: CascadeConfig | None = None,
        temporal_text: TemporalTextModules | None = None,
    ):
        """`motion_adapter` / `temporal_text`: loaded layers to run (shared, not copied), not new zero-init ones."""
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        harivo = harivo or HarivoConfig()
        cascade_cfg = cascade or CascadeConfig()
        self.stage = cascade_cfg.stage
        self.unet = unet.requires_grad_(False).eval()
        self.spatial_names = spatial_parameter_names(unet, cfg.trainable_spatial)
        for name, param in unet.named_parameters():
            param.requires_grad_(name in self.spatial_names)
        self.motion_adapter = (
            motion_adapter if motion_adapter is not None else build_motion_adapter(unet, cfg)
        )
        self.mapping_network, self.frame_tokens = harivo_modules(
            harivo, unet.config.in_channels, unet.config.cross_attention_dim, cfg.max_text_len, cfg.num_frames
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
        self.temporal_text = self._temporal_text(temporal_text)
        self._state = RunState()
        self._attach_hooks()
        self.enable_gradient_checkpointing(cfg.gradient_checkpointing, cfg.checkpoint_unet)

    @classmethod
    def from_pretrained(
        cls,
        cfg: ModelConfig,
        harivo: HarivoConfig | None = None,
        torch_dtype: torch.dtype | None = None,
        cascade: CascadeConfig | None = None,
    ) -> VideoUNet:
        """Load the base UNet (hub id or local dir) and, if `cfg.motion_adapter` is set, the temporal layers.

        `cfg.from_scratch`: the UNet is built from `pretrained`'s UNet config with a random initialisation (seed
        torch first for the same one on every rank)."""
        if cfg.from_scratch:
            config = UNet2DConditionModel.load_config(
                cfg.pretrained, subfolder=cfg.subfolder, revision=cfg.revision
            )
            unet = UNet2DConditionModel.from_config(config)
            unet = unet.to(torch_dtype) if torch_dtype is not None else unet
        else:
            unet = UNet2DConditionModel.from_pretrained(
                cfg.pretrained, subfolder=cfg.subfolder, revision=cfg.revision, torch_dtype=torch_dtype
            )
        adapter = MotionAdapter.from_pretrained(cfg.motion_adapter) if cfg.motion_adapter else None
        return cls(unet, cfg, harivo, adapter, cascade)

    def temporal_pairs(self) -> list[tuple[nn.Module, AnimateDiffTransformer3D]]:
        """(base layer, the motion module run after it) in forward order: down blocks, mid block, up blocks."""
        unet, adapter = self.unet, self.motion_adapter
        blocks: list[tuple[nn.ModuleList, nn.ModuleList, str]] = []
        for i, block in enumerate(unet.down_blocks):
            blocks.append((_hosts(block), adapter.down_blocks[i].motion_modules, f"down_blocks.{i}"))
        if adapter.mid_block is not None:
            blocks.append((unet.mid_block.attentions, adapter.mid_block.motion_modules, "mid_block"))
        for i, block in enumerate(unet.up_blocks):
            blocks.append((_hosts(block), adapter.up_blocks[i].motion_modules, f"up_blocks.{i}"))
        pairs = []
        for hosts, motion_modules, name in blocks:
            if len(hosts) != len(motion_modules):
                raise ValueError(
                    f"motion adapter does not match the UNet at {name}: "
                    f"{len(motion_modules)} motion modules for {len(hosts)} layers"
                )
            pairs.extend(zip(hosts, motion_modules))
        return pairs

    def _temporal_text(self, loaded: TemporalTextModules | None) -> TemporalTextModules | None:
        """The text layers of model.text_conditioning, one per motion module (`loaded`, or new zero-init ones)."""
        kind = self.cfg.text_conditioning
        channels = [m.in_channels for _, m in self.temporal_pairs()]
        if loaded is None:
            if kind == "none":
                return None
            d = self.unet.config.cross_attention_dim
            return TemporalTextModules(kind, tuple(channels), d, self.cfg.temporal_heads, self.cfg.max_frames)
        got = (loaded.config.kind, list(loaded.config.channels))
        if kind == "none" or got != (kind, channels):
            raise ValueError(
                f"temporal text layers {got} (kind, widths) do not fit model.text_conditioning={kind} "
                f"on motion modules of widths {channels}"
            )
        return loaded

    def _attach_hooks(self) -> None:
        unet, state = self.unet, self._state
        text_layers = self.temporal_text.layers if self.temporal_text is not None else None
        for i, (host, motion_module) in enumerate(self.temporal_pairs()):
            text_layer = text_layers[i] if text_layers is not None else None
            host.register_forward_hook(TemporalHook(motion_module, state, text_layer))
        for name, module in self.decoder_self_attentions():
            if module.group_norm is not None or module.spatial_norm is not None or module.norm_q is not None:
                raise NotImplementedError(f"attention-map capture does not support the norms of {name}")
            module.register_forward_hook(AttentionMapHook(state), with_kwargs=True)
        unet.mid_block.register_forward_hook(HSpaceHook(state))
        if self.cond_conv_in is not None:
            unet.conv_in.register_forward_hook(ConditionHook(self.cond_conv_in, state))
        if self.level_embedding is not None:
            unet.time_embedding.register_forward_hook(LevelHook(state))

    def decoder_self_attentions(self) -> list[tuple[str, nn.Module]]:
        """The N self-attention layers of the decoder (up blocks), in forward order (HARIVO eq. 3)."""
        return [(n, m) for n, m in self.unet.up_blocks.named_modules() if n.endswith("attn1")]

    @contextlib.contextmanager
    def capture(
        self, attention_maps: bool = True, hspace: bool = True, attention_qk: bool = False
    ) -> Iterator[Captured]:
        """Record decoder self-attention maps (or only their queries and keys, `attention_qk`) and/or
        h-space of the forwards run inside the block.

        Observers only: the model's outputs are the same with and without capture.
        """
        store = Captured()
        state = self._state
        state.store, state.capture_maps, state.capture_hspace = store, attention_maps, hspace
        state.capture_qk = attention_qk
        try:
            yield store
        finally:
            state.store, state.capture_maps, state.capture_hspace = None, False, False
            state.capture_qk = False

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        image_mode: bool = False,
        cond: torch.Tensor | None = None,
        cond_level: torch.Tensor | None = None,
        image_text: torch.Tensor | None = None,
        temporal: bool = True,
    ) -> torch.Tensor:
        """model_pred (B, C, F, H, W) for noisy latents (B, C, F, H, W), timesteps (B,) and text (B, M, D).

        A cascade stage also takes its conditioning `cond` (B, C_cond, F, H, W), concatenated to the input
        by the extra conv_in channels, and (SR) `cond_level` (B,), the conditioning's augmentation sigma.
        `image_text` (B, N, M, D): the last N of the frames are images with these captions (joint training).
        The temporal text layers (model.text_conditioning) get `text` itself, without HARIVO's frame tokens.
        `temporal=False`: the clip without anything that looks across its frames (temporal layers, temporal text
        layers, the mapping network) but with its per-frame text, so the frames differ only by what the text asks
        of each (loss.temporal_off_every).
        """
        b, c, total, h, w = noisy_latents.shape  # (B, C, F + N, H, W)
        n = 0 if image_text is None else image_text.shape[1]
        f = total - n  # the clip's frames
        if n and (cond is not None or cond_level is not None):
            raise ValueError("images in the batch (image_text) do not combine with cascade conditioning")
        if n and (image_text.shape[0] != b or f < 1):
            raise ValueError(f"image_text {tuple(image_text.shape)} does not fit {total} frames of {b} clips")
        if not image_mode and f > self.cfg.max_frames:
            raise ValueError(f"{f} frames exceed model.max_frames={self.cfg.max_frames}")
        self._check_condition(noisy_latents, cond, cond_level)
        if self.mapping_network is not None and temporal:  # on the clip only: images are not frames of it
            clip = self.mapping_network(noisy_latents[:, :, :f])  # (B, C, F, H, W)
            noisy_latents = torch.cat([clip, noisy_latents[:, :, f:]], dim=2) if n else clip
        sample = fold_frames(noisy_latents)  # (B (F + N), C, H, W)
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(b)  # (B,)
        timesteps = per_frame(timesteps, total)  # (B (F + N),)
        text, mask = self._frame_text(encoder_hidden_states, f, not image_mode, image_text)
        state = self._state
        state.num_frames, state.video_frames, state.temporal = total, f, temporal and not image_mode
        if self.temporal_text is not None:
            state.text = encoder_hidden_states  # (B, M, D): the clip's caption, without frame tokens
        if cond is not None:
            state.cond = fold_frames(cond)  # (B F, C_cond, H, W)
        if cond_level is not None:
            level = torch.as_tensor(cond_level, device=sample.device).reshape(-1).expand(b)  # (B,)
            state.level_emb = self.level_embedding(per_frame(level, f))  # (B F, D_temb)
        try:
            out = self.unet(
                sample, timesteps, encoder_hidden_states=text, encoder_attention_mask=mask
            ).sample  # (B (F + N), C, H, W)
        finally:
            state.num_frames, state.video_frames, state.temporal = None, None, False
            state.cond = state.level_emb = state.text = None
        return unfold_frames(out, total)  # (B, C, F + N, H, W)

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

    def _frame_text(
        self,
        encoder_hidden_states: torch.Tensor,
        f: int,
        use_tokens: bool,
        image_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-frame cross-attention tokens (B (F + N), M [+K], D), their key mask or None).

        The clip's frames get the text tokens plus, in video mode, K frame-wise tokens; images get their own
        caption's tokens, padded by K masked-out keys (a masked key gets softmax weight exactly 0)."""
        b, m, d = encoder_hidden_states.shape  # (B, M, D)
        if self.frame_tokens is None or not use_tokens:
            text = per_frame(encoder_hidden_states, f)  # (B F, M, D)
        else:
            if f != self.frame_tokens.num_frames:
                raise ValueError(
                    f"the frame-token generator was built for model.num_frames={self.frame_tokens.num_frames}, got {f} frames"
                )
            tokens = self.frame_tokens(encoder_hidden_states)  # (B, F, K, D), or (B, F, M, D) residuals
            text = encoder_hidden_states[:, None].expand(b, f, m, d)  # (B, F, M, D)
            if isinstance(self.frame_tokens, (FrameTextResidual, FrameTextBasis)):
                text = (text + tokens).reshape(b * f, m, d)  # (B F, M, D)
            else:  # (B F, M + K, D)
                text = torch.cat([text, tokens], dim=2).reshape(b * f, m + tokens.shape[2], d)
        if image_text is None:
            return text, None
        n, length = image_text.shape[1], text.shape[1]
        if image_text.shape[2:] != (m, d):
            raise ValueError(f"image_text {tuple(image_text.shape)} must be (B, N, {m}, {d})")
        pad = image_text.new_zeros(b, n, length - m, d)  # (B, N, K, D)
        images = torch.cat([image_text.to(text.dtype), pad.to(text.dtype)], dim=2)  # (B, N, M + K, D)
        text = torch.cat([text.reshape(b, f, length, d), images], dim=1).reshape(b * (f + n), length, d)
        if length == m:
            return text, None
        mask = torch.ones(b, f + n, length, dtype=torch.bool, device=text.device)
        mask[:, f:, m:] = False  # images do not attend to the padding
        return text, mask.reshape(b * (f + n), length)  # (B (F + N), M + K)

    # ---- trainable weights, kept apart from the frozen base --------------------------------------

    def train(self, mode: bool = True) -> VideoUNet:
        super().train(mode)
        self.unet.eval()  # SD's UNet has no dropout or running statistics: eval keeps it deterministic
        return self

    def freeze_video_layers(self) -> None:
        """Only the base UNet trains (an image model): temporal layers and HARIVO / cascade modules are frozen."""
        for name, module in self.named_children():
            if name != "unet":
                module.requires_grad_(False)

    def enable_gradient_checkpointing(self, enabled: bool = True, whole_unet: bool = False) -> None:
        """Recompute the temporal layers (`whole_unet`: every block of the UNet, the temporal layers inside
        them) in the backward pass instead of storing their activations."""
        if whole_unet:  # the hooks' state is replayed when a block is recomputed
            self.unet.enable_gradient_checkpointing(checkpoint_replaying(self._state))
        elif self.unet.is_gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        # Whole UNet: diffusers checkpoints the resnets and transformer blocks, not every layer a motion
        # module follows (a cross-attention block's Transformer2DModel): those motion modules checkpoint
        # themselves; inside a checkpointed layer they do not (`RunState.in_checkpoint`).
        self._state.checkpointing = enabled or whole_unet

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def _is_trainable_key(self, key: str) -> bool:
        return not key.startswith("unet.") or key[len("unet.") :] in self.spatial_names

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight except the frozen base's (keys as in `state_dict()`; `unet.` ones only for
        model.trainable_spatial)."""
        return {k: v for k, v in self.state_dict().items() if self._is_trainable_key(k)}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        base = [k for k in state_dict if not self._is_trainable_key(k)]
        if base:
            raise ValueError(
                f"trainable state dict holds frozen-base keys (not in model.trainable_spatial), e.g. {base[0]!r}"
            )
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if self._is_trainable_key(k)]
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
