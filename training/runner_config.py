"""Config sections of the runner: optimiser, data feed, DeepSpeed and Ray Train (`TrainConfig`'s last four).

They say how a run is fed, distributed and kept; `training/config.py` holds the model and its objectives and
imports these into `TrainConfig`. Loaded with the rest through `pipeline.configlib.load_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.configlib import RangeTable, above, at_least, between


@dataclass
class OptimConfig:
    """AdamW on the trainable parameters only, linear warmup then cosine decay (HARIVO: 1e-4 -> 1e-5)."""

    RANGES: RangeTable = {
        "lr": above(0),
        "min_lr": at_least(0),
        "warmup_steps": at_least(0),
        "max_steps": at_least(1),
        "batch_size": at_least(1),
        "grad_accum": at_least(1),
        "grad_clip": at_least(0),
        "spatial_lr": above(0),
        "weight_decay": at_least(0),
        "eps": above(0),
        "max_nonfinite_steps": at_least(0),
    }

    lr: float = 1e-4
    """Peak learning rate (HARIVO sec. 4: 1e-4)."""
    min_lr: float = 1e-5
    """Learning rate at `max_steps` after cosine decay (HARIVO sec. 4: 1e-5)."""
    warmup_steps: int = 500
    """Linear warmup from 0 to `lr` over this many optimiser steps."""
    max_steps: int = 100_000
    """Optimiser steps of the whole run (the schedule's length; training stops here)."""
    batch_size: int = 1
    """Clips per worker per micro-batch (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (DeepSpeed gradient_accumulation_steps)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    spatial_lr: float | None = None
    """Peak lr of model.trainable_spatial's base UNet parameters, on `lr`'s warmup and cosine; None: `lr`."""
    weight_decay: float = 0.01
    """AdamW weight decay (AnimateDiff: 0.01)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_nonfinite_steps: int = 0
    """Consecutive optimiser steps with a non-finite loss (mean over ranks) allowed before the run stops."""


@dataclass
class DataConfig:
    """The pipeline's Parquet latents (pipeline/schema.py): each worker reads its share of every epoch (rows.py)."""

    RANGES: RangeTable = {
        "frame_stride": at_least(1),
        "val_fraction": between(0, 1),
        "val_batches": at_least(1),
        "shuffle_buffer": at_least(0),
        "images_per_clip": at_least(0),
    }

    path: str | None = None
    """Pipeline output dir (its clips/ is read) or a clips dir; local path or URI. Set by `--data`."""
    view: str | None = None
    """Which pipeline view's latents to train on (None: the primary view)."""
    frame_stride: int = 1
    """Take every k-th stored latent frame (e.g. 5 turns 76 stored frames into PYoCo's 16 keyframes)."""
    random_start: bool = True
    """Random first frame when the stored clip is longer than needed (else start at frame 0)."""
    val_fraction: float = 0.1
    """Share of clips (chosen by a hash of the key, so stable across runs) held out of training for validation
    loss; the first val_batches x optim.batch_size x run.num_workers of them (what a validation reads) are
    copied once per run into their own files under RUN_DIR/data_split/, which every validation reads."""
    val_batches: int = 4
    """Validation batches per worker per evaluation (the same clips, fixed seeds and noise levels)."""
    shuffle_buffer: int = 64
    """Rows shuffled together: each epoch takes the row groups in a new random order, joined into windows of
    at least this many rows whose rows are shuffled (0: stored order, unshuffled)."""
    image_path: str | None = None
    """Image store for joint image-video training: `pipeline.run`'s output for image shards (jpg/png + txt; one
    latent frame per image), same VAE and resolution as data.path."""
    image_view: str | None = None
    """Which view of the image store (None: its primary view)."""
    images_per_clip: int = 0
    """Joint image-video training (PYoCo sec. 5): N images concatenated to every clip on the time axis. They share
    the clip's noise level, get i.i.d. noise and their own captions, and skip the temporal layers, the mapping
    network and the frame tokens; L_simple covers clip and images, L_reg / L_TRS / L_DC the clip only. Needs
    model.trainable_spatial (else nothing on the image path trains). 0: video only."""
    image_only: bool = False
    """Train an image model: data.path is an image store, every batch is single images in image mode (no temporal
    layers); needs model.num_frames=1 and model.trainable_spatial (with model.from_scratch: an image base from
    nothing). Only the UNet trains."""
    cache: Literal["auto", "always", "never"] = "auto"
    """Keep the image store (joint training) in Ray's object store after the first read ('auto': when its files
    total < 1 GiB), so later passes skip the Parquet read; large stores always stream. The clips are read by
    row group every epoch."""


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings; `training/distributed/engine.py` turns them into DeepSpeed's JSON config."""

    RANGES: RangeTable = {"zero_stage": between(0, 3)}

    zero_stage: int = 2
    """ZeRO stage 0 (plain DDP), 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 on GPU, fp32 on CPU."""
    offload_optimizer: bool = False
    """ZeRO-Offload the optimizer states to CPU memory (stage >= 1)."""


@dataclass
class RunConfig:
    """Ray Train: workers, storage, checkpoints, faults and logging."""

    RANGES: RangeTable = {
        "num_workers": at_least(1),
        "cpus_per_worker": above(0),
        "seed": at_least(0),
        "checkpoint_every": at_least(1),
        "keep_last": at_least(1),
        "max_failures": at_least(-1),
        "log_every": at_least(1),
        "grad_norm_every": at_least(0),
        "val_every": at_least(0),
        "fail_at_step": at_least(1),
    }

    name: str | None = None
    """Run name; checkpoints live under storage_path/name. Set by `--output` (its last path part)."""
    storage_path: str | None = None
    """Local dir or URI (s3://, gs://) holding runs. Set by `--output` (its parent)."""
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra custom resources per worker, e.g. {train_gpu: 1} to land on training nodes (cluster/resources.yaml)."""
    seed: int = 0
    """Seeds the identical initialisation on all ranks and (with the rank) each rank's noise stream."""
    checkpoint_every: int = 100
    """Optimiser steps between checkpoints (every rank saves its DeepSpeed shard)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted)."""
    resume_from: str | None = None
    """Explicit checkpoint dir to resume from; otherwise a run with the same name resumes its latest."""
    resizable_checkpoints: bool = True
    """ZeRO 1-2: each checkpoint also carries the trainable weights and AdamW moments whole, so that it resumes
    on another number of workers (`training/distributed/reshard.py`). It costs 3 x the trainable fp32 size on
    disk and in every rank's host memory while it is gathered (5.8 GB for SD 1.5's 487M trainable parameters);
    false: leave it out (the checkpoint then resumes only on the world size that wrote it)."""
    max_failures: int = 0
    """Worker crashes tolerated (-1: no limit); each restarts the workers from the last checkpoint."""
    log_every: int = 10
    """Steps between metric reports (ray.train.report + TensorBoard) and progress lines."""
    grad_norm_every: int = 0
    """Steps between measurements of each loss term's gradient norm on the trainable parameters (weighted as in
    L_all; rank 0's micro-batch; one extra backward per term on that step), printed on the progress line and
    written to TensorBoard as grad_<term>, so a term that dominates the update shows. 0: off. ZeRO stage <= 2."""
    val_every: int = 100
    """Steps between validation-loss evaluations (0: only at the end)."""
    fail_at_step: int | None = None
    """Fault injection for tests: rank 0 calls os._exit(1) once when it reaches this step."""
