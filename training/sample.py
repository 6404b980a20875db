"""Text-to-video sampling from a trained checkpoint (SPEC section 4): DDIM/DDPM/EDM, CFG, MG, JVID.

    python -m training.sample --checkpoint runs/demo/train --prompt "a dog runs" --output runs/demo/samples
    python -m training.sample --checkpoint RUN --prompts prompts.txt --output OUT --config \\
        training/configs/sample_jvid.yaml sampler.steps=30 jvid.gamma=0.1
    python -m training.sample --replay OUT/000-0_a-dog-runs.json --output OUT2   # regenerate exactly
    python -m training.sample --cascade base=RUN_B,interp=RUN_I,sr=RUN_S --prompt "a dog runs" \
        --output OUT --config training/configs/sample_pyoco.yaml      # PYoCo chain (training/sampling/cascade.py)

Per video it writes `<name>.mp4`, `<name>.gif`, `<name>.latents.safetensors` and `<name>.json` (the
checkpoint, the full resolved `SampleConfig`, prompt, seed, timesteps and JVID's per-step model choice),
plus `samples.json` listing them all.

One reverse step (`training/sampling/pipeline.py`): the chosen denoiser (video model, or JVID's image model)
predicts for [uncond, cond] -> CFG with the time-dependent scale -> eps -> MG (Algorithm 1) -> the
sampler's update. The noise schedule is the one the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.configlib import TextFileError, add_config_args, config_args, from_dict, load_config
from training.sampling.cascade import generate_cascade, load_cascade, parse_cascade
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline
from training.sampling.write import generate, read_prompts

__all__ = ["main", "replay"]


def replay(record_path: str | Path, output: str | Path, checkpoint: str | None = None) -> dict:
    """Regenerate one video exactly from the JSON `generate` (or the cascade's) wrote next to it."""
    rec = json.loads(Path(record_path).read_text())
    cfg = from_dict(SampleConfig, rec["config"])
    cfg.output.seed, cfg.output.videos_per_prompt = rec["seed"], 1
    if "checkpoints" in rec:  # a --cascade record: every stage's checkpoint
        return generate_cascade(load_cascade(rec["checkpoints"], cfg), [rec["prompt"]], output)[0]
    pipe = load_pipeline(checkpoint or rec["checkpoint"], cfg)
    return generate(pipe, [rec["prompt"]], output)[0]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m training.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="export dir, RUN_DIR (uses RUN_DIR/export) or trainable.safetensors")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--output", required=True, help="directory for mp4/gif/latents/JSON")
    p.add_argument("--replay", help="a JSON written by an earlier run: regenerate that video exactly")
    p.add_argument(
        "--cascade",
        help="PYoCo chain base=CKPT,interp=CKPT,sr=CKPT (interp and sr optional): sample, upsample, decode",
    )
    add_config_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.replay:
        return [replay(a.replay, a.output, a.checkpoint)]
    if bool(a.checkpoint) == bool(a.cascade):
        p.error("give exactly one of --checkpoint and --cascade (unless --replay)")
    try:  # a user's text files: not UTF-8, or no prompt in the list (other config errors raise)
        prompts = list(a.prompt) + (read_prompts(a.prompts) if a.prompts else [])
        if not prompts:
            p.error("give --prompt and/or --prompts")
        cfg = load_config(SampleConfig, *config_args(a))
    except TextFileError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    if a.cascade:
        records = generate_cascade(load_cascade(parse_cascade(a.cascade), cfg), prompts, a.output)
        print(f"wrote {len(records)} cascade videos to {a.output}")
        return records
    records = generate(load_pipeline(a.checkpoint, cfg), prompts, a.output)
    print(f"wrote {len(records)} videos to {a.output}")
    return records


if __name__ == "__main__":
    main()
