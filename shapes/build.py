"""`make shapes`: every model of the shapes world trained end to end, on the mission's own path.

    python -m shapes.build --out runs/shapes                 # the full build (README: minutes per stage)
    python -m shapes.build --out runs/shapes-small --preset small   # a reduced world: the same stages, smaller
    python -m shapes.build --out runs/shapes-down8 --vae-down 8     # SD's 8x VAE (8x8 latents: the first design's)

Stages, each a directory under OUT (a re-run skips finished stages; `--redo STAGE` empties it and the
stages after it, and runs them again):
1. shards/     WebVid-format shards of the world (`fixtures.synth`): videos/ (bad crawl samples, mis-captioned
               and degraded videos mixed in) and stills/ (single frames captioned with size, colour, shape and
               position: "a small red circle at the left on a grey background"), both of the
               training combinations only; eval_prompts.txt: prompts of the held-out combinations;
2. clip/       the world's open_clip model + LAION-layout aesthetic head + thresholds (`shapes.clip`);
3. base/       the text-to-image base in SD 1.5's layout: trained VAE (`--vae-down` 8 or 4), the CLIP's text
               tower, the scheduler of shapes_base.yaml's schedule (`shapes.base`); the stages after it read the
               latent size from its VAE (`model.latent_size` of the training runs);
4. latents/stills   the stills through `pipeline.run` (filters off: stills are clean by construction);
5. base_train/ its UNet trained through `training.run` (shapes_base.yaml), installed into base/unet, then
               checked: held-out captions drawn by `StableDiffusionPipeline` (CFG `shapes.base.CHECK_GUIDANCE`),
               read back by `shapes.pixels`;
6. latents/videos   the videos through `pipeline.run` with the world's CLIP / aesthetic thresholds, and the
               filters' precision and recall (`shapes.filter_report`);
7. evaluator/  the world's I3D (`shapes.evaluator`), half its training clips through the base's VAE and back, so
               that it reads shapes as the decoder draws them (its card: held-out accuracy rendered and decoded);
               only eval/ and the video pilots read it, so `--redo evaluator` keeps the base and the latents;
8. video/      the world's video model on the frozen base through `training.run` (shapes_video_motion.yaml: the
               pilots' best, per-frame text as a time basis reading word order, every second step without the
               temporal layers at the top noise levels, no auxiliary losses);
9. harivo/     the HARIVO-faithful variant (shapes_video.yaml: frame tokens, L_TRS / L_reg / L_DC), reported beside;
10. eval/      `training.evaluate` of both video models and of the frame-by-frame baseline on the held-out
               prompts (domain FVD, motion / attribute accuracy, CLIPSIM) against real/ (clean videos of the
               held-out combinations, written here) + strip.png.
OUT/build.json records each stage's result and seconds (written atomically after each stage). The stages that
run `pipeline.run` / `training.run` resume inside themselves (finished shards, the latest checkpoint), eval/ keeps
each model it has evaluated (its report.json); the others take minutes and start again. A progress line per stage
prints the elapsed time against the stage's measured duration (`Preset.expected_s`) and the build's ETA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from shapes.heldout import eval_prompts, sample_overrides, targets

STAGES = ("shards", "clip", "base", "stills", "base_train", "latents", "evaluator", "video", "harivo", "eval")
OUTPUTS = {"stills": "latents/stills", "latents": "latents/videos"}
"""Each stage's directory under OUT (the stage's name where not listed); `--redo` empties it first."""


@dataclass(frozen=True)
class Preset:
    video_shards: int = 8
    videos_per_shard: int = 250
    model_bad: int = 3  # per shard and kind: 15 mis-captioned or degraded videos per shard
    still_shards: int = 8
    stills_per_shard: int = 500
    clip_steps: int = 300
    clip_heldout: int = 400  # held-out clips per calibration / test set
    aesthetic_clips: int = 2000
    evaluator_clips: int = 5000
    evaluator_steps: int = 600
    vae_steps: int = 700  # at 4x: reconstructions read colour 0.98, shape 0.95 (pilots.md P2; 2026-12-07)
    # the VAE's downsampling (`shapes.base.VAE_BLOCKS`): 4 (4x16x16 latents) or 8 (4x8x8, SD's; its
    # reconstructions read back colour 0.72 / shape 0.84 with the same weight: pilots.md P3)
    vae_down: int = 4
    vae_object_weight: float = 4.0  # the object's pixels count 1 + this in the VAE's loss (pilots.md P2)
    base_steps: int = 1500
    # held-out captions the base draws for its check: 256 from one stream (the 128 x 2 in count; its first
    # 128 are the ones pilots.md G1 chose the CFG on); at `sample_steps` DDIM steps (G1 measured 15)
    base_check: int = 256
    video_steps: int = 600  # the world's video model (shapes_video_motion.yaml): V16's steps (pilots.md K2)
    harivo_steps: int = 300  # the HARIVO-faithful variant: ~3.3x a video step with its three losses at 16x16
    eval_prompts: int = 128
    # seeds per prompt: 256 videos (the domain FVD's minimum is 512: recorded as below it)
    eval_videos_per_prompt: int = 2
    sample_steps: int = 15  # DDIM steps of every check and evaluation: the pilots' (G1, K2)
    expected_s: dict = field(default_factory=dict)  # stage -> seconds measured on 2 cores (progress / ETA)


# Seconds per stage: the full build alone on the 2-core machine of 2026-12-07 (pilots.md F1; progress and ETA only).
MEASURED_S = dict(
    shards=40,
    clip=352,
    base=464,
    stills=91,
    base_train=3325,  # 1,500 steps x 2.1 s + the check on 256 captions
    latents=164,
    evaluator=1012,  # 681 s of it training, 303 s the VAE round trips
    video=1303,  # 600 steps x 2.0 s
    harivo=1527,  # 300 steps at 0.9 samples/s (the HARIVO losses), start-up, export
    eval=5362,  # 256 videos each: the video model 1,965 s, the frame baseline 1,359 s, HARIVO ~1,960 s, judges
)
# The small preset at 16 x 16, alone, on the 2-core machine of 2026-12-07 (its two cores give ~1.25x one core's
# throughput: pilots.md S1): measured up to latents, but for the evaluator's round trips.
SMALL_MEASURED_S = dict(
    shards=10,
    clip=246,
    evaluator=300,  # 175 measured; + its 2,000 clips through the VAE (J3: 350 s beside another job)
    base=283,
    stills=34,
    latents=40,
    base_train=950,  # estimated from B1's 2.2 s a step (400 steps + the check)
    video=450,  # estimated: 200 steps x ~2.2 s
    harivo=700,  # estimated: 100 steps x ~7 s
    eval=250,  # estimated: 3 x 8 videos
)
PRESETS = {
    "full": Preset(expected_s=MEASURED_S),
    "small": Preset(
        video_shards=2,
        videos_per_shard=200,
        model_bad=1,
        still_shards=2,
        stills_per_shard=500,
        clip_steps=300,  # its text states: pilots.md C1 (100 steps keep shape 0.28, position 0.20; 300: 0.40, 0.35)
        evaluator_clips=2000,
        evaluator_steps=300,
        base_steps=400,
        base_check=128,
        video_steps=200,
        harivo_steps=100,
        eval_prompts=8,
        eval_videos_per_prompt=1,
        sample_steps=15,
        expected_s=SMALL_MEASURED_S,
    ),
}


# --- bookkeeping -----------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)  # atomic: a kill never leaves half a record


class Progress:
    """Prints `[stage i/n] elapsed / expected, build ETA` every `every` seconds while a stage runs."""

    def __init__(self, preset: Preset, todo: list[str], every: float = 30.0):
        self.preset, self.todo, self.every = preset, todo, every
        self.t_build = time.perf_counter()

    def _remaining(self, stage: str) -> float:
        later = self.todo[self.todo.index(stage) + 1 :]
        return sum(self.preset.expected_s.get(s, 0.0) for s in later)

    def run(self, stage: str, fn):
        i = STAGES.index(stage) + 1
        expected = self.preset.expected_s.get(stage)
        t0, stop = time.perf_counter(), threading.Event()
        print(
            f"\n=== [{i}/{len(STAGES)}] {stage}" + (f" (~{expected:.0f} s)" if expected else ""), flush=True
        )

        def tick():
            while not stop.wait(self.every):
                el = time.perf_counter() - t0
                bar = ""
                if expected:
                    frac = min(el / expected, 1.0)
                    left = max(expected - el, 0.0) + self._remaining(stage)
                    eta = time.strftime("%H:%M", time.localtime(time.time() + left))
                    bar = f" [{'#' * int(20 * frac):<20}] {100 * frac:3.0f}% of ~{expected:.0f} s, build ETA {eta}"
                print(f"    ... {stage}: {el:.0f} s{bar}", flush=True)

        threading.Thread(target=tick, daemon=True).start()
        try:
            return fn()
        finally:
            stop.set()


def _run(args: list[str], env: dict) -> None:
    """One of the project's commands as a user runs it; its output streams through."""
    print("$ " + " ".join(args), flush=True)
    code = subprocess.call([sys.executable, *args[1:]] if args[0] == "python" else args, env=env)
    if code:
        raise SystemExit(f"shapes.build: `{' '.join(args)}` failed (exit {code})")


