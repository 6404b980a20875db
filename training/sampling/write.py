"""Writing sampled videos: every prompt x videos_per_prompt -> mp4 / gif / latents / a JSON record each,
plus `samples.json`. `generate(pipe, prompts, output)` for one pipeline; `write_videos` is the loop the
cascade shares.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.configlib import to_dict, to_json
from training.sampling.config import SampleConfig
from training.sampling.pipeline import VideoPipeline
from training.sampling.video_io import write_gif, write_mp4

log = logging.getLogger(__name__)

# ---- writing ------------------------------------------------------------------------------------------------


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def write_videos(
    sample_one: Callable[[str, int], tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor], dict]],
    cfg: SampleConfig,
    prompts: list[str],
    output: str | Path,
    keep: bool = False,
) -> list[dict]:
    """Every prompt x videos_per_prompt through `sample_one(prompt, seed)` -> (frames (F, 3, H, W), latents
    (one tensor, or one per cascade stage), record fields); writes mp4 / gif / latents and a JSON record per
    video, then `samples.json`. Returns the records (with the tensors if `keep`)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    o = cfg.output
    records = []
    for i, prompt in enumerate(prompts):
        for k in range(o.videos_per_prompt):
            seed = o.seed + i * o.videos_per_prompt + k
            name = f"{i:03d}-{k}_{_slug(prompt)}"
            t0 = time.perf_counter()
            frames, latents, fields = sample_one(prompt, seed)
            files = {}
            if o.mp4:
                files["mp4"] = write_mp4(frames, out / f"{name}.mp4", o.fps).name
            if o.gif:
                files["gif"] = write_gif(frames, out / f"{name}.gif", o.fps).name
            if o.save_latents:
                tensors = latents if isinstance(latents, dict) else {"latents": latents}
                save_file(
                    {s: v.contiguous() for s, v in tensors.items()}, str(out / f"{name}.latents.safetensors")
                )
                files["latents"] = f"{name}.latents.safetensors"
            record = {"prompt": prompt, "seed": seed, "name": name, "files": files, "config": to_dict(cfg)}
            record.update(fields, seconds=round(time.perf_counter() - t0, 3))
            (out / f"{name}.json").write_text(to_json(record, indent=2))
            if keep:
                record = {**record, "latents": latents, "frames": frames}
            records.append(record)
            log.info("wrote %s (%s, seed %d)", name, prompt, seed)
    index = [{k: v for k, v in r.items() if k not in ("latents", "frames", "config")} for r in records]
    (out / "samples.json").write_text(to_json({"config": to_dict(cfg), "videos": index}, indent=2))
    return records


def generate(pipe: VideoPipeline, prompts: list[str], output: str | Path, keep: bool = False) -> list[dict]:
    """Sample, decode and write every prompt x videos_per_prompt; returns the records (with tensors if `keep`)."""
    import diffusers

    def sample_one(prompt: str, seed: int):
        result = pipe.sample(prompt, seed)
        resolved = {
            "num_frames": pipe.num_frames,
            "height": pipe.height,
            "width": pipe.width,
            "fps": pipe.cfg.output.fps,
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "noise_prior": pipe.noise_prior,
            "noise_alpha": pipe.noise_alpha,
            "levels": result.levels,
            "video_steps": result.video_steps,
            "train_diffusion": to_dict(pipe.train_cfg.diffusion),
        }
        versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
        fields = {"checkpoint": pipe.checkpoint, "resolved": resolved, "versions": versions}
        return pipe.decode(result.latents), result.latents, fields

    return write_videos(sample_one, pipe.cfg, prompts, output, keep)
