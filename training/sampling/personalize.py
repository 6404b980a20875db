"""Personalised bases at sampling time (HARIVO 4.3): a swapped UNet, merged LoRA weights, a ControlNet.

The temporal layers were trained on top of one frozen text-to-image UNet; HARIVO shows they transfer
to DreamBooth/LoRA fine-tunes of the same base and to ControlNet conditioning. Here:

- `load_unet`: a DreamBooth-style fine-tuned `UNet2DConditionModel` (its own dir, or an SD dir with unet/);
- `merge_lora`: LoRA weights in diffusers format (PEFT `lora_A/lora_B`, older `lora.down/up` and
  attention-processor keys, and kohya files via diffusers' converter) merged into the weights:
  `W <- W + scale * (alpha / r) * B @ A`. Merging needs no `peft` and costs nothing per step;
- `ControlNetHook`: a forward pre-hook on the base UNet that feeds a diffusers `ControlNetModel`'s
  residuals into it, for all frames or only listed ones (zero residuals elsewhere). It sees exactly
  the input the UNet sees (after HARIVO's mapping network, frames folded into the batch), so it works
  for the video model and for the per-frame image model alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

log = logging.getLogger(__name__)


def load_unet(path: str, torch_dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """A fine-tuned UNet from its own directory (config.json) or from an SD directory with unet/."""
    p = Path(path)
    subfolder = "unet" if (p / "unet" / "config.json").is_file() else None
    if p.exists() and subfolder is None and not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"base.unet={path}: neither a UNet directory (config.json) nor an SD dir with unet/"
        )
    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)


def _lora_pairs(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B)} of one component (`prefix` 'unet' or 'text_encoder'), keys in PEFT naming."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not part:
        return {}
    if not any(".lora_A." in k for k in part):
        part = convert_unet_state_dict_to_peft(part) if prefix == "unet" else convert_state_dict_to_peft(part)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in part.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = part.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise KeyError(f"LoRA key {prefix}.{key} has no matching lora_B weight")
        pairs[module] = (a, b)
    unknown = [k for k in part if ".lora_A." not in k and ".lora_B." not in k]
    if unknown:
        raise KeyError(
            f"LoRA {prefix} keys not understood (DoRA/bias LoRAs are not supported): {unknown[:3]}"
        )
    return pairs


def _alpha(module: str, prefix: str, rank: int, alphas: dict | None, metadata: dict | None) -> float:
    """LoRA alpha of one module: kohya network alphas, then PEFT metadata, else rank (scale 1)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    for key, value in (alphas or {}).items():
        if not key.startswith(prefix + "."):
            continue
        name = key[len(prefix) + 1 :].removesuffix(".alpha")
        name = next(iter(convert_unet_state_dict_to_peft({name: 0}))) if prefix == "unet" else name
        if name.split(".lora_A")[0].removesuffix(".down.weight") == module:
            return float(value)
    if metadata:
        pattern = metadata.get(f"{prefix}.alpha_pattern") or {}
        for pat, value in pattern.items():
            if module == pat or module.endswith("." + pat):
                return float(value)
        if metadata.get(f"{prefix}.lora_alpha") is not None:
            return float(metadata[f"{prefix}.lora_alpha"])
    return float(rank)


@torch.no_grad()
def merge_lora(components: dict[str, nn.Module], path: str, scale: float = 1.0) -> dict[str, int]:
    """Merge diffusers-format LoRA weights at `path` into `components` ({'unet': ..., 'text_encoder': ...}).

    Returns the number of merged layers per component. Raises when the file names a layer the
    component lacks or holds another component's weights, so a LoRA for another base fails loudly.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    prefixes = {k.split(".", 1)[0] for k in state}
    foreign = prefixes - set(components)
    if foreign:
        raise KeyError(f"LoRA {path} holds weights for {sorted(foreign)}, not one of {sorted(components)}")
    merged: dict[str, int] = {}
    for prefix, model in components.items():
        modules = dict(model.named_modules())
        count = 0
        for name, (a, b) in _lora_pairs(state, prefix).items():
            layer = modules.get(name)
            if layer is None or not hasattr(layer, "weight"):
                raise KeyError(
                    f"LoRA {path}: {prefix} has no layer {name!r} (a LoRA for another base model?)"
                )
            rank = a.shape[0]
            factor = scale * _alpha(name, prefix, rank, alphas, metadata) / rank
            w = layer.weight
            delta = b.flatten(1).float() @ a.flatten(1).float()  # (out, in * kh * kw): conv LoRA too
            w.add_((factor * delta).reshape(w.shape).to(w.dtype))
            count += 1
        merged[prefix] = count
    if not any(merged.values()):
        raise ValueError(f"LoRA {path} holds no unet/text_encoder LoRA weights")
    log.info("merged LoRA %s (scale %s): %s", path, scale, merged)
    return merged


class ControlNetHook:
    """Adds a ControlNet's residuals to a UNet's forward, for listed frames of every video in the batch.

    `cond` holds the conditioning images of the controlled frames, `(len(frames), 3, H, W)` in [0, 1]
    (diffusers' ControlNet convention). Attach with `attach(unet)`; `num_frames` is F of the video.
    """

    def __init__(
        self,
        controlnet: ControlNetModel,
        cond: torch.Tensor,
        num_frames: int,
        frames: Sequence[int] | None = None,
        scale: float = 1.0,
    ):
        self.controlnet, self.num_frames, self.scale = controlnet, num_frames, scale
        self.frames = list(range(num_frames)) if frames is None else [int(f) for f in frames]
        bad = [f for f in self.frames if not -num_frames <= f < num_frames]
        if bad:
            raise ValueError(f"controlnet.frames {bad} out of range for {num_frames} frames")
        self.frames = sorted({f % num_frames for f in self.frames})
        if cond.shape[0] != len(self.frames):
            raise ValueError(f"{cond.shape[0]} conditioning images for {len(self.frames)} controlled frames")
        self.cond = cond
        self.handles: list = []

    def attach(self, unet: nn.Module) -> ControlNetHook:
        self.handles.append(unet.register_forward_pre_hook(self, with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __call__(self, unet: nn.Module, args: tuple, kwargs: dict):
        sample = args[0] if args else kwargs["sample"]  # (B F, C, h, w)
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)  # (B F, M, D)
        bf, f = sample.shape[0], self.num_frames
        if bf % f:
            raise ValueError(f"ControlNet hook: batch {bf} is not a multiple of {f} frames")
        idx = torch.tensor([v * f + j for v in range(bf // f) for j in self.frames], device=sample.device)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(bf)
        cond = self.cond.to(sample.device, self.controlnet.dtype).repeat(bf // f, 1, 1, 1)
        down, mid = self.controlnet(
            sample[idx],
            timestep[idx],
            encoder_hidden_states=text[idx],
            controlnet_cond=cond,
            conditioning_scale=self.scale,
            return_dict=False,
        )

        # Uncontrolled frames get zero residuals: the UNet sees exactly its plain input there.
        def scatter(r: torch.Tensor) -> torch.Tensor:
            return r.new_zeros((bf, *r.shape[1:])).index_copy(0, idx, r)

        kwargs = {
            **kwargs,
            "down_block_additional_residuals": tuple(scatter(r) for r in down),
            "mid_block_additional_residual": scatter(mid),
        }
        return args, kwargs