def _curate(shards: Path, latents: Path, overrides: list[str], env: dict) -> dict:
    """`pipeline.run` with the world's preset; returns its summary.json."""
    _run(
        ["python", "-m", "pipeline.run", "--config", "pipeline/configs/shapes.yaml"]
        + ["--input", str(shards), "--output", str(latents), *overrides],
        env,
    )
    return json.loads((latents / "summary.json").read_text())


def _train(config: str, data: Path, run_dir: Path, base: Path, steps: int, env: dict) -> dict:
    """`training.run` of `config` on the base `base`, sized for its VAE's latents; returns its final metrics
    (result.json)."""
    from shapes.base import latent_size

    _run(
        ["python", "-m", "training.run", "--config", f"training/configs/{config}"]
        + [
            "--data",
            str(data),
            "--output",
            str(run_dir),
            f"model.pretrained={base}",
            f"model.latent_size={latent_size(base)}",
            f"optim.max_steps={steps}",
        ],
        env,
    )
    return json.loads((run_dir / "result.json").read_text())["metrics"]


# --- stages ----------------------------------------------------------------------------------------------------


def stage_shards(out: Path, p: Preset, env: dict) -> dict:
    from fixtures.synth import write_shards

    d = out / "shards"
    kw = dict(frames=24, fps=8, height=64, width=64, split="train")
    vids = write_shards(
        d / "videos", p.video_shards, p.videos_per_shard, bad=True, model_bad=p.model_bad, **kw
    )
    stills = write_shards(d / "stills", p.still_shards, p.stills_per_shard, kind="image", seed=1, **kw)
    prompts = eval_prompts(p.eval_prompts)
    (d / "eval_prompts.txt").write_text("\n".join(prompts) + "\n")
    count = lambda m: sum(len(s["samples"]) for s in m["shards"].values())  # noqa: E731
    return dict(videos=count(vids), stills=count(stills), eval_prompts=len(prompts))


