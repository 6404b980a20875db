"""Sampling PYoCo's cascade (sec. 4, Fig. 3) as a chain: base -> temporal interpolation -> latent SR x2.

    python -m training.sample --cascade base=RUN_B,interp=RUN_I,sr=RUN_S --prompt "a dog runs" \\
        --output OUT --config training/configs/sample_pyoco.yaml

Each stage is a `VideoPipeline` of its own checkpoint (kind pyoco_base / pyoco_interp / pyoco_sr,
refused otherwise) with the shared `SampleConfig`. The base samples K keyframes; interpolation gets
them at every `keyframe_stride`-th frame (+ mask) and fills the (K - 1) stride + 1 frames; SR gets the
result upsampled x`scale` and noise-augmented at `cascade.sr_aug_sigma`. The final latents are decoded
with the last stage's VAE. `output.num_frames/height/width` size the base; later stages follow from it.

Per video: `<name>.mp4` (+ `.gif`), `<name>.latents.safetensors` (every stage's latents, keyed by stage)
and `<name>.json` (checkpoints, config, seeds, shapes), plus `samples.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.configlib import from_dict, to_dict
from training.diffusion.cascade import (
    STAGES,
    interp_num_frames,
    interp_stage_condition,
    sr_stage_condition,
    stage_kind,
)
from training.model.export import read_train_config, resolve_checkpoint
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline
from training.sampling.pipeline import VideoPipeline
from training.sampling.write import write_videos

log = logging.getLogger(__name__)


def parse_cascade(spec: str) -> dict[str, str]:
    """'base=A,interp=B,sr=C' -> {"base": "A", "interp": "B", "sr": "C"} in chain order (base required)."""
    stages: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, path = part.partition("=")
        name = name.strip()
        if not sep or not path.strip():
            raise ValueError(f"--cascade item {part!r} is not STAGE=CHECKPOINT")
        if name not in STAGES:
            raise ValueError(f"--cascade stage {name!r} is not one of {STAGES}")
        if name in stages:
            raise ValueError(f"--cascade names stage {name!r} twice")
        stages[name] = path.strip()
    if "base" not in stages:
        raise ValueError(f"--cascade {spec!r} has no base=CHECKPOINT")
    return {s: stages[s] for s in STAGES if s in stages}


@dataclass
class CascadeResult:
    latents: dict[str, torch.Tensor]
    """Each stage's final latents (1, C, F, h, w), float32, in chain order."""
    seeds: dict[str, int] = field(default_factory=dict)
    """The seed each stage sampled with."""


class CascadePipeline:
    """The loaded stages; `sample(prompt, seed)` runs the chain, `decode` the final latents -> frames."""

    def __init__(self, stages: dict[str, VideoPipeline], cfg: SampleConfig):
        if next(iter(stages), None) != "base":
            raise ValueError(f"a cascade starts with its base stage, got {list(stages)}")
        self.stages, self.cfg = stages, cfg

    @property
    def final(self) -> VideoPipeline:
        return list(self.stages.values())[-1]

    @torch.no_grad()
    def sample(self, prompt: str, seed: int) -> CascadeResult:
        c = self.cfg.cascade
        result = CascadeResult({})
        x = None
        for k, (stage, pipe) in enumerate(self.stages.items()):
            stage_seed = seed + k * c.seed_stride
            condition = None
            if stage == "interp":
                # Keyframes at every stride-th frame + mask; kept exactly if keyframe_replacement. A stage
                # trained on noise-augmented keyframes sees them at cascade.interp_aug_sigma.
                tc = pipe.train_cfg.cascade
                augmented = tc.interp_aug_sigma_max > 0
                generator = torch.Generator().manual_seed(seed + (len(STAGES) + 1) * c.seed_stride)
                sigma = c.interp_aug_sigma if augmented else None
                condition = interp_stage_condition(x, tc.keyframe_stride, sigma, generator)
                if not c.keyframe_replacement:
                    condition.known = condition.known_mask = None
            elif stage == "sr":
                # Upsampled lower-resolution latents, noise-augmented with their own seeded stream.
                tc = pipe.train_cfg.cascade
                generator = torch.Generator().manual_seed(seed + len(STAGES) * c.seed_stride)
                condition = sr_stage_condition(x, c.sr_aug_sigma, tc.scale, tc.upsample, generator)
            x = pipe.sample(prompt, stage_seed, condition).latents  # (1, C, F, h, w)
            result.latents[stage], result.seeds[stage] = x, stage_seed
        return result

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (1, C, F, h, w) -> frames (F, 3, H, W) in [0, 1] with the last stage's VAE."""
        return self.final.decode(latents)


