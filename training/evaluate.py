"""Generate and score a prompt set (SPEC section 8): CLIPSIM, frame consistency, latent flicker, FVD.

    python -m training.evaluate --checkpoint runs/demo/train --prompts training/prompts/harivo_a3.txt \\
        --output runs/demo/eval eval.clip_model=local-dir:runs/tiny-zoo/clip \\
        eval.i3d_path=i3d_torchscript.pt eval.reference=data/demo

Videos are generated with `training.sample` (same `SampleConfig`, so every sampler setting is an
override here too) under OUTPUT/videos/, and OUTPUT/report.json records the scores together with the
protocol they were measured under: #videos, frames, resolution, fps, the real set's source, window stride or
fps and seed, the I3D and CLIP files' checksums (FVD is only comparable within one protocol).
`evaluate(...)` is the same as a function, for Ray Tune objectives (sampling-only sweeps).

A domain evaluator (`eval.domain_evaluator=runs/shapes/evaluator`, the shapes world's I3D; its checksum is
checked against its card and `eval.domain_sha256`) adds `metrics.motion_accuracy`, `metrics.attribute_accuracy`
(the mean of `shape_accuracy`, `colour_accuracy`, `background_accuracy`): the fraction of videos whose
evaluator label is the one their prompt states; and, with `eval.reference`, `metrics.domain_fvd` (its video
features) and `metrics.domain_fid` (its frame features) against real windows of the generated length, size and
fps, needing `eval.domain_min_videos` videos (or `eval.allow_few_videos`). `report.domain` holds the protocol,
checksum and per-label confusion counts (training/evaluation/domain.py).

`--baseline frames` scores the frozen image model sampled frame by frame instead of the video model: the same
prompts, seeds, sampler, CFG and MG, every frame an image sample (JVID with P_V = 0 at every step, i.i.d. noise,
no smoothing: `training.sampling.config.frame_baseline`); `report.baseline` says which was scored and
`report.sampling` the sampler, CFG and MG (with MG's alpha as it acted at the latent size).

    python -m training.evaluate --checkpoint RUN --prompts PROMPTS --output runs/eval/frames --baseline frames \\
        eval.domain_evaluator=runs/shapes/evaluator eval.reference=SHARDS
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from pipeline.configlib import TextFileError, add_config_args, config_args, load_config, to_dict, to_json
from training.evaluation.metrics import (
    clipsim,
    file_sha256,
    frame_consistency,
    fvd,
    latent_flicker,
    load_i3d,
)
from training.evaluation.reference import real_clips
from training.sampling.config import SampleConfig, frame_baseline
from training.sampling.loading import load_pipeline
from training.sampling.write import generate, read_prompts

log = logging.getLogger(__name__)


def _fvd(e, videos: torch.Tensor, fps: float) -> dict:
    """FVD of the first `eval.fvd_frames` frames of the generated videos against random windows of as many
    real ones (decoded from the dataset, same size, `eval.real_fps` or `eval.real_stride`), both in uint8."""
    n, f, _, h, w = videos.shape
    if f < e.fvd_frames:
        raise ValueError(
            f"FVD{e.fvd_frames} needs {e.fvd_frames} frames, the generated videos have {f}: set eval.fvd_frames"
        )
    stride = e.real_stride
    real_fps = None if stride is not None else (e.real_fps or fps)
    real, protocol = real_clips(
        e.reference, e.max_reference, e.fvd_frames, h, w, fps=real_fps, stride=stride, seed=e.real_seed
    )
    fake = (videos[:, : e.fvd_frames].clamp(0, 1) * 255).round().to(torch.uint8)  # as real: uint8 frames
    result = fvd(
        load_i3d(e.i3d_path),
        real.float() / 255,
        fake.float() / 255,
        fps=fps,
        detector_name=Path(e.i3d_path).name,
        detector_sha256=file_sha256(e.i3d_path),
        min_videos=e.min_videos,
        allow_few=e.allow_few_videos,
    )
    return {
        **result.to_dict(),
        "generated_frames": f"first {e.fvd_frames} of {f}",
        "real": protocol.to_dict(),
    }


def _domain_metrics(domain: dict) -> dict:
    """The domain report's scalars, flat (Ray Tune reports `metrics` as they are)."""
    labels = domain["labels"]
    out = {
        "motion_accuracy": labels["motion"]["accuracy"],
        "attribute_accuracy": domain["attribute_accuracy"],
    }
    out.update({f"{k}_accuracy": labels[k]["accuracy"] for k in ("shape", "colour", "background")})
    if domain["fvd"] is not None:
        out.update(domain_fvd=domain["fvd"]["fvd"], domain_fid=domain["fid"]["fid"])
    return out


def sampling_record(cfg: SampleConfig, latent_shape) -> dict:
    """The sampler, CFG and MG the videos were drawn with (the same for a model and its frame baseline), with MG's
    alpha as it acted at this latent size (`mg_effective_scale`)."""
    from training.diffusion.guidance import mg_effective_scale

    g, s = cfg.guidance, cfg.sampler
    _, c, _, h, w = latent_shape
    return {
        "sampler": s.kind,
        "steps": s.steps,
        "cfg": {"early": g.cfg_early, "late": g.cfg_late, "switch": g.cfg_switch},
        "mg_alpha": g.mg_alpha,
        "mg_reference_elements": g.mg_reference_elements,
        "mg_alpha_effective": mg_effective_scale(g.mg_alpha, c * h * w, g.mg_reference_elements),
    }


