"""Pilots of the shapes world's base: one variant of its training config, a few hundred steps, checked (issue 34).

    python -m shapes.pilot --world runs/shapes-small --name v_zsnr --steps 400 \\
        diffusion.prediction_type=v_prediction diffusion.zero_terminal_snr=true diffusion.loss_weighting=min_snr

Takes a world that `python -m shapes.build --until stills` has made (its base/ and latents/stills/), copies the
base to WORLD/pilots/NAME/base with the scheduler file of the variant (`base_scheduler` with the overrides: the
check samples as the variant trains), trains the UNet through `training.run` (training/configs/shapes_base.yaml +
the overrides), installs it and runs the base's check (`check_base`). Writes WORLD/pilots/NAME/pilot.json:
the overrides, steps, final training metrics, check summary and seconds. Append the result to
docs/shapes/pilots.md.

`--video BASE_PILOT` pilots the video model instead: training/configs/shapes_video.yaml + the overrides on the base
that pilot trained, on WORLD/latents/videos (`shapes.build --until evaluator`), then `training.evaluate` with the
world's evaluator on `--prompts` held-out prompts, beside the frame-by-frame baseline of the same base with the same
sampler, CFG and MG (computed once per base pilot, prompt count, seeds and evaluator; `--prompts N --seeds S`: N prompts x
S videos each):

    python -m shapes.pilot --world runs/pilot --name xattn --video v_600 --steps 300 model.text_conditioning=cross_attention
    python -m shapes.pilot --world runs/pilot --name motion --video v_600 --steps 300 \\
        --config training/configs/shapes_video_motion.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shapes.base import BASE_TRAIN_CONFIG, base_scheduler, check_base, install_unet, latent_size

VIDEO_TRAIN_CONFIG = "training/configs/shapes_video.yaml"
SAMPLE_CONFIG = "training/configs/sample_shapes.yaml"


def pilot(
    world: Path,
    name: str,
    steps: int,
    overrides: list[str],
    check: int,
    sample_steps: int,
    start: str | None = None,
) -> dict:
    """`start`: another pilot's name; its trained base is this one's starting point (a learning curve in legs)."""
    t0 = time.perf_counter()
    out = world / "pilots" / name
    base = out / "base"
    if start:
        overrides = ["model.from_scratch=false", *overrides]
    if not base.exists():
        shutil.copytree(world / "pilots" / start / "base" if start else world / "base", base)
        shutil.rmtree(base / "scheduler")
        base_scheduler(BASE_TRAIN_CONFIG, overrides).save_pretrained(base / "scheduler")
    run_dir = out / "train"
    args = ["--config", str(BASE_TRAIN_CONFIG), "--data", str(world / "latents" / "stills")]
    args += ["--output", str(run_dir), f"model.pretrained={base}", f"model.latent_size={latent_size(base)}"]
    args += [f"optim.max_steps={steps}", *overrides]
    code = subprocess.call([sys.executable, "-m", "training.run", *args])
    if code:
        raise SystemExit(f"shapes.pilot: training.run failed (exit {code})")
    t_train = time.perf_counter() - t0
    install_unet(base, run_dir / "export" / "unet")
    result = check_base(base, n=check, steps=sample_steps)
    (out / "check.json").write_text(json.dumps(result, indent=1) + "\n")
    record = dict(
        name=name,
        start=start,
        overrides=overrides,
        steps=steps,
        metrics=json.loads((run_dir / "result.json").read_text())["metrics"],
        check=result["summary"],
        train_s=round(t_train, 1),
        seconds=round(time.perf_counter() - t0, 1),
    )
    (out / "pilot.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _evaluate(
    world: Path, checkpoint: Path, prompts: Path, out: Path, sample_steps: int, baseline: bool, seeds: int = 1
) -> dict:
    """`training.evaluate` of `checkpoint` (or its frame baseline) on `prompts` with the world's evaluator,
    `seeds` videos per prompt, and the pixel judge's reading of the same mp4s."""
    from shapes.build import real_set
    from shapes.heldout import sample_overrides
    from shapes.pixels import judge_dir

    args = ["--config", SAMPLE_CONFIG, "--checkpoint", str(checkpoint), "--prompts", str(prompts)]
    args += ["--output", str(out), *(["--baseline", "frames"] if baseline else [])]
    args += sample_overrides(world, real_set(world / "eval" / "real", 0), 0, seeds, sample_steps)
    if subprocess.call([sys.executable, "-m", "training.evaluate", *args]):
        raise SystemExit(f"shapes.pilot: training.evaluate of {checkpoint} failed")
    return json.loads((out / "report.json").read_text())["metrics"] | judge_dir(out)


METRICS = (
    "pixel_motion_accuracy",
    "pixel_colour_accuracy",
    "pixel_shape_accuracy",
    "motion_accuracy",
    "colour_accuracy",
    "shape_accuracy",
    "background_accuracy",
    "domain_fvd",
    "domain_fid",
)


