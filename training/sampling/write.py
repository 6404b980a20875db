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

from pipeline.configlib import read_lines, to_dict, to_json
from training.sampling.config import SampleConfig
from training.sampling.pipeline import VideoPipeline
from training.sampling.video_io import write_gif, write_mp4

log = logging.getLogger(__name__)

# ---- writing ------------------------------------------------------------------------------------------------


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-blank line; lines starting with '#' are comments. `TextFileError` (a `ConfigError`)
    names the file and line of bytes that are not UTF-8, or says the file holds no prompt."""
    return read_lines(path, "prompts")


Job = tuple[str, int]
"""(prompt, seed) of one video."""
Sampled = tuple[torch.Tensor, "torch.Tensor | dict[str, torch.Tensor]", dict]
"""(frames (F, 3, H, W), latents (one tensor, or one per cascade stage), record fields) of one video."""


def write_videos(
    sample_many: Callable[[list[Job]], list[Sampled]],
    cfg: SampleConfig,
    prompts: list[str],
    output: str | Path,
    keep: bool = False,
) -> list[dict]:
    """Every prompt x videos_per_prompt through `sample_many(jobs)`, `sampler.batch_size` jobs at a time;
    writes mp4 / gif / latents and a JSON record per video (its `seconds`: its batch's share), then
    `samples.json`. Returns the records (with the tensors if `keep`)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    o = cfg.output
    jobs = [
        (i, k, prompt, o.seed + i * o.videos_per_prompt + k)
        for i, prompt in enumerate(prompts)
        for k in range(o.videos_per_prompt)
    ]
    records = []
    for b in range(0, len(jobs), cfg.sampler.batch_size):
        batch = jobs[b : b + cfg.sampler.batch_size]
        t0 = time.perf_counter()
        sampled = sample_many([(prompt, seed) for _, _, prompt, seed in batch])
        seconds = (time.perf_counter() - t0) / len(batch)
        for (i, k, prompt, seed), (frames, latents, fields) in zip(batch, sampled):
            name = f"{i:03d}-{k}_{_slug(prompt)}"
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
            record.update(fields, seconds=round(seconds, 3))
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

    def sample_many(jobs: list[Job]) -> list[Sampled]:
        results = pipe.sample_batch([p for p, _ in jobs], [s for _, s in jobs])
        return [record(result) for result in results]

    def record(result) -> Sampled:
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

    return write_videos(sample_many, pipe.cfg, prompts, output, keep)
