"""`python -m training.run`: train the video model with Ray Train + DeepSpeed ZeRO.

    python -m training.run --config training/configs/demo.yaml --data LATENTS --output RUN_DIR [a.b=value ...]
    ray job submit --working-dir . -- python -m training.run --config ... --data s3://... --output s3://...

PYoCo cascade stages train the same way: `--config training/configs/pyoco_{base,interp,sr}.yaml` (or the
`_demo` variants); the export records kind `pyoco_<stage>` for `training.sample --cascade`.

`--data` is the pipeline's output (dir or URI); `--output` is the run directory (checkpoints, exports,
TensorBoard). Running again with the same `--output` resumes from its latest checkpoint. With no cluster
(no RAY_ADDRESS) a local Ray is started.

RUN_DIR layout: `checkpoint_<step>/` (the last run.keep_last), `export/` (trainable.safetensors,
motion_adapter/, config.yaml), `tensorboard/`, `config.yaml`, `result.json`, `data_split/` (the validation
clips' own files and `split.json`, chosen once: `training/distributed/split.py`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

from pipeline.configlib import (
    ConfigError,
    add_config_args,
    config_args,
    from_dict,
    load_config,
    to_dict,
    to_json,
    to_yaml,
)
from pipeline.raysession import init_ray, recorded_path
from training.config import TrainConfig

log = logging.getLogger(__name__)


def split_output(output: str) -> tuple[str, str]:
    """RUN_DIR -> (Ray Train storage_path, run name): checkpoints land in RUN_DIR/checkpoint_*."""
    if "://" in output:
        parent, _, name = output.rstrip("/").rpartition("/")
        return parent, name
    path = Path(output).resolve()
    return str(path.parent), path.name


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The run's config: preset + overrides, with --data / --images / --output applied."""
    presets, overrides = config_args(args)
    paths = {}  # set as Python strings: a path such as runs/2024_01 is not a YAML scalar to re-read
    if args.data:
        paths["data.path"] = args.data
    if getattr(args, "images", None):
        paths["data.image_path"] = args.images
    if args.output:
        paths["run.storage_path"], paths["run.name"] = split_output(args.output)
    cfg = from_dict(TrainConfig, to_dict(load_config(TrainConfig, presets, overrides)), paths)
    if not cfg.run.storage_path or not cfg.run.name:
        raise ConfigError("no run directory: pass --output RUN_DIR (or set run.storage_path and run.name)")
    return cfg


def _ensure_base_model(cfg: TrainConfig) -> None:
    """Fail fast on a missing local base model, naming the field; hub ids resolve on the workers."""
    from pipeline.raysession import check_local_model

    check_local_model("model.pretrained", cfg.model.pretrained)
    path = Path(cfg.model.pretrained).expanduser()
    if path.exists() and not (path / (cfg.model.subfolder or "") / "config.json").is_file():
        raise FileNotFoundError(
            f"model.pretrained={cfg.model.pretrained}: no diffusers UNet config found there"
        )
    check_discrete_levels(cfg)


def check_discrete_levels(cfg: TrainConfig) -> None:
    """EDM kind 'sd21' feeds the frozen base the timestep whose sigma is nearest, on the levels of
    `diffusion.*`: they must be the base's own (SD 1.5 / 2.1 read sigma = 3 as 2.05 on 'linear' betas)."""
    if cfg.diffusion.objective != "edm" or cfg.edm.kind != "sd21":
        return
    from training.diffusion.samplers import base_scheduler_config, schedule_mismatch

    base = base_scheduler_config(cfg.model.pretrained, cfg.model.revision) if cfg.model.subfolder else None
    diff = schedule_mismatch(cfg.diffusion, base) if base is not None else {}
    if diff:
        fields = ", ".join(
            f"diffusion.{k}={mine!r} (the base: {theirs!r})" for k, (mine, theirs) in diff.items()
        )
        raise ConfigError(
            f"edm.kind=sd21 reads model.pretrained={cfg.model.pretrained} on its own discrete noise levels, but "
            f"{fields}; set them to the base's scheduler/scheduler_config.json"
        )


def absolute_paths(cfg: TrainConfig, record: bool = False) -> TrainConfig:
    """Local paths made absolute: Ray Train workers do not run in the driver's working directory.

    With `record` (the config written into the run and its export), a path inside a Ray job's temporary
    working dir stays as the user gave it (`pipeline.raysession.recorded_path`)."""
    for section, name in (
        ("model", "pretrained"),
        ("data", "path"),
        ("data", "image_path"),
        ("run", "resume_from"),
    ):
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        if value and "://" not in value and Path(value).expanduser().exists():
            setattr(obj, name, recorded_path(value) if record else str(Path(value).expanduser().resolve()))
    return cfg


def export_kind(cfg: TrainConfig, kind: str | None = None) -> str:
    """The kind recorded with the export: pyoco_<stage> for a cascade stage, else `kind` (default harivo)."""
    if cfg.cascade.stage == "none":
        return kind or "harivo"
    from training.diffusion.cascade import stage_kind

    expected = stage_kind(cfg.cascade.stage)
    if kind is not None and kind != expected:
        raise ValueError(f"kind={kind!r} contradicts cascade.stage={cfg.cascade.stage} (kind {expected!r})")
    return expected


