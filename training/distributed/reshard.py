"""Resuming a checkpoint on another world size (N workers wrote it, M resume it; DeepSpeed #5405).

DeepSpeed's ZeRO 1-2 shards hold each rank's slice of the fp32 master weights and AdamW moments, cut for N
ranks, and `load_checkpoint` refuses them on M. So every ZeRO 1-2 checkpoint also carries `FULL_STATE`: the
trainable parameters' fp32 weights, `exp_avg`, `exp_avg_sq` and the optimiser step, whole (gathered by every
rank, written by rank 0; safetensors, no pickle). On M != N workers each rank loads the weights and the
schedule from DeepSpeed's shared model file, then cuts its own partition out of `FULL_STATE`. ZeRO-0 keeps
the whole optimiser in that shared file and needs nothing more; ZeRO-3 is refused, naming both sizes.

What else a rank resumes from, when the world size changed:

- the data position: the epoch's rows the old ranks had still to train, split among the new ones
  (`resized_position`, below; every rank computes the same);
- rank r < N continues its own noise stream and L_DC queue (`rank{r}.safetensors`); a new rank r >= N takes
  the L_DC queue of rank r mod N and a noise stream seeded by (run.seed, r, step), never one another rank
  drew from. The streams of ranks >= M of the old run end there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.config import TrainConfig
from training.distributed import engine as ds
from training.distributed import rows
from training.distributed.engine import CheckpointError

log = logging.getLogger(__name__)

FULL_STATE = "full_state.safetensors"
"""ZeRO 1-2: the trainable fp32 weights + AdamW moments + step, whole (rank 0), for another world size."""


def resized_position(state, world: int, total: int, batch_size: int) -> None:
    """The data position of `state` (a `TrainerState` checkpointed by `state.world_size` ranks) for `world`
    ranks, in place: nothing to do on the same world size (or one a checkpoint does not record).

    The old ranks trained the first `batches_in_epoch` micro-batches (of `batch_size` rows) of their shares of
    `epoch_positions` (the whole epoch's `total` rows when None); what is left of every share becomes the new
    `epoch_positions`, which the `world` ranks split from micro-batch 0 on (`rows.rank_positions`): every clip
    still to come this epoch comes once, none trained twice, and the new ranks start on a step boundary.
    Shares are equal and in whole batches, so fewer than `world` batches' rows of it are left out, as an
    epoch's last rows are (`rows.rank_span`). A second resize in the epoch starts from these positions; the
    next epoch is whole again."""
    stop = max((b for _, b in state.epoch_positions or ()), default=0)
    if stop > total:  # written for a larger training split: indexing this one's order would miss or fail
        raise CheckpointError(
            f"the checkpoint's data position holds the epoch's rows up to {stop}, but this run's training split "
            f"has {total} rows: it was written on other data (data.path, data.val_fraction); resume it on its "
            "own, or start the run without run.resume_from"
        )
    if not state.world_size or state.world_size == world:
        return
    state.epoch_positions = rows.remaining_positions(
        total, state.world_size, batch_size, state.batches_in_epoch, state.epoch_positions
    )
    state.batches_in_epoch, state.world_size = 0, world


def resized_image_batches(image_batches: int, saved_world: int, world: int) -> int:
    """Joint training's image stream (Ray Data's shards of the image store, not the epoch's order above): the
    image batches drawn in the current pass, all ranks together, shared among the new ones."""
    return image_batches * saved_world // world


def write_full_state(engine, directory: Path, rank: int) -> None:
    """Every rank calls this (the gather is collective); rank 0 writes `FULL_STATE`. ZeRO 1-2 only."""
    if engine.zero_optimization_stage() not in (1, 2):
        return
    if not ds.moments_ready(engine):
        if rank == 0:
            log.warning(
                "checkpoint without %s (a parameter group has not stepped yet): it resumes only on %d workers",
                FULL_STATE,
                dist.get_world_size() if dist.is_initialized() else 1,
            )
        return
    tensors = ds.full_state(engine)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / FULL_STATE))


def check_resized(directory: Path, stage: int, saved_world: int, world: int) -> None:
    """Refuse what cannot resume on another world size (before any rank loads anything)."""
    if stage == 3:
        raise CheckpointError(
            f"{directory} was written by {saved_world} workers and this run has {world}: ZeRO-3 checkpoints "
            f"resume only on the world size that wrote them; run with run.num_workers={saved_world}"
        )
    if stage in (1, 2):
        read_full_state(directory)


def read_full_state(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / FULL_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {FULL_STATE}: it was written before resuming on another world size was "
            "supported; resume it with the world size that wrote it (run.num_workers)"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {e}"
        ) from e


def load_resized(engine, directory: Path) -> None:
    """This rank's weights, optimiser state and schedule from a checkpoint of another world size."""
    stage = engine.zero_optimization_stage()
    if stage == 0:  # the whole optimiser is in the shared model file
        ds.load_shard(engine, directory)
        return
    full = read_full_state(directory)
    ds.load_shard(engine, directory, optimizer_states=False)
    ds.load_full_state(engine, full)


def fresh_generator_seed(cfg: TrainConfig, rank: int, step: int) -> int:
    """A rank that did not exist when the checkpoint was written: a stream of its own for this resume."""
    return (cfg.run.seed * 1_000_003 + rank) * 7_919 + step