def stage_clip(out: Path, p: Preset, env: dict) -> dict:
    from shapes import clip

    card = clip.build(out / "clip", p.clip_steps, p.aesthetic_clips, heldout=p.clip_heldout)
    return dict(thresholds=card["thresholds"], clip=card["clip"], aesthetic=card["aesthetic"])


def stage_evaluator(out: Path, p: Preset, env: dict) -> dict:
    from shapes import evaluator

    if not (out / "base" / "vae").is_dir():
        raise SystemExit(
            f"shapes.build: the evaluator trains on clips through the base's VAE: {out}/base has none"
        )
    codec = evaluator.vae_round_trip(out / "base" / "vae")
    model, record = evaluator.train(clips=p.evaluator_clips, steps=p.evaluator_steps, codec=codec)
    evaluator.save(model, out / "evaluator", record)
    keep = ("heldout_accuracy", "heldout_accuracy_decoded", "seconds", "codec_s")
    return {k: record[k] for k in keep}


def stage_base(out: Path, p: Preset, env: dict) -> dict:
    from pipeline.models import load_clip
    from shapes import base

    vae, record = base.train_vae(p.vae_steps, lr=1e-3, down=p.vae_down, object_weight=p.vae_object_weight)
    model, _, _ = load_clip(f"local-dir:{out / 'clip' / 'clip'}", "")
    card = {"vae": record, "text_encoder": f"open_clip text tower of {out / 'clip' / 'clip'}"}
    base.write_base(out / "base", vae, base.text_encoder_from_open_clip(model), record=card)
    return card


