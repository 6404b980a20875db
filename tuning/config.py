"""Config of a sweep (`python -m tuning.run`): what is searched, how, and where results go.

A sweep is a YAML preset of this `SweepConfig`. Its `space` maps dotted keys of the *trial* config
(`training.config.TrainConfig` for kind 'train', `training.sampling.config.SampleConfig` for kind
'sampling') to distributions; a trial is the base preset plus `fixed` plus `budget` plus the sampled
values, merged by the one config path every CLI uses (`pipeline.configlib.load_config`):

    kind: train
    base: training/configs/demo.yaml
    budget: {optim.max_steps: 4}
    space:
      noise.alpha: {grid: [0.0, 1.0]}
    metric: val_loss
    mode: min

Load with `load_config(SweepConfig, "tuning/configs/demo_train.yaml", ["search.num_samples=4"])`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.configlib import RangeTable, above, at_least

TRAIN_METRICS = ("val_loss", "loss", "loss_simple", "loss_reg", "loss_trs", "loss_dc")
"""Metrics a training trial reports with its validation loss (training/distributed/worker.py)."""
SAMPLING_METRICS = (
    "clipsim",
    "frame_consistency",
    "latent_flicker",
    "fvd",
    "motion_accuracy",
    "attribute_accuracy",
    "shape_accuracy",
    "colour_accuracy",
    "background_accuracy",
    "domain_fvd",
    "domain_fid",
)
"""Metrics of generated videos (`training.evaluate.evaluate`): what a sampling trial reports, and a
training trial too when it ends with `evaluation` (the domain ones need `eval.domain_evaluator`)."""
DOMAIN_METRICS = SAMPLING_METRICS[4:]


@dataclass
class SearchConfig:
    """The search algorithm and how many trials it runs at once."""

    RANGES: RangeTable = {
        "num_samples": at_least(1),
        "max_concurrent_trials": at_least(0),
        "seed": at_least(0),
    }

    algorithm: Literal["random", "grid", "optuna"] = "random"
    """'random' (Tune's BasicVariantGenerator: grid entries are crossed, the rest sampled), 'grid' (every
    entry must be `grid` or `choice`; the full cross product) or 'optuna' (TPE via Ray Tune's OptunaSearch)."""
    num_samples: int = 1
    """Trials to sample; with grid entries, the grid is repeated this many times ('grid': keep 1)."""
    max_concurrent_trials: int = 0
    """Trials running at once (0: as many as the cluster's resources hold, see tuning/run.py)."""
    seed: int = 0
    """Seed of the search algorithm: the same seed proposes the same trials."""
    scope: Literal["last", "all"] = "last"
    """Rank trials by their last reported metric or by their best one over the trial."""


@dataclass
class SchedulerConfig:
    """Early stopping of weak trials (training sweeps only: a sampling trial reports once)."""

    RANGES: RangeTable = {"grace_period": at_least(1), "reduction_factor": above(1), "max_t": at_least(1)}

    kind: Literal["auto", "asha", "fifo"] = "auto"
    """'asha' (AsyncHyperBand on the metric), 'fifo' (run every trial to the end); 'auto': asha for train."""
    time_attr: str = "step"
    """Result field measuring progress (training trials report the optimiser `step`)."""
    grace_period: int = 1
    """ASHA: no trial is stopped before this many `time_attr` units (optimiser steps)."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    max_t: int | None = None
    """ASHA: the last rung (None: the trial's optim.max_steps)."""


@dataclass
class ResourcesConfig:
    """What one trial reserves. Training trials' workers reserve theirs through the trial's `run.*`."""

    RANGES: RangeTable = {"cpu": at_least(0), "gpu": at_least(0)}

    cpu: float | None = None
    """CPUs of the trial process (None: 0.01 for train, a driver whose Ray Train workers hold the CPUs;
    1 for sampling). Tune needs a non-empty reservation: use a small fraction, not 0."""
    gpu: float = 0.0
    """GPUs of a sampling trial; fractions (0.25) pack several trials on one GPU. Train trials use run.use_gpu."""
    custom: dict[str, float] = field(default_factory=dict)
    """Custom resources per trial, e.g. {sweep_driver: 0.01} to keep trial drivers off spot nodes."""


@dataclass
class SamplingTrialConfig:
    """The fixed prompt set and checkpoint every sampling trial scores."""

    checkpoint: str | None = None
    """Run dir / export dir / trainable.safetensors of the fixed checkpoint. Set by `--checkpoint`."""
    prompts: str = "training/prompts/harivo_a3.txt"
    """Prompt file (one per line); every trial uses the same prompts and seeds (output.seed)."""


@dataclass
class TrialEvaluationConfig:
    """Training sweeps: every trial ends by sampling its final weights on one fixed prompt set with fixed
    seeds and scoring the videos (`training.evaluate`), so trials can be ranked by what they generate."""

    RANGES: RangeTable = {"cpus": above(0), "gpus": at_least(0)}

    prompts: str | None = None
    """Prompt file (one per line); None: no evaluation (the metric must then be a training one)."""
    config: str | None = None
    """Sampling preset of the evaluation (e.g. training/configs/sample_shapes.yaml; None: the defaults)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides of that preset (eval.domain_evaluator, eval.reference, output.videos_per_prompt, ...)."""
    cpus: float = 1.0
    """CPUs of the evaluation task (it runs once the trial's Ray Train workers have finished)."""
    gpus: float = 0.0
    """GPUs of the evaluation task."""


@dataclass
class OutputConfig:
    """Where the sweep lives and what it writes besides Tune's own files."""

    dir: str | None = None
    """Sweep directory: best.yaml, trials.csv/json, objective.png; Tune's experiment in DIR/tune. Set by `--output`."""
    storage_path: str | None = None
    """Tune storage (local dir or s3:// / gs:// URI; None: the sweep dir). Trial logs + TensorBoard live here."""
    name: str = "tune"
    """Experiment name under storage_path (`Tuner.restore` finds it there)."""
    plot: bool = True
    """Write objective.png: the metric against each searched parameter."""
    mlflow: bool = True
    """Log trials to MLflow (tracking URI from MLFLOW_TRACKING_URI, else DIR/mlruns) when mlflow is installed."""
    wandb: bool = True
    """Log trials to W&B when wandb is installed and WANDB_API_KEY or WANDB_MODE is set."""
    wandb_project: str = "t2v-ray"
    """W&B project of the sweep."""


@dataclass
class SweepConfig:
    """A Ray Tune sweep over training runs (kind 'train') or over sampling of one checkpoint ('sampling')."""

    RANGES: RangeTable = {"max_failures": at_least(0), "time_budget_s": above(0)}

    kind: Literal["train", "sampling"] = "train"
    """'train': each trial is a Ray Train run, scored on validation loss or (with `evaluation`) on the videos
    its final weights generate; 'sampling': each trial generates
    the fixed prompt set from `sampling.checkpoint` and is scored by `training.evaluate`."""
    base: str | None = None
    """Preset of the trial config (e.g. training/configs/demo.yaml); None: the trial config's defaults."""
    data: str | None = None
    """Training trials: the pipeline's output dir or URI (the trials' data.path). Set by `--data`."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides for every trial that are also part of best.yaml (e.g. {model.pretrained: ...})."""
    budget: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides for every trial that keep a sweep cheap (optim.max_steps, sampler.steps, ...);
    left out of best.yaml so the winning preset trains / samples at full length."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted key -> distribution: {uniform|loguniform: [lo, hi]}, {quniform|qloguniform: [lo, hi, q]},
    {randint: [lo, hi)}, {choice: [...]}, {grid: [...]}. See tuning/space.py."""
    metric: str = "val_loss"
    """Objective: a training metric (val_loss) or a sampling one (clipsim, frame_consistency, ...)."""
    mode: Literal["min", "max"] = "min"
    """Minimise or maximise `metric`."""
    max_failures: int = 0
    """Retries of a trial that raised (e.g. a worker OOM) before it is recorded as errored."""
    resume_errored: Literal["resume", "restart", "skip"] = "resume"
    """On `--resume`: errored trials resume from their last checkpoint, restart from scratch, or stay errored."""
    time_budget_s: float | None = None
    """Stop the whole sweep after this many seconds (None: no limit)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    sampling: SamplingTrialConfig = field(default_factory=SamplingTrialConfig)
    evaluation: TrialEvaluationConfig = field(default_factory=TrialEvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        """Checks that need no trial config; raises ValueError naming the field and its value."""
        evaluated = self.kind == "train" and self.evaluation.prompts is not None
        known = (
            SAMPLING_METRICS
            if self.kind == "sampling"
            else TRAIN_METRICS + (SAMPLING_METRICS if evaluated else ())
        )
        if self.metric not in known:
            hint = " (metrics of generated videos need evaluation.prompts)" if self.kind == "train" else ""
            raise ValueError(
                f"metric={self.metric!r} is not reported by {self.kind} trials: one of {known}{hint}"
            )
        if self.kind == "train" and self.metric in SAMPLING_METRICS and self.scheduler.kind == "asha":
            raise ValueError(
                f"metric={self.metric} comes once, from the final evaluation: ASHA would never stop a trial; "
                "use scheduler.kind=fifo"
            )
        if not self.space:
            raise ValueError("space is empty: give at least one dotted key to search")
        if self.kind == "sampling" and self.scheduler.kind == "asha":
            raise ValueError("scheduler.kind=asha needs intermediate results; sampling trials report once")
        r = self.resources
        if r.cpu == 0 and not r.gpu and not any(r.custom.values()):
            raise ValueError(
                "resources.cpu=0 with no gpu/custom resource: Tune needs a non-empty trial; use 0.01"
            )

    def trial_cpus(self) -> float:
        """CPUs the trial process itself reserves."""
        if self.resources.cpu is not None:
            return self.resources.cpu
        return 0.01 if self.kind == "train" else 1.0