def evaluate(
    checkpoint: str, prompts: list[str], output: str | Path, cfg: SampleConfig, baseline: str | None = None
) -> dict:
    """Generate `prompts` x videos_per_prompt under `output`/videos and score them; returns the report.
    `baseline='frames'`: the frozen image model sampled frame by frame instead (`frame_baseline`)."""
    out = Path(output)
    t0 = time.perf_counter()
    if baseline not in (None, "frames"):
        raise ValueError(f"baseline={baseline!r}: None (the video model) or 'frames'")
    cfg = frame_baseline(cfg) if baseline == "frames" else cfg
    e = cfg.eval
    if e.max_prompts is not None:
        prompts = prompts[: e.max_prompts]
    evaluator = None
    if e.domain_evaluator:  # checked first: a refused checksum or too few videos cost no generation
        from training.evaluation.domain import check_size, load_evaluator

        evaluator = load_evaluator(e.domain_evaluator, e.domain_sha256)
        if e.reference and not e.allow_few_videos:
            n = len(prompts) * cfg.output.videos_per_prompt
            check_size(e.max_reference, n, e.domain_min_videos, e.allow_few_videos, "domain FVD")
    pipe = load_pipeline(checkpoint, cfg)
    records = generate(pipe, prompts, out / "videos", keep=True)
    videos = torch.stack([r["frames"] for r in records])  # (N, F, 3, H, W) in [0, 1]
    latents = torch.cat([r["latents"] for r in records])  # (N, C, F, h, w)
    n, f, _, h, w = videos.shape
    metrics: dict = {"latent_flicker": latent_flicker(latents)}
    clip_record = None
    if e.clipsim_enabled:
        from pipeline.models import load_clip

        clip, preprocess, tokenizer = load_clip(e.clip_model, e.clip_pretrained)
        metrics["clipsim"] = clipsim(clip, preprocess, tokenizer, videos, [r["prompt"] for r in records])
        metrics["frame_consistency"] = frame_consistency(clip, preprocess, videos)
        weights = e.clip_pretrained and Path(e.clip_pretrained).is_file()
        clip_record = {
            "model": e.clip_model,
            "pretrained": e.clip_pretrained,
            "sha256": file_sha256(e.clip_pretrained) if weights else None,
            "pinned_vit_b_32": e.clip_model == "ViT-B-32",
        }
    elif e.clip_model:
        log.info("CLIPSIM skipped: eval.clip_model=%s needs eval.clip_pretrained (its weights)", e.clip_model)
    fvd_result = None
    if e.i3d_path and e.reference:
        fvd_result = _fvd(e, videos, cfg.output.fps)
        metrics["fvd"] = fvd_result["fvd"]
    elif e.i3d_path or (e.reference and evaluator is None):
        raise ValueError("FVD needs both eval.i3d_path and eval.reference")
    domain = None
    if evaluator is not None:
        from training.evaluation.domain import domain_report

        domain = domain_report(
            evaluator,
            videos,
            [r["prompt"] for r in records],
            e.reference,
            cfg.output.fps,
            e.max_reference,
            e.real_fps,
            e.real_stride,
            e.real_seed,
            e.domain_min_videos,
            e.allow_few_videos,
        )
        metrics.update(_domain_metrics(domain))
    report = {
        "checkpoint": pipe.checkpoint,
        "num_prompts": len(prompts),
        "num_videos": n,
        "frames": f,
        "height": h,
        "width": w,
        "fps": cfg.output.fps,
        "metrics": metrics,
        "baseline": baseline,
        "sampling": sampling_record(cfg, latents.shape),
        "fvd": fvd_result,
        "domain": domain,
        "clip": clip_record,
        "videos": [{"name": r["name"], "prompt": r["prompt"], "seed": r["seed"]} for r in records],
        "config": to_dict(cfg),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(to_json(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="export dir, RUN_DIR or trainable.safetensors")
    p.add_argument("--prompts", default="training/prompts/harivo_a3.txt", help="one prompt per line")
    p.add_argument("--output", required=True, help="directory for videos/ and report.json")
    p.add_argument(
        "--baseline",
        choices=["frames"],
        help="score the frozen image model sampled frame by frame (same prompts and seeds) instead",
    )
    add_config_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # a user's text files: not UTF-8, or no prompt in the list (other config errors raise)
        cfg = load_config(SampleConfig, *config_args(a))
        prompts = read_prompts(a.prompts)
    except TextFileError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    report = evaluate(a.checkpoint, prompts, a.output, cfg, baseline=a.baseline)
    print(json.dumps({k: report[k] for k in ("num_videos", "frames", "height", "width", "fps", "metrics")}))
    return report


if __name__ == "__main__":
    main()
