"""`python -m tuning.bench`: Ray Tune's overhead per sampling trial vs. the same sampling in a plain loop.

    python -m tuning.bench [--checkpoint RUN_DIR] [--trials 4] [--output runs/bench/tune]

Both sides run the demo sampling sweep's trial (`tuning/configs/demo_sampling.yaml`: tiny zoo, one
prompt, 4 DDPM steps, CLIPSIM) `--trials` times, one at a time on 1 CPU each: once as a plain Python loop
over `training.evaluate.evaluate`, once as a Tune sweep through `tuning.run.run_sweep` (trial actors,
result files, experiment checkpoints, trials.csv / best.yaml / plot). Ray is started before either
side is timed. Without --checkpoint a tiny random checkpoint is built (as the tests' fixture does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from pipeline.configlib import load_config

DEMO_SAMPLING = Path(__file__).resolve().parent / "configs" / "demo_sampling.yaml"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tuning.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint to sample (default: a tiny random one)")
    p.add_argument("--trials", type=int, default=4, help="sampling trials on each side")
    p.add_argument("--output", default="runs/bench/tune", help="scratch directory (replaced)")
    a = p.parse_args(argv)

    import shutil

    import ray
    import torch

    from fixtures.checkpoints import tiny_checkpoint
    from fixtures.zoo import DEFAULT_ZOO_DIR, ensure_tiny_zoo
    from training.evaluate import evaluate
    from training.sampling.config import SampleConfig
    from tuning.config import SweepConfig
    from tuning.objectives import trial_config
    from tuning.run import prepare, run_sweep

    out = Path(a.output).resolve()
    shutil.rmtree(out, ignore_errors=True)
    zoo = ensure_tiny_zoo(os.environ.get("T2V_TINY_ZOO", DEFAULT_ZOO_DIR))
    os.environ["T2V_TINY_ZOO"] = str(Path(zoo.root).resolve())
    ckpt = a.checkpoint or str(tiny_checkpoint(zoo.sd, out / "ckpt"))
    sweep = load_config(
        SweepConfig,
        DEMO_SAMPLING,
        [f"sampling.checkpoint={ckpt}", f"output.dir={out / 'sweep'}", "search.max_concurrent_trials=1"],
    )
    # n identical trials: the same work on both sides, so the difference is Tune's.
    sweep.space = {"jvid.gamma": {"grid": [1.0] * a.trials}}
    plan = prepare(sweep)
    cfg = trial_config(SampleConfig, plan["trial_tree"], {"jvid.gamma": 1.0})

    torch.set_num_threads(1)  # a trial holds 1 CPU
    evaluate(ckpt, plan["prompts"], out / "warmup", cfg)  # file caches, lazy imports: counted on neither side
    plain = []
    for i in range(a.trials):
        t0 = time.perf_counter()
        evaluate(ckpt, plan["prompts"], out / "plain" / str(i), cfg)
        plain.append(time.perf_counter() - t0)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t0 = time.perf_counter()
    summary = run_sweep(sweep)
    tune_wall = time.perf_counter() - t0
    ray.shutdown()

    import json

    rows = json.loads((out / "sweep" / "trials.json").read_text())
    # Inside a trial: Tune's time for it minus evaluate()'s own; the first trial also starts the actor.
    inside = [r["time_total_s"] - r["seconds"] for r in rows if r["time_total_s"] is not None]
    plain_total = sum(plain)
    result = {
        "trials": a.trials,
        "plain_per_trial_s": plain_total / a.trials,
        "plain_stdev_s": statistics.pstdev(plain),
        "tune_per_trial_s": tune_wall / a.trials,
        "overhead_per_trial_s": (tune_wall - plain_total) / a.trials,
        "ratio": tune_wall / plain_total,
        "completed": summary["completed"],
        "first_trial_overhead_s": max(inside) if inside else None,
        "later_trial_overhead_s": statistics.median(sorted(inside)[:-1]) if len(inside) > 1 else None,
    }
    print(f"\n=== tuning.bench: {a.trials} sampling trials, 1 at a time, 1 CPU each")
    print(f"  plain loop:   {result['plain_per_trial_s']:.2f} s/trial (stdev {result['plain_stdev_s']:.2f})")
    print(f"  Ray Tune:     {result['tune_per_trial_s']:.2f} s/trial ({summary['completed']} completed)")
    print(f"  overhead:     {result['overhead_per_trial_s']:+.2f} s/trial")
    print(f"  ratio:        {result['ratio']:.2f}x (Tune wall / plain loop)")
    if inside:
        print(
            f"  of which inside trials: first {result['first_trial_overhead_s']:.2f} s (actor start, imports), "
            f"later (reused actor) median {result['later_trial_overhead_s'] or 0:.2f} s; the rest is the "
            "sweep's fixed cost (Tuner start, experiment snapshots, result files)"
        )
    return result


if __name__ == "__main__":
    main()