def video_pilot(
    world: Path,
    name: str,
    base_pilot: str,
    steps: int,
    overrides: list[str],
    n_prompts: int,
    sample_steps: int,
    start: str | None = None,
    config: str | None = None,
    seeds: int = 1,
) -> dict:
    """Train the video model (`config`, default shapes_video.yaml) on `base_pilot`'s base and score it beside that
    base's frame baseline. `start`: an earlier video pilot whose last checkpoint this one resumes (weights,
    optimiser, step, and its config unless `config` names one), `steps` more steps."""
    from shapes.heldout import eval_prompts
    from shapes.pixels import judge_dir

    t0 = time.perf_counter()
    out, base = world / "pilots" / name, world / "pilots" / base_pilot / "base"
    if start:
        before = json.loads((world / "pilots" / start / "pilot.json").read_text())
        ckpt = sorted((world / "pilots" / start / "train").glob("checkpoint_[0-9]*"))[-1]
        overrides = [*before["overrides"], f"run.resume_from={ckpt}", *overrides]
        steps += before["steps"]
        config = config or before.get("config")
    config = config or VIDEO_TRAIN_CONFIG
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(eval_prompts(n_prompts)) + "\n")
    run_dir = out / "train"
    args = [
        "--config",
        config,
        "--data",
        str(world / "latents" / "videos"),
        "--output",
        str(run_dir),
    ]
    args += [f"model.pretrained={base}", f"model.latent_size={latent_size(base)}", f"optim.max_steps={steps}"]
    if subprocess.call([sys.executable, "-m", "training.run", *args, *overrides]):
        raise SystemExit("shapes.pilot: training.run failed")
    t_train = time.perf_counter() - t0
    video = _evaluate(world, run_dir, prompts, out / "eval", sample_steps, baseline=False, seeds=seeds)
    per_seeds = f"_x{seeds}" if seeds > 1 else ""
    judge = json.loads((world / "evaluator" / "evaluator.json").read_text())["sha256"][
        :8
    ]  # a new judge: a new baseline
    frames_dir = world / "pilots" / base_pilot / f"frames_{n_prompts}_{sample_steps}{per_seeds}_ev{judge}"
    if (frames_dir / "report.json").exists():
        frames = json.loads((frames_dir / "report.json").read_text())["metrics"] | judge_dir(frames_dir)
    else:
        frames = _evaluate(world, run_dir, prompts, frames_dir, sample_steps, baseline=True, seeds=seeds)
    pick = lambda m: {k: round(m[k], 4) for k in METRICS if k in m}  # noqa: E731
    record = dict(
        name=name,
        video_of=base_pilot,
        start=start,
        config=config,
        overrides=overrides,
        steps=steps,
        metrics=json.loads((run_dir / "result.json").read_text())["metrics"],
        video=pick(video),
        frame_baseline=pick(frames),
        prompts=n_prompts,
        seeds=seeds,
        train_s=round(t_train, 1),
        seconds=round(time.perf_counter() - t0, 1),
    )
    (out / "pilot.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m shapes.pilot", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="a world built at least until its stills (shapes.build)")
    p.add_argument("--name", required=True, help="the pilot's directory under WORLD/pilots/")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--check", type=int, default=64, help="held-out captions the check draws")
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument(
        "--from",
        dest="start",
        help="continue this pilot (WORLD/pilots/NAME): its trained base, or its video run and config",
    )
    p.add_argument("--video", metavar="BASE_PILOT", help="pilot the video model on this base pilot's base")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts a video pilot is scored on")
    p.add_argument("--seeds", type=int, default=1, help="videos per prompt a video pilot is scored on")
    p.add_argument(
        "--config",
        help="a video pilot's training config (default: the --from pilot's, else " + VIDEO_TRAIN_CONFIG + ")",
    )
    p.add_argument(
        "overrides", nargs="*", help="KEY=VALUE overrides of shapes_base.yaml (shapes_video.yaml: --video)"
    )
    a = p.parse_args(argv)
    world = Path(a.world).resolve()
    if a.prompts < 1 or a.seeds < 1:
        p.error(f"--prompts and --seeds must be at least 1 (got {a.prompts}, {a.seeds})")
    if a.video:
        missing = [
            d for d in ("evaluator", "latents/videos", f"pilots/{a.video}/base") if not (world / d).is_dir()
        ]
        if missing:
            p.error(
                f"{world} has no {' or '.join(missing)}: python -m shapes.build --out {a.world} --until evaluator"
            )
        if a.start and not (world / "pilots" / a.start / "pilot.json").is_file():
            p.error(f"{world}/pilots/{a.start} is not a finished pilot")
        record = video_pilot(
            world,
            a.name,
            a.video,
            a.steps,
            a.overrides,
            a.prompts,
            a.sample_steps,
            a.start,
            a.config,
            a.seeds,
        )
        print(
            json.dumps(
                {k: record[k] for k in ("name", "video_of", "overrides", "steps", "video", "frame_baseline")}
            )
        )
        return record
    missing = [d for d in ("base", "latents/stills") if not (world / d).is_dir()]
    if missing:
        p.error(
            f"{world} has no {' or '.join(missing)}: build it first (python -m shapes.build --out {a.world} "
            "--until stills)"
        )
    if a.start and not (world / "pilots" / a.start / "pilot.json").is_file():
        p.error(f"{world}/pilots/{a.start} is not a finished pilot")
    if a.config:
        p.error(
            "--config is for video pilots (--video); a base pilot trains shapes_base.yaml + the overrides"
        )
    record = pilot(world, a.name, a.steps, a.overrides, a.check, a.sample_steps, a.start)
    print(json.dumps({k: record[k] for k in ("name", "start", "overrides", "steps", "check", "seconds")}))
    return record


if __name__ == "__main__":
    main()
