"""`make demo`: the whole system on the embedded default (local Ray, generated shards, tiny models).

    python -m training.demo --output runs/demo

Runs, in order, and says plainly what it ran:
1. demo shards: WebVid-format webdataset tars with bad samples mixed in (`fixtures.synth`);
2. the tiny model zoo (`fixtures.zoo`), built once under runs/tiny-zoo;
3. the curation pipeline on those shards with the tiny models (`pipeline.run`, demo preset);
4. HARIVO training with Ray Train + DeepSpeed ZeRO-2 on 2 local CPU workers (`training.run`, demo preset);
5. one short video from the trained model (`training.sample`), once the sampler exists;
6. when a trained shapes world is there (`--world`, default runs/shapes: `make shapes`), videos of held-out
   prompts from its video model and strip.png (`shapes.strip`): a model that was trained, not a random one.
The tiny models are random: their video shows the machinery working, not quality.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from fixtures.synth import write_shards
from fixtures.zoo import DEFAULT_ZOO_DIR, ensure_tiny_zoo

WORLD_PROMPTS = 4


def trained_world(path: Path) -> bool:
    """Whether `path` holds a shapes world whose video model `make shapes` finished."""
    record = path / "build.json"
    return record.exists() and "video" in json.loads(record.read_text()).get("stages", {})


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/demo", help="where everything is written")
    p.add_argument("--zoo", default=str(DEFAULT_ZOO_DIR), help="tiny model zoo directory (built if absent)")
    p.add_argument(
        "--world", default="runs/shapes", help="a built shapes world (`make shapes`) to sample from"
    )
    a = p.parse_args(argv)
    out = Path(a.output)
    # One local Ray serves every stage; Ray Data's per-epoch INFO lines would bury the training progress.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    ran: list[str] = []
    skipped: list[str] = []

    t = _step("1/6 demo shards (fixtures.synth)")
    shards = out / "shards"
    if (shards / "manifest.json").exists():
        print(f"reusing {shards}")
    else:
        write_shards(shards, shards=2, per_shard=8, frames=24, fps=8, height=64, width=64, seed=0, bad=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    n = sum(len(s["samples"]) for s in manifest["shards"].values())
    ran.append(
        f"demo shards: {len(manifest['shards'])} tars, {n} samples (9 bad per shard) -> {shards} "
        f"[{time.perf_counter() - t:.1f}s]"
    )

    t = _step("2/6 tiny model zoo (fixtures.zoo)")
    zoo = ensure_tiny_zoo(a.zoo)
    ran.append(f"tiny model zoo -> {zoo.root} [{time.perf_counter() - t:.1f}s]")

    t = _step("3/6 curation pipeline (pipeline.run, demo preset)")
    from pipeline import run as pipeline_run

    latents = out / "latents"
    env_zoo = {"T2V_TINY_ZOO": str(zoo.root)}
    os.environ.update(env_zoo)  # the demo presets find the zoo through ${oc.env:T2V_TINY_ZOO}
    code = pipeline_run.main(
        ["--config", "pipeline/configs/demo.yaml", "--input", str(shards), "--output", str(latents)]
    )
    if code:
        sys.exit(f"make demo: the pipeline failed (exit {code})")
    ran.append(
        f"pipeline: clips, rejected table, summary.json/png -> {latents} [{time.perf_counter() - t:.1f}s]"
    )

    t = _step("4/6 HARIVO training: Ray Train + DeepSpeed ZeRO-2, 2 CPU workers (training.run, demo preset)")
    from training import run as training_run

    run_dir = out / "train"
    training_run.main(
        ["--config", "training/configs/demo.yaml", "--data", str(latents), "--output", str(run_dir)]
    )
    ran.append(
        f"training: checkpoints, export (trainable.safetensors, motion_adapter/), tensorboard -> {run_dir} "
        f"[{time.perf_counter() - t:.1f}s]"
    )

    t = _step("5/6 sample a video (training.sample)")
    if importlib.util.find_spec("training.sample") is not None:
        from training import sample

        videos = out / "videos"
        sample.main(
            [
                "--checkpoint",
                str(run_dir),
                "--prompt",
                "a red circle moves from left to right on a dark blue background",
                "--output",
                str(videos),
            ]
        )
        ran.append(f"sampling: mp4 + gif + settings json -> {videos} [{time.perf_counter() - t:.1f}s]")
    else:
        skipped.append("sampling a demo video (training.sample) is not implemented yet")

    t = _step("6/6 the shapes world's video model (training.sample)")
    world = Path(a.world)
    if trained_world(world):
        from shapes.heldout import eval_prompts
        from shapes.strip import write_strip
        from training import sample

        shapes_videos = out / "shapes_videos"
        args = ["--config", "training/configs/sample_shapes.yaml", "--checkpoint", str(world / "video")]
        args += ["--output", str(shapes_videos)] + [
            x for q in eval_prompts(WORLD_PROMPTS) for x in ("--prompt", q)
        ]
        sample.main(args)
        strip = write_strip(shapes_videos, out / "shapes_strip.png", rows=WORLD_PROMPTS)
        ran.append(
            f"shapes world: videos of {WORLD_PROMPTS} held-out prompts -> {shapes_videos}, frames -> {strip} "
            f"[{time.perf_counter() - t:.1f}s]"
        )
    else:
        skipped.append(f"the shapes world's videos: no trained world at {world} (`make shapes` builds it)")

    print("\n=== make demo: what ran")
    for line in ran:
        print(f"  ran:     {line}")
    for line in skipped:
        print(f"  not run: {line}")


if __name__ == "__main__":
    main()
