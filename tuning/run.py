"""`python -m tuning.run`: a Ray Tune sweep over training runs or over sampling of one checkpoint.

    python -m tuning.run --config tuning/configs/demo_train.yaml --data runs/demo/latents --output runs/sweeps/alpha
    python -m tuning.run --config tuning/configs/demo_sampling.yaml --checkpoint runs/demo/train \\
        --output runs/sweeps/jvid search.num_samples=8
    python -m tuning.run --output runs/sweeps/alpha --resume       # after a crash / Ctrl-C / preemption

The search space is checked against the trial config before any trial starts. OUTPUT gets `sweep.yaml`
(the resolved sweep, reused by --resume), `best.yaml` (a preset `training.run` / `training.sample`
accept as is), `trials.csv` + `trials.json` (every trial: status, parameters, metric) and
`objective.png`; Tune's experiment (per-trial logs, TensorBoard events, state for --resume) lives in
STORAGE/tune, training trials' Ray Train runs in STORAGE/train-runs/<trial_id> (STORAGE: output.storage_path,
default OUTPUT). With no cluster (no RAY_ADDRESS) a local Ray is started.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.configlib import ConfigError, config_args, flatten, from_dict, load_config, to_dict, to_yaml
from pipeline.raysession import init_ray, where_resolved
from tuning.config import SAMPLING_METRICS, SweepConfig
from tuning.objectives import absolute_paths, sampling_trial, train_trial
from tuning.space import SpaceError, check_space, grid_size, to_tune

log = logging.getLogger(__name__)

DATA_CPUS_PER_TRAIN_TRIAL = 1.0
"""CPUs left free per concurrent training trial for its Ray Data read tasks (else they never schedule)."""


class SweepError(ValueError):
    """A sweep that cannot start: bad inputs or an output dir holding another sweep."""


def target_schema(sweep: SweepConfig) -> type:
    """The trial config class: TrainConfig for training sweeps, SampleConfig for sampling sweeps."""
    if sweep.kind == "train":
        from training.config import TrainConfig

        return TrainConfig
    from training.sampling.config import SampleConfig

    return SampleConfig


def _abs(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def storage_root(sweep: SweepConfig) -> str:
    """Where Tune's experiment and the trials' Ray Train runs live (absolute path or URI)."""
    if not sweep.output.dir:
        raise SweepError("no sweep directory: pass --output DIR (or set output.dir)")
    root = sweep.output.storage_path or sweep.output.dir
    return root.rstrip("/") if "://" in root else _abs(root)


def prepare(sweep: SweepConfig) -> dict[str, Any]:
    """Check everything a sweep needs before Ray starts anything; returns what the trials are built from.

    Returns {"space": flat space, "preset_tree": base + fixed (best.yaml's base), "trial_tree": that +
    budget (+ data.path): every trial's starting point, "prompts": the fixed prompt list (sampling)}."""
    schema = target_schema(sweep)
    base = _abs(sweep.base)
    fixed = flatten(sweep.fixed)
    budget = flatten(sweep.budget)
    if sweep.kind == "train":
        if not sweep.data:
            raise SweepError("a training sweep needs the pipeline's output: pass --data DIR (or set data)")
        if "://" not in sweep.data and not Path(sweep.data).exists():
            raise SweepError(f"data={sweep.data} does not exist{where_resolved(sweep.data)}")
        budget["data.path"] = _abs(sweep.data)
    flat = check_space(sweep.space, schema, base, {**fixed, **budget})
    owned = [k for k in flat if k in ("run.storage_path", "run.name", "data.path")]
    if owned:
        raise SpaceError(f"search space key '{owned[0]}' is set by the sweep itself and cannot be searched")
    preset_tree = absolute_paths(to_dict(load_config(schema, base, fixed)))
    trial_cfg = load_config(schema, base, {**fixed, **budget})
    trial_tree = absolute_paths(to_dict(trial_cfg))
    prompts: list[str] = []
    if sweep.kind == "sampling":
        from training.sampling.write import read_prompts

        ckpt = sweep.sampling.checkpoint
        if not ckpt:
            raise SweepError("a sampling sweep needs a fixed checkpoint: pass --checkpoint RUN_DIR")
        if "://" not in ckpt and not Path(ckpt).exists():
            raise SweepError(f"sampling.checkpoint={ckpt} does not exist{where_resolved(ckpt)}")
        prompts = read_prompts(sweep.sampling.prompts)
        if trial_cfg.eval.max_prompts is not None:
            prompts = prompts[: trial_cfg.eval.max_prompts]
        check_metric_inputs(sweep.metric, trial_cfg.eval, "the trial config (fixed: ...)")
    evaluation = None
    if sweep.kind == "train" and sweep.evaluation.prompts is not None:
        evaluation = evaluation_plan(sweep)
    return {
        "space": flat,
        "preset_tree": preset_tree,
        "trial_tree": trial_tree,
        "prompts": prompts,
        "evaluation": evaluation,
    }


def check_metric_inputs(metric: str, e, where: str) -> None:
    """The trial's sampling config has what `metric` is computed from (`e`: its EvalConfig)."""
    from tuning.config import DOMAIN_METRICS

    if metric in ("clipsim", "frame_consistency") and not e.clipsim_enabled:
        raise SweepError(
            f"metric={metric} needs eval.clip_model with its weights (eval.clip_pretrained, or a "
            f"local-dir: / hf-hub: model) in {where}"
        )
    if metric == "fvd" and not (e.i3d_path and e.reference):
        raise SweepError(f"metric=fvd needs eval.i3d_path and eval.reference in {where}")
    if metric in DOMAIN_METRICS and not e.domain_evaluator:
        raise SweepError(f"metric={metric} needs eval.domain_evaluator in {where}")
    if metric in ("domain_fvd", "domain_fid") and not e.reference:
        raise SweepError(f"metric={metric} needs eval.reference (real videos) in {where}")


def evaluation_plan(sweep: SweepConfig) -> dict[str, Any]:
    """What every training trial's final evaluation samples and scores: {"tree": SampleConfig dict,
    "prompts": [...], "cpus", "gpus"}; checked here so a missing evaluator fails before any training."""
    from training.sampling.config import SampleConfig
    from training.sampling.write import read_prompts

    ev = sweep.evaluation
    cfg = load_config(SampleConfig, _abs(ev.config), flatten(ev.overrides))
    check_metric_inputs(sweep.metric, cfg.eval, "evaluation.overrides")
    prompts = read_prompts(ev.prompts)
    if cfg.eval.max_prompts is not None:
        prompts = prompts[: cfg.eval.max_prompts]
    return {"tree": absolute_paths(to_dict(cfg)), "prompts": prompts, "cpus": ev.cpus, "gpus": ev.gpus}


def trial_resources(sweep: SweepConfig, trial_tree: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(what the Tune trial process reserves, what one whole trial holds incl. its Ray Train workers)."""
    own = {"CPU": sweep.trial_cpus(), **sweep.resources.custom}
    if sweep.kind == "sampling":
        if sweep.resources.gpu:
            own["GPU"] = sweep.resources.gpu
        return own, dict(own)
    run = trial_tree["run"]
    total = dict(own)
    total["CPU"] = own["CPU"] + run["num_workers"] * run["cpus_per_worker"] + DATA_CPUS_PER_TRAIN_TRIAL
    if run["use_gpu"]:
        total["GPU"] = float(run["num_workers"])
    for name, amount in run["resources_per_worker"].items():
        total[name] = total.get(name, 0.0) + run["num_workers"] * amount
    return own, total


def concurrency(sweep: SweepConfig, whole_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """search.max_concurrent_trials, or (0) as many whole trials as the cluster's resources hold."""
    if sweep.search.max_concurrent_trials:
        return sweep.search.max_concurrent_trials
    fits = [math.floor(cluster.get(r, 0.0) / need + 1e-9) for r, need in whole_trial.items() if need > 0]
    n = min(fits) if fits else 1
    if n < 1:
        missing = {r: need for r, need in whole_trial.items() if cluster.get(r, 0.0) < need}
        raise SweepError(f"one trial needs {missing}, more than the cluster has ({cluster})")
    return n


def _search_alg(sweep: SweepConfig, max_concurrent: int):
    s = sweep.search
    if s.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed), seed=s.seed)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for an explicit BasicVariantGenerator: set it here.
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent)


