"""The two trial functions Ray Tune runs, and how a trial's config is built.

A trial's config is the sweep's base trial config (preset + fixed + budget overrides, resolved once on
the driver into a plain nested dict) with the sampled values set at their dotted keys, re-validated by
`pipeline.configlib.from_dict`: the same types and checks as `load_config`.

- `train_trial`: one Ray Train run of `training.run.train` (Train V2 pattern: the Tune trial is only the
  driver of the Train run and reserves ~0 CPU; its workers reserve theirs). The workers' reports reach
  Tune through `TuneReportCallback`, filtered to those carrying the metric (validation loss is only
  computed every run.val_every steps), so ASHA sees one result per validation, indexed by `step`.
  With `evaluation` (metrics of generated videos), the trial then samples its final weights on the fixed
  prompt set and seeds in a Ray task and reports those scores once, with the last val_loss beside them.
- `sampling_trial`: `training.evaluate.evaluate` of the fixed checkpoint on the fixed prompt set with
  fixed seeds; reports the evaluation metrics once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.configlib import from_dict
from pipeline.raysession import LOCAL_DIR

log = logging.getLogger(__name__)


def trial_config(schema: type, base_tree: Mapping[str, Any], params: Mapping[str, Any]):
    """`schema` instance of `base_tree` with `params` ({"noise.alpha": 1.0, ...}) merged as dotted overrides
    by the one config path (`pipeline.configlib`), validated."""
    return from_dict(schema, base_tree, params)


def absolute_paths(tree: dict) -> dict:
    """String leaves that are relative paths existing here, made absolute (in place; returns `tree`).

    Tune runs trials in their trial directory (RAY_CHDIR_TO_TRIAL_DIR), so a preset's `runs/tiny-zoo/sd`
    must be resolved on the driver."""
    for key, value in tree.items():
        if isinstance(value, dict):
            absolute_paths(value)
        elif isinstance(value, str) and value and "://" not in value:
            prefix = LOCAL_DIR if value.startswith(LOCAL_DIR) else ""
            path = Path(value[len(prefix) :]).expanduser()
            if not path.is_absolute() and path.exists():
                tree[key] = prefix + str(path.resolve())
    return tree


def _leave_trial_dir() -> None:
    """Back to the worker's original working directory (the job's working_dir on a cluster).

    Tune chdirs a trial into its trial directory; a checkpoint's recorded relative paths (e.g. a base
    model at runs/tiny-zoo/sd) are relative to the project, and every output here is an absolute path."""
    orig = os.environ.get("TUNE_ORIG_WORKING_DIR")
    if orig and Path(orig).is_dir():
        os.chdir(orig)


def _report_callback(metric: str):
    """Ray Train callback forwarding to Tune only the worker reports that carry `metric`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            # Tune refuses results without the metric its scheduler / searcher watches; train-loss-only
            # reports stay in the run's own TensorBoard.
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback()


def train_trial(
    config: dict, *, base_tree: dict, metric: str, train_storage: str, evaluation: dict | None = None
) -> None:
    """Tune function trainable: train `base_tree` + `config` with Ray Train to optim.max_steps; with
    `evaluation`, then sample the final weights on its fixed prompts and seeds and report the scores.

    The Train run is `train_storage/<trial_id>`: stable across `Tuner.restore`, so a resumed trial
    continues that run from its latest checkpoint instead of starting over. The evaluation's videos and
    report.json are kept in the run, under `samples/`."""
    import ray.tune

    from training.config import TrainConfig
    from training.run import train

    _leave_trial_dir()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(
        TrainConfig, base_tree, {**config, "run.storage_path": train_storage, "run.name": trial_id}
    )
    result = train(cfg, callbacks=[_report_callback(metric)])
    if evaluation is None:
        return
    final = result.get("metrics") or {}
    scores = evaluate_run(f"{train_storage}/{trial_id}", evaluation)
    # One result after the training's: the videos' scores, with the run's last validation loss beside them.
    carried = {k: final[k] for k in ("val_loss", "loss") if isinstance(final.get(k), (int, float))}
    ray.tune.report({**carried, **scores, "step": cfg.optim.max_steps})


def evaluate_run(run_dir: str, evaluation: dict) -> dict:
    """Sample and score a finished Train run's export in a Ray task holding `evaluation`'s CPUs / GPUs
    (on this node when it has them); returns the flat scores. A run on object storage is read locally."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    task = ray.remote(_evaluate_export).options(
        num_cpus=evaluation["cpus"], num_gpus=evaluation["gpus"], scheduling_strategy=here
    )
    return ray.get(task.remote(run_dir, evaluation["tree"], evaluation["prompts"]))


def _evaluate_export(run_dir: str, tree: dict, prompts: list[str]) -> dict:
    import tempfile

    import ray
    import torch

    from training.evaluate import evaluate
    from training.sampling.config import SampleConfig

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    cfg = trial_config(SampleConfig, tree, {})
    if "://" not in run_dir:
        report = evaluate(run_dir, prompts, Path(run_dir) / "samples", cfg)
    else:  # the export is small: copy it here; the videos and report go back next to it
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            pafs.copy_files(f"{run_dir}/export", f"{tmp}/export")
            report = evaluate(f"{tmp}/export", prompts, Path(tmp) / "samples", cfg)
            pafs.copy_files(f"{tmp}/samples", f"{run_dir}/samples")
    return {**report["metrics"], "num_videos": report["num_videos"], "eval_seconds": report["seconds"]}


def sampling_trial(config: dict, *, base_tree: dict, checkpoint: str, prompts: list[str]) -> None:
    """Tune function trainable: generate `prompts` from `checkpoint` under `base_tree` + `config`, score them.

    Videos, latents and report.json go to the trial directory (samples/)."""
    import ray.tune
    import torch

    from training.evaluate import evaluate
    from training.sampling.config import SampleConfig

    _leave_trial_dir()
    cfg = trial_config(SampleConfig, base_tree, config)
    # The trial holds `resources.cpu` CPUs: keep torch's thread pool inside them.
    cpus = ray.tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    out = Path(ray.tune.get_context().get_trial_dir()) / "samples"
    report = evaluate(checkpoint, prompts, out, cfg)
    ray.tune.report({**report["metrics"], "num_videos": report["num_videos"], "seconds": report["seconds"]})