def stage_stills(out: Path, p: Preset, env: dict) -> dict:
    off = ["clip.enabled=false", "aesthetic.enabled=false"]  # stills are clean by construction
    summary = _curate(out / "shards" / "stills", out / "latents" / "stills", off, env)
    return {k: summary[k] for k in ("clips_out", "rejected")}


def stage_base_train(out: Path, p: Preset, env: dict) -> dict:
    from shapes import base

    run_dir = out / "base_train"
    metrics = _train("shapes_base.yaml", out / "latents" / "stills", run_dir, out / "base", p.base_steps, env)
    base.install_unet(out / "base", run_dir / "export" / "unet")
    check = base.check_base(out / "base", n=p.base_check, steps=p.sample_steps)
    _write_json(out / "base" / "check.json", check)
    return dict(result=metrics, check=check["summary"])


def stage_latents(out: Path, p: Preset, env: dict) -> dict:
    from shapes.filter_report import filter_report

    t = json.loads((out / "clip" / "card.json").read_text())["thresholds"]
    latents = out / "latents" / "videos"
    summary = _curate(out / "shards" / "videos", latents, [f"{k}={v}" for k, v in t.items()], env)
    report = filter_report(latents, out / "shards" / "videos" / "manifest.json")
    _write_json(latents / "filter_report.json", report)
    return dict(clips_out=summary["clips_out"], rejected=summary["rejected"], filters=report)


def stage_video(out: Path, p: Preset, env: dict) -> dict:
    videos = out / "latents" / "videos"
    return _train("shapes_video_motion.yaml", videos, out / "video", out / "base", p.video_steps, env)


def stage_harivo(out: Path, p: Preset, env: dict) -> dict:
    videos = out / "latents" / "videos"
    return _train("shapes_video.yaml", videos, out / "harivo", out / "base", p.harivo_steps, env)


