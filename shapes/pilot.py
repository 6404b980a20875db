"""Pilots of the shapes world's base: one variant of its training config, a few hundred steps, checked (issue 34).

    python -m shapes.pilot --world runs/shapes-small --name v_zsnr --steps 400 \\
        diffusion.prediction_type=v_prediction diffusion.zero_terminal_snr=true diffusion.loss_weighting=min_snr

Takes a world that `python -m shapes.build --until stills` has made (its base/ and latents/stills/), copies the
base to WORLD/pilots/NAME/base with the scheduler file of the variant (`base_scheduler` with the overrides: the
check samples as the variant trains), trains the UNet through `training.run` (training/configs/shapes_base.yaml +
the overrides), installs it and runs the base's check (`check_base`). Writes WORLD/pilots/NAME/pilot.json:
the overrides, steps, final training metrics, check summary and seconds. Append the result to
docs/shapes/pilots.md.
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


def pilot(world: Path, name: str, steps: int, overrides: list[str], check: int, sample_steps: int) -> dict:
    t0 = time.perf_counter()
    out = world / "pilots" / name
    base = out / "base"
    if not base.exists():
        shutil.copytree(world / "base", base)
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
    record = dict(
        name=name,
        overrides=overrides,
        steps=steps,
        metrics=json.loads((run_dir / "result.json").read_text())["metrics"],
        check=result["summary"],
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
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of shapes_base.yaml")
    a = p.parse_args(argv)
    world = Path(a.world).resolve()
    missing = [d for d in ("base", "latents/stills") if not (world / d).is_dir()]
    if missing:
        p.error(
            f"{world} has no {' or '.join(missing)}: build it first (python -m shapes.build --out {a.world} "
            "--until stills)"
        )
    record = pilot(world, a.name, a.steps, a.overrides, a.check, a.sample_steps)
    print(json.dumps({k: record[k] for k in ("name", "overrides", "steps", "check", "seconds")}))
    return record


if __name__ == "__main__":
    main()
