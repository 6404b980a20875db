"""Checkpoints (every rank's DeepSpeed shard + trainer state) and exports (trained weights on their own).

A checkpoint directory, as Ray Train persists it under `storage_path/name/checkpoint_*`:

    deepspeed/                         every rank's ZeRO shard (no frozen base: exclude_frozen_parameters)
    rank{r}.pt                         rank r's noise generator state and L_DC negative queue
    trainer_state.json                 step, epoch, batches done in the epoch (rank 0)
    config.yaml                        the fully resolved TrainConfig (rank 0)

An export directory (`RUN_DIR/export/`):

    trainable.safetensors              temporal layers + HARIVO modules, config in the file metadata
    config.yaml                        the resolved TrainConfig (base model id, noise schedule, ...)
    motion_adapter/                    the temporal layers as a diffusers MotionAdapter (AnimateDiffPipeline)
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch
from safetensors.torch import save_file

from pipeline.config import to_yaml
from training.config import TrainConfig

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
TRAINABLE_FILE = "trainable.safetensors"
MOTION_ADAPTER_DIR = "motion_adapter"
KIND_METADATA = "t2v.kind"


@dataclass
class TrainerState:
    """Where the loop is: optimiser steps done and the data position within the current epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


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


def export_weights(
    state_dict: dict[str, torch.Tensor],
    motion_adapter_config: dict,
    cfg: TrainConfig,
    destination: str,
    kind: str = "harivo",
) -> str:
    """Write the trained weights, their config and a diffusers MotionAdapter to `destination` (dir or URI).

    `kind` names the model stage (e.g. "harivo", "pyoco_base") so a checkpoint of the wrong kind can be
    refused when loaded.
    """
    from diffusers import MotionAdapter

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        metadata = {"t2v.config": to_yaml(cfg), KIND_METADATA: kind, "format": "pt"}
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()}, str(out / TRAINABLE_FILE), metadata=metadata
        )
        (out / CONFIG_FILE).write_text(to_yaml(cfg))
        adapter_state = {
            k[len("motion_adapter.") :]: v for k, v in state_dict.items() if k.startswith("motion_adapter.")
        }
        if adapter_state:
            adapter = MotionAdapter.from_config(motion_adapter_config)
            adapter.load_state_dict(adapter_state)
            adapter.save_pretrained(out / MOTION_ADAPTER_DIR)
        copy_tree(out, destination)
    return destination


def copy_tree(source: Path, destination: str) -> None:
    """Copy a local directory to a local path or a URI (s3://, gs://), replacing what was there."""
    if "://" in destination:
        fs, path = pafs.FileSystem.from_uri(destination)
        pafs.copy_files(str(source), path, destination_filesystem=fs)
        return
    dest = Path(destination)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # readers see the old export or the new one, never half of one
