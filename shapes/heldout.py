"""The world's held-out evaluation, shared by `make shapes` and its pilots: prompts of combinations no model of the
world trained on, the sampler's overrides, and issue 34's targets."""

from __future__ import annotations

from pathlib import Path


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct captions of the held-out video combinations (never trained on by any model of the world)."""
    import numpy as np

    from shapes.world import held_out, sample_scene

    rng, out = np.random.default_rng([seed, 99]), {}
    while len(out) < n:
        scene = sample_scene(rng)
        if held_out(scene):
            out.setdefault(scene.caption, None)
    return list(out)


def sample_overrides(
    world: Path, real: Path, videos: int, videos_per_prompt: int, sample_steps: int
) -> list[str]:
    """KEY=VALUE overrides of training/configs/sample_shapes.yaml: the world's evaluator and CLIP, the real set
    `real` (`shapes.build.real_set`), for an evaluation of `videos` videos."""
    few = videos < 512  # the domain FVD's minimum
    return [
        f"eval.domain_evaluator={world / 'evaluator'}",
        f"eval.reference={real}",
        f"eval.clip_model=local-dir:{world / 'clip' / 'clip'}",
        f"output.videos_per_prompt={videos_per_prompt}",
        f"sampler.steps={sample_steps}",
    ] + (["eval.allow_few_videos=true"] if few else [])


JUDGES = {"evaluator": "", "pixel judge": "pixel_"}
"""The two judges of a video's motion, colour and shape, by their metrics' prefix: the world's evaluator (a trained
network; `shapes.evaluator`) and the pixel judge (`shapes.pixels.judge_dir`: the palette and geometry, no model).
On held-out real clips through the world's VAE the pixel judge reads shape 0.98-1.00, the small preset's evaluator
0.88 and the full preset's 0.98 (pilots.md K1, K3): both judges are printed, neither replaces the other."""


def targets(rows: dict) -> dict:
    """Issue 34's targets on the world's video model against the measured rows, by each judge whose metrics the
    rows hold (printed; never used to change a metric; the HARIVO-faithful row is reported beside, not judged)."""
    v, f = rows["video"], rows["frames"]
    out = {}
    for judge, p in JUDGES.items():
        if f"{p}motion_accuracy" not in v:
            continue
        out[f"{judge}: motion_accuracy >= 0.70"] = v[f"{p}motion_accuracy"] >= 0.70
        out[f"{judge}: frame baseline motion_accuracy <= 0.25"] = f.get(f"{p}motion_accuracy", 1) <= 0.25
        out[f"{judge}: colour and shape accuracy >= 0.80"] = (
            min(v.get(f"{p}colour_accuracy", 0), v.get(f"{p}shape_accuracy", 0)) >= 0.80
        )
    if "domain_fvd" in v and "domain_fvd" in f:
        out["domain FVD below the frame baseline's"] = v["domain_fvd"] < f["domain_fvd"]
    return out