def _scheduler(sweep: SweepConfig, trial_tree: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    once = sweep.kind == "sampling" or sweep.metric in SAMPLING_METRICS  # reported once per trial
    if s.kind == "fifo" or (s.kind == "auto" and once):
        return FIFOScheduler()
    max_t = s.max_t or trial_tree["optim"]["max_steps"]
    return ASHAScheduler(
        time_attr=s.time_attr,
        max_t=max_t,
        grace_period=min(s.grace_period, max_t),
        reduction_factor=s.reduction_factor,
    )


def _logger_callbacks(sweep: SweepConfig) -> list:
    """MLflow / W&B trial loggers, only where those packages are installed (and W&B is configured)."""
    import importlib.util

    callbacks = []
    if sweep.output.mlflow and importlib.util.find_spec("mlflow") is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(_abs(sweep.output.dir), "mlruns").as_uri()
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=sweep.output.name))
    wandb_ready = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
    if sweep.output.wandb and wandb_ready and importlib.util.find_spec("wandb") is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=sweep.output.wandb_project, group=sweep.output.name))
    return callbacks


def build_trainable(sweep: SweepConfig, plan: dict, own: dict[str, float]):
    """The Tune trainable (a function with its fixed inputs bound, and its per-trial resources)."""
    from ray import tune

    if sweep.kind == "train":
        fn = tune.with_parameters(
            train_trial,
            base_tree=plan["trial_tree"],
            metric=sweep.metric,
            train_storage=f"{storage_root(sweep)}/train-runs",
            evaluation=plan["evaluation"],
        )
    else:
        fn = tune.with_parameters(
            sampling_trial,
            base_tree=plan["trial_tree"],
            checkpoint=_abs(sweep.sampling.checkpoint),
            prompts=plan["prompts"],
        )
    return tune.with_resources(fn, own)