def _stage_config(cfg: SampleConfig, num_frames: int | None, height: int | None, width: int | None):
    """A copy of `cfg` sizing one stage (pixels; None: the stage checkpoint's own size)."""
    out = from_dict(SampleConfig, to_dict(cfg))
    out.output.num_frames, out.output.height, out.output.width = num_frames, height, width
    return out


def load_cascade(checkpoints: dict[str, str], cfg: SampleConfig) -> CascadePipeline:
    """Load every stage of `parse_cascade`'s dict; a checkpoint of the wrong kind is refused by name."""
    stages: dict[str, VideoPipeline] = {}
    prev: VideoPipeline | None = None
    for stage, path in checkpoints.items():
        kind, role = stage_kind(stage), f"--cascade {stage}="
        train_cfg, _ = read_train_config(resolve_checkpoint(path), (kind,), role)  # fail before loading
        if prev is None:
            stage_cfg = cfg
        elif stage == "interp":
            frames = interp_num_frames(prev.num_frames, train_cfg.cascade.keyframe_stride)
            stage_cfg = _stage_config(cfg, frames, prev.height, prev.width)
        else:  # sr
            s = train_cfg.cascade.scale
            stage_cfg = _stage_config(cfg, prev.num_frames, prev.height * s, prev.width * s)
        pipe = load_pipeline(path, stage_cfg, (kind,), role)
        if prev is not None:
            _check_compatible(prev, pipe, stage)
        stages[stage], prev = pipe, pipe
    return CascadePipeline(stages, cfg)


def _check_compatible(prev: VideoPipeline, pipe: VideoPipeline, stage: str) -> None:
    """Consecutive stages share one latent space and the frame count fits the temporal layers."""
    a, b = prev.train_cfg.model, pipe.train_cfg.model
    if prev.video.unet.config.in_channels != pipe.video.unet.config.in_channels:
        raise ValueError(f"--cascade {stage}: its latents have other channels than the previous stage's")
    if a.pretrained != b.pretrained:
        log.warning(
            "cascade stage %s uses base %s, the previous stage %s: the VAE must match",
            stage,
            b.pretrained,
            a.pretrained,
        )
    if pipe.num_frames > b.max_frames:
        raise ValueError(
            f"--cascade {stage}: {pipe.num_frames} frames exceed its model.max_frames={b.max_frames}"
        )


def generate_cascade(
    pipe: CascadePipeline, prompts: list[str], output: str | Path, keep: bool = False
) -> list[dict]:
    """Run the chain for every prompt x videos_per_prompt, decode the final latents, write mp4/latents/JSON."""

    def sample_one(prompt: str, seed: int):
        result = pipe.sample(prompt, seed)
        frames = pipe.decode(result.latents[list(result.latents)[-1]])  # (F, 3, H, W)
        fields = {
            "checkpoints": {s: p.checkpoint for s, p in pipe.stages.items()},
            "stages": {
                s: {"seed": result.seeds[s], "latents_shape": list(result.latents[s].shape)}
                for s in result.latents
            },
            "frames_shape": list(frames.shape),
        }
        return frames, result.latents, fields

    return write_videos(
        lambda jobs: [sample_one(p, seed) for p, seed in jobs], pipe.cfg, prompts, output, keep
    )
