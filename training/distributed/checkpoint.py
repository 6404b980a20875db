"""Training checkpoints: every rank's DeepSpeed shard + trainer state, written and read (resume).

A checkpoint directory, as Ray Train persists it under `storage_path/name/checkpoint_*`:

    deepspeed/                         every rank's ZeRO shard (no frozen base: exclude_frozen_parameters)
    rank{r}.pt                         rank r's noise generator state and L_DC negative queue
    trainer_state.json                 step, epoch, batches done in the epoch (rank 0)
    config.yaml                        the fully resolved TrainConfig (rank 0)

`save_checkpoint` / `restore` are what the loop calls; exports (the trained weights on their own, for
sampling) are written by `training/model/export.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch

from pipeline.configlib import to_yaml
from training.config import TrainConfig
from training.distributed import engine as ds
from training.distributed.progress import say

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainerState:
    """Where the loop is: optimiser steps done and the data position within the current epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    image_epoch: int = 0
    """Joint image-video training: passes over this rank's image shard, and batches drawn in the current one."""
    image_batches: int = 0


def write_rank_files(
    directory: Path,
    rank: int,
    state: TrainerState,
    generator: torch.Generator,
    objective: torch.nn.Module,
    cfg: TrainConfig,
) -> None:
    """The non-DeepSpeed part of a checkpoint for one rank (rank 0 also writes the shared files)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"generator": generator.get_state(), "objective": objective.state_dict()},
        directory / f"rank{rank}.pt",
    )
    if rank == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(asdict(state)))
        (directory / CONFIG_FILE).write_text(to_yaml(cfg))


def read_rank_files(
    directory: Path, rank: int, generator: torch.Generator, objective: torch.nn.Module
) -> TrainerState:
    """Restore one rank's generator and objective state; returns the shared trainer state."""
    state_file = directory / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{directory} is not a T2V-Ray training checkpoint (no {TRAINER_STATE})")
    rank_file = directory / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{directory} has no state for rank {rank}: it was written by fewer workers than run.num_workers"
        )
    saved = torch.load(rank_file, map_location="cpu", weights_only=False)
    generator.set_state(saved["generator"])
    objective.load_state_dict(saved["objective"])
    return TrainerState(**json.loads(state_file.read_text()))


def restore(engine, cfg: TrainConfig, rank: int, generator: torch.Generator, objective) -> TrainerState:
    """Resume from the run's latest checkpoint (same run name, or after a worker failure) or from
    `run.resume_from`: this rank's DeepSpeed shard, generator and objective state. A new run starts at 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.run.resume_from:
        checkpoint = ray.train.Checkpoint(cfg.run.resume_from)
    if checkpoint is None:
        return TrainerState()
    with checkpoint.as_directory() as directory:
        ds.load_shard(engine, directory)
        state = read_rank_files(Path(directory), rank, generator, objective)
    if rank == 0:
        say(f"resumed from {checkpoint.path} at step {state.step} (epoch {state.epoch})")
    return state


def save_checkpoint(
    engine,
    state: TrainerState,
    generator: torch.Generator,
    objective,
    cfg: TrainConfig,
    rank: int,
    metrics: dict,
) -> None:
    """Report `metrics` with a checkpoint of step `state.step`.

    Every rank writes its own DeepSpeed shard into its own temp dir; Ray Train merges them into one
    checkpoint directory in storage (ray #33369: rank-0-only saving loses the other shards)."""
    directory = Path(tempfile.mkdtemp(prefix="t2v-ckpt-"))
    try:
        ds.save_shard(engine, directory)
        write_rank_files(directory, rank, state, generator, objective, cfg)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=f"checkpoint_{state.step:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