def build_trainer(
    cfg: TrainConfig, kind: str = "harivo", callbacks: list | None = None, recorded: TrainConfig | None = None
):
    """The TorchTrainer for `cfg` (the data store is checked first: a mismatch fails before any worker starts);
    `recorded` is the config the export records (`absolute_paths(..., record=True)`; default `cfg`)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from training.distributed.data import build_datasets, inspect_image_store, inspect_store
    from training.distributed.split import choose_split, validation_clips
    from training.distributed.worker import WorkerConfig, train_fn_per_worker

    info = inspect_store(cfg)
    image_info = inspect_image_store(cfg, info)
    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    local = "://" not in run_dir
    # Once per run (a resume reuses it); the validation files hold only the clips a validation reads.
    val_clips = validation_clips(cfg.data.val_batches, cfg.optim.batch_size, cfg.run.num_workers)
    split = choose_split(info, cfg.data.val_fraction, run_dir, val_clips)
    loop_config = WorkerConfig(
        cfg,
        info,
        split,
        image_info,
        export_dir=f"{run_dir}/export",
        kind=kind,
        recorded=to_dict(recorded) if recorded is not None else None,
        tensorboard_dir=f"{run_dir}/tensorboard" if local else None,
        fault_marker=f"{run_dir}/.fault_injected" if local and cfg.run.fail_at_step else None,
    ).to_loop_config()
    resources = {"CPU": cfg.run.cpus_per_worker, **cfg.run.resources_per_worker}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_last),
            callbacks=callbacks,  # e.g. Ray Tune's TuneReportCallback when a sweep runs this trainer
        ),
        datasets=build_datasets(cfg, image_info),  # joint training's images; the clips are read by each rank
        # preserve_order makes each worker's shard (and so a resumed run) deterministic.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    ), run_dir


def train(cfg: TrainConfig, kind: str | None = None, callbacks: list | None = None) -> dict:
    """Run training to `optim.max_steps` (resuming if the run exists); returns the final metrics and paths.

    `kind` is recorded in the export (so a stage checkpoint of the wrong kind can be refused); None means
    `pyoco_<stage>` for a cascade stage (cascade.stage) and "harivo" otherwise.
    `callbacks` are Ray Train callbacks (a Tune sweep passes its report callback)."""
    import ray
    import ray.data

    kind = export_kind(cfg, kind)
    _ensure_base_model(cfg)
    recorded = absolute_paths(copy.deepcopy(cfg), record=True)
    cfg = absolute_paths(cfg)
    # Ray Data logs every epoch's start at INFO (every few steps on a small store): warnings only.
    init_ray(env_vars={"RAY_DATA_LOG_LEVEL": "WARNING"}, log_to_driver=True)
    # The loop prints its own progress (step / total, loss, ETA); Ray Data's per-epoch bars would drown it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer, run_dir = build_trainer(cfg, kind, callbacks, recorded)
    if "://" not in run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text(to_yaml(recorded))
    result = trainer.fit()
    summary = {
        "run_dir": run_dir,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": f"{run_dir}/export",
        "tensorboard": f"{run_dir}/tensorboard",
        "metrics": result.metrics,
    }
    if "://" not in run_dir:
        (Path(run_dir) / "result.json").write_text(to_json(summary, indent=1, default=str))
    return summary


def no_space_message(exc: BaseException, cfg: TrainConfig) -> str:
    """One line for a run stopped by a full disk: what could not be written, and the checkpoint the same command
    resumes from (the latest Ray Train recorded: a checkpoint cut short by the full disk never is)."""
    import ray.train

    from pipeline.write import OutOfSpace, find_error

    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    found = find_error(exc, lambda e: isinstance(e, OutOfSpace))
    what = (
        str(found) if found is not None else f"out of space (no space left on device) writing under {run_dir}"
    )
    try:
        latest = ray.train.Result.from_path(run_dir).checkpoint
    except Exception:  # noqa: BLE001 - no checkpoint recorded yet (or none readable): said below
        latest = None
    if latest is None:
        return f"{what}; no checkpoint was completed: free space, then run the same command to start again"
    return f"{what}; the latest intact checkpoint is {latest.path}: free space, then run the same command to resume"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.split("\n\n")[0])
    add_config_args(p, default_preset=None)
    p.add_argument("--data", help="the pipeline's output dir or URI (sets data.path)")
    p.add_argument(
        "--images",
        help="an image store (pipeline output of image shards) for joint training (sets data.image_path)",
    )
    p.add_argument("--output", help="run directory or URI (sets run.storage_path and run.name)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve(args)
    except (ConfigError, ValueError) as exc:
        sys.exit(f"training.run: {exc}")
    if args.print_config:
        print(to_yaml(cfg))
        return
    from pipeline.write import out_of_space
    from training.distributed.data import LatentStoreError

    try:
        summary = train(cfg)
    except (LatentStoreError, FileNotFoundError, ConfigError) as exc:
        sys.exit(f"training.run: {exc}")
    except Exception as exc:
        if not out_of_space(exc):
            raise
        sys.exit(f"training.run: {no_space_message(exc, cfg)}")
    print("\n=== training.run finished")
    print(f"  run dir:     {summary['run_dir']}")
    print(f"  checkpoint:  {summary['checkpoint']}")
    print(f"  export:      {summary['export']}  (trainable.safetensors, motion_adapter/, config.yaml)")
    print(f"  tensorboard: tensorboard --logdir {summary['tensorboard']}")
    m = summary["metrics"] or {}
    if m:
        print(
            f"  final: step {m.get('step')} loss {m.get('loss', float('nan')):.4f} val_loss "
            f"{m.get('val_loss', float('nan')):.4f}"
        )


if __name__ == "__main__":
    main()
