"""Generate and score a prompt set (SPEC section 8): CLIPSIM, frame consistency, latent flicker, FVD.

    python -m training.evaluate --checkpoint runs/demo/train --prompts training/prompts/harivo_a3.txt \\
        --output runs/demo/eval eval.clip_model=local-dir:runs/tiny-zoo/clip \\
        eval.i3d_path=i3d_torchscript.pt eval.reference=runs/demo/latents

Videos are generated with `training.sample` (same `SampleConfig`, so every sampler setting is an
override here too) under OUTPUT/videos/, and OUTPUT/report.json records the scores together with the
protocol they were measured under: #videos, frames, resolution, fps (FVD is only comparable within one).
`evaluate(...)` is the same as a function, for Ray Tune objectives (sampling-only sweeps).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from pipeline.configlib import add_config_args, config_args, load_config, to_dict
from training.evaluation.metrics import (
    clipsim,
    file_sha256,
    frame_consistency,
    fvd,
    latent_flicker,
    load_i3d,
)
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline
from training.sampling.pipeline import VideoPipeline
from training.sampling.video_io import VIDEO_SUFFIXES, read_video, resize_crop_frames
from training.sampling.write import generate, read_prompts

log = logging.getLogger(__name__)


def _fit(frames: torch.Tensor, num_frames: int, height: int, width: int, source: str) -> torch.Tensor:
    """First `num_frames` frames of (F', 3, H', W'), resized and centre-cropped to (height, width) as curation
    does (`pipeline.decode.resize_crop`)."""
    if len(frames) < num_frames:
        raise ValueError(f"reference {source} has {len(frames)} frames, the generated videos {num_frames}")
    return resize_crop_frames(frames[:num_frames], height, width)


def load_reference(path: str, pipe: VideoPipeline, limit: int) -> torch.Tensor:
    """Real videos (N, F, 3, H, W) in [0, 1] shaped like the generated ones.

    `path`: a pipeline output dir (or its clips/ dir), whose VAE latents are decoded with the base's
    VAE, or a directory of video files.
    """
    p = Path(path)
    clips = p / "clips" if (p / "clips").is_dir() else p
    f, h, w = pipe.num_frames, pipe.height, pipe.width
    parquet = sorted(clips.glob("*.parquet"))
    videos: list[torch.Tensor] = []
    if parquet:
        import pyarrow.parquet as pq

        from pipeline.schema import LATENTS, latents_array

        for file in parquet:
            for lat in latents_array(pq.read_table(file, columns=[LATENTS])):  # (F', C, h', w') each
                z = torch.from_numpy(lat.copy()).float().permute(1, 0, 2, 3)[None]  # (1, C, F', h', w')
                videos.append(_fit(pipe.decode(z[:, :, :f]), f, h, w, str(file)))
                if len(videos) >= limit:
                    break
            if len(videos) >= limit:
                break
    else:
        files = sorted(q for q in p.iterdir() if q.suffix.lower() in VIDEO_SUFFIXES) if p.is_dir() else []
        for file in files[:limit]:
            videos.append(_fit(read_video(file), f, h, w, str(file)))
    if len(videos) < 2:
        raise ValueError(
            f"eval.reference={path}: need >= 2 real videos (Parquet clips or video files), found {len(videos)}"
        )
    return torch.stack(videos)


def evaluate(checkpoint: str, prompts: list[str], output: str | Path, cfg: SampleConfig) -> dict:
    """Generate `prompts` x videos_per_prompt under `output`/videos and score them; returns the report."""
    out = Path(output)
    t0 = time.perf_counter()
    e = cfg.eval
    if e.max_prompts is not None:
        prompts = prompts[: e.max_prompts]
    pipe = load_pipeline(checkpoint, cfg)
    records = generate(pipe, prompts, out / "videos", keep=True)
    videos = torch.stack([r["frames"] for r in records])  # (N, F, 3, H, W) in [0, 1]
    latents = torch.cat([r["latents"] for r in records])  # (N, C, F, h, w)
    n, f, _, h, w = videos.shape
    metrics: dict = {"latent_flicker": latent_flicker(latents)}
    if e.clip_model:
        from pipeline.models import load_clip

        clip, preprocess, tokenizer = load_clip(e.clip_model, e.clip_pretrained)
        metrics["clipsim"] = clipsim(clip, preprocess, tokenizer, videos, [r["prompt"] for r in records])
        metrics["frame_consistency"] = frame_consistency(clip, preprocess, videos)
    fvd_result = None
    if e.i3d_path and e.reference:
        detector = load_i3d(e.i3d_path)
        real = load_reference(e.reference, pipe, e.max_reference)
        fvd_result = fvd(
            detector,
            real,
            videos,
            fps=cfg.output.fps,
            detector_name=Path(e.i3d_path).name,
            detector_sha256=file_sha256(e.i3d_path),
            min_videos=e.min_videos,
            allow_few=e.allow_few_videos,
        )
        metrics["fvd"] = fvd_result.fvd
    elif e.i3d_path or e.reference:
        raise ValueError("FVD needs both eval.i3d_path and eval.reference")
    report = {
        "checkpoint": pipe.checkpoint,
        "num_prompts": len(prompts),
        "num_videos": n,
        "frames": f,
        "height": h,
        "width": w,
        "fps": cfg.output.fps,
        "metrics": metrics,
        "fvd": fvd_result.to_dict() if fvd_result else None,
        "clip_model": e.clip_model,
        "videos": [{"name": r["name"], "prompt": r["prompt"], "seed": r["seed"]} for r in records],
        "config": to_dict(cfg),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="export dir, RUN_DIR or trainable.safetensors")
    p.add_argument("--prompts", default="training/prompts/harivo_a3.txt", help="one prompt per line")
    p.add_argument("--output", required=True, help="directory for videos/ and report.json")
    add_config_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(SampleConfig, *config_args(a))
    report = evaluate(a.checkpoint, read_prompts(a.prompts), a.output, cfg)
    print(json.dumps({k: report[k] for k in ("num_videos", "frames", "height", "width", "fps", "metrics")}))
    return report


if __name__ == "__main__":
    main()