def real_set(d: Path, n: int) -> Path:
    """The evaluation's real set at `d`: >= 512 clean videos of the held-out combinations (written once)."""
    from fixtures.synth import write_shards

    if not (d / "manifest.json").exists():
        write_shards(d, 2, max(512, n) // 2, frames=24, fps=8, height=64, width=64, seed=2, split="val")
    return d


def stage_eval(out: Path, p: Preset, env: dict) -> dict:
    from shapes.pixels import judge_dir
    from shapes.strip import write_strip

    d, prompts = out / "eval", out / "shards" / "eval_prompts.txt"
    videos = p.eval_prompts * p.eval_videos_per_prompt
    real = real_set(d / "real", videos)
    overrides = sample_overrides(out, real, videos, p.eval_videos_per_prompt, p.sample_steps)
    rows = {}
    for name, run, extra in (
        ("video", "video", []),
        ("harivo", "harivo", []),
        ("frames", "video", ["--baseline", "frames"]),
    ):
        if (d / name / "report.json").exists():  # evaluated by an earlier, interrupted run of this stage
            print(f"    {name}: evaluated earlier ({d / name / 'report.json'}), kept", flush=True)
        else:
            _run(
                ["python", "-m", "training.evaluate", "--config", "training/configs/sample_shapes.yaml"]
                + ["--checkpoint", str(out / run), "--prompts", str(prompts), "--output", str(d / name)]
                + [*extra, *overrides],
                env,
            )
        rows[name] = json.loads((d / name / "report.json").read_text())["metrics"] | judge_dir(d / name)
    write_strip(d / "video", d / "strip.png", d / "frames")
    report = dict(
        video=rows["video"], harivo=rows["harivo"], frame_baseline=rows["frames"], targets=targets(rows)
    )
    _write_json(d / "report.json", report)
    return report


RUNNERS = {
    "shards": stage_shards,
    "clip": stage_clip,
    "evaluator": stage_evaluator,
    "base": stage_base,
    "stills": stage_stills,
    "base_train": stage_base_train,
    "latents": stage_latents,
    "video": stage_video,
    "harivo": stage_harivo,
    "eval": stage_eval,
}


def build(
    out: str | Path,
    preset: str = "full",
    redo: tuple[str, ...] = (),
    until: str | None = None,
    skip: tuple[str, ...] = (),
    vae_down: int | None = None,
) -> dict:
    """Run the stages not yet recorded in OUT/build.json (and `redo`), up to `until`, but `skip`; returns the
    record. `vae_down`: the base VAE's downsampling (None: what OUT was built with, else the preset's); another
    than OUT's base was built with needs `redo` from the base on."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    record_file = out / "build.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    if record.get("preset", preset) != preset:
        raise SystemExit(f"{out} was built with --preset {record['preset']}, not {preset}: use another --out")
    built_down = record.get("settings", {}).get("vae_down", PRESETS[preset].vae_down)
    p = replace(PRESETS[preset], vae_down=built_down if vae_down is None else vae_down)
    redone = min((STAGES.index(r) for r in redo), default=len(STAGES))
    if "base" in record.get("stages", {}) and built_down != p.vae_down and redone > STAGES.index("base"):
        raise SystemExit(
            f"{out}'s base has a VAE with --vae-down {built_down}, not {p.vae_down}: add --redo base "
            "(or an earlier stage) or use another --out"
        )
    record |= dict(preset=preset, settings=asdict(p))
    record.setdefault("stages", {})
    if redo:  # a redone stage and every stage after it (they read its output) start from nothing
        for s in STAGES[min(STAGES.index(r) for r in redo) :]:
            record["stages"].pop(s, None)
            shutil.rmtree(out / OUTPUTS.get(s, s), ignore_errors=True)
    last = STAGES.index(until) + 1 if until else len(STAGES)
    todo = [s for s in STAGES[:last] if s not in record["stages"] and s not in skip]
    env = os.environ | {"T2V_SHAPES": str(out), "RAY_DATA_LOG_LEVEL": "WARNING"}  # the presets' model paths
    progress = Progress(p, todo)
    for stage in STAGES[:last]:
        if stage in skip:
            continue
        if stage not in todo:
            print(f"=== {stage}: done earlier ({record['stages'][stage]['seconds']:.0f} s), skipped")
            continue
        t0 = time.perf_counter()
        result = progress.run(stage, lambda s=stage: RUNNERS[s](out, p, env))
        record["stages"][stage] = dict(result=result, seconds=round(time.perf_counter() - t0, 1))
        _write_json(record_file, record)
    record["seconds"] = round(sum(s["seconds"] for s in record["stages"].values()), 1)
    _write_json(record_file, record)
    return record


def main(argv: list[str] | None = None) -> dict:
    import logging

    from shapes.base import VAE_BLOCKS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(prog="python -m shapes.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/shapes", help="the world's directory (resumed when present)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument(
        "--redo",
        nargs="*",
        default=[],
        choices=STAGES,
        help="run these stages and the ones after them again, from nothing",
    )
    ap.add_argument("--until", choices=STAGES, help="stop after this stage")
    ap.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="leave these stages out")
    ap.add_argument(
        "--vae-down",
        type=int,
        choices=sorted(VAE_BLOCKS),
        help="the base VAE's downsampling (default: what OUT was built with, else 4: 16x16 latents for 64 px)",
    )
    a = ap.parse_args(argv)
    record = build(a.out, a.preset, tuple(a.redo), a.until, tuple(a.skip), a.vae_down)
    print(json.dumps({s: r["seconds"] for s, r in record["stages"].items()}, indent=1))
    if "eval" in record["stages"]:
        print(json.dumps(record["stages"]["eval"]["result"], indent=1))
    return record


if __name__ == "__main__":
    main()