def run_sweep(sweep: SweepConfig, resume: bool = False) -> dict:
    """Run (or with `resume`, continue) `sweep`; writes OUTPUT/{sweep.yaml, best.yaml, trials.csv, ...}.

    Returns the summary `tuning.results.write_results` built (best params, metric, files, counts)."""
    import ray
    from ray import tune

    from tuning.results import write_results

    plan = prepare(sweep)  # everything that can be wrong is found here, before Ray starts a trial
    out = Path(_abs(sweep.output.dir))
    root = storage_root(sweep)
    exp_path = f"{root}/{sweep.output.name}"
    exists = tune.Tuner.can_restore(exp_path)
    if resume and not exists:
        raise SweepError(f"--resume: no Tune experiment to resume at {exp_path}")
    if exists and not resume:
        raise SweepError(f"{exp_path} already holds a sweep: pass --resume to continue it, or a new --output")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(to_yaml(sweep))

    init_ray()
    own, whole = trial_resources(sweep, plan["trial_tree"])
    n_concurrent = concurrency(sweep, whole, ray.cluster_resources())
    param_space = to_tune(plan["space"], sweep.search.algorithm)
    expected = grid_size(plan["space"], sweep.search.algorithm) * sweep.search.num_samples
    log.info(
        "sweep %s: %d trials, %d at a time, each holding %s", sweep.output.name, expected, n_concurrent, whole
    )
    trainable = build_trainable(sweep, plan, own)
    if resume:
        tuner = tune.Tuner.restore(
            exp_path,
            trainable,
            param_space=param_space,
            resume_unfinished=True,
            resume_errored=sweep.resume_errored == "resume",
            restart_errored=sweep.resume_errored == "restart",
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=_search_alg(sweep, n_concurrent),
                scheduler=_scheduler(sweep, plan["trial_tree"]),
                num_samples=sweep.search.num_samples,
                max_concurrent_trials=n_concurrent if sweep.search.algorithm == "optuna" else None,
                time_budget_s=sweep.time_budget_s,
                # A sampling trial's actor keeps torch / diffusers / open_clip imported for the next one.
                reuse_actors=sweep.kind == "sampling",
            ),
            run_config=tune.RunConfig(
                name=sweep.output.name,
                storage_path=root,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=_logger_callbacks(sweep) or None,
            ),
        )
    grid = tuner.fit()
    return write_results(grid, sweep, plan, target_schema(sweep), out, expected)


def resolve(args: argparse.Namespace) -> SweepConfig:
    """The sweep: preset (or OUTPUT/sweep.yaml on --resume) + overrides, with --data/--checkpoint/--output."""
    config, overrides = config_args(args)
    if not config and args.resume and args.output:
        config = [str(Path(args.output) / "sweep.yaml")]
    if not config:
        raise ConfigError("pass --config SWEEP.yaml (or --resume with the --output of an earlier sweep)")
    paths = {}  # set as Python strings: a path such as runs/2024_01 is not a YAML scalar to re-read
    if args.data:
        paths["data"] = args.data
    if args.checkpoint:
        paths["sampling.checkpoint"] = args.checkpoint
    if args.output:
        paths["output.dir"] = args.output
    return from_dict(SweepConfig, to_dict(load_config(SweepConfig, config, overrides)), paths)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m tuning.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        nargs="+",
        metavar="PRESET",
        help="sweep preset(s) (tuning/configs/*.yaml), merged in order; default on --resume: OUTPUT/sweep.yaml",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. search.num_samples=8"
    )
    p.add_argument("--data", help="training sweeps: the pipeline's output dir or URI")
    p.add_argument("--checkpoint", help="sampling sweeps: the fixed checkpoint (run dir, export dir)")
    p.add_argument("--output", help="sweep directory (best.yaml, trials.csv, Tune's experiment)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output")
    p.add_argument("--check", action="store_true", help="check the sweep and its search space, then exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sweep = resolve(args)
        if args.check:
            plan = prepare(sweep)
            print(f"tuning.run: sweep OK, searching {', '.join(plan['space'])}")
            return None
        summary = run_sweep(sweep, resume=args.resume)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        sys.exit(f"tuning.run: {exc}")
    from tuning.results import print_summary

    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
