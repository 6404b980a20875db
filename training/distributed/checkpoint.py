"""Training checkpoints: every rank's DeepSpeed shard + trainer state, written and read (resume).

A checkpoint directory, as Ray Train persists it under `storage_path/name/checkpoint_{step:08d}` (`_{n}`
appended when a resume skipped that name as unreadable, see `dir_name`):

    deepspeed/                         every rank's ZeRO shard (no frozen base: exclude_frozen_parameters)
    rank{r}.safetensors                rank r's noise generator state and L_DC negative queue
    trainer_state.json                 step, epoch, batches done in the epoch (and the epoch's positions left
                                       after a resize), image stream position, world size (rank 0)
    config.yaml                        the fully resolved TrainConfig (rank 0)
    full_state.safetensors             ZeRO 1-2: the trainable weights + AdamW moments whole, for resuming on
                                       another number of workers (rank 0; `reshard.py`)

Resuming unpickles no arbitrary object: rank files are safetensors, trainer state is JSON, DeepSpeed's
files are read with weights_only=True and an allow-list (`engine.read_shard_file`); older pickled
`rank{r}.pt` files are refused.
A run's latest checkpoint that cannot be read is skipped for the newest intact one of the run (the ranks
agree on which); an explicit `run.resume_from` that cannot be read is an error naming the file.

A checkpoint is the run's latest only once Ray Train has every rank's files in storage (it then records it in
the run's `checkpoint_manager_snapshot.json`, which a re-run resumes from). A save that runs out of space leaves
a partial `checkpoint_<step>/` that is never recorded, so never resumed from (the step's next save writes over
it), and stops the run with `OutOfSpace`, which `training.run` reports in one line.

`save_checkpoint` / `restore` are what the loop calls; exports (the trained weights on their own, for
sampling) are written by `training/model/export.py`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow.fs
import ray.train
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.configlib import to_yaml
from pipeline.write import OutOfSpace, out_of_space
from training.config import TrainConfig
from training.distributed import engine as ds
from training.distributed import reshard
from training.distributed.engine import CheckpointError
from training.distributed.progress import say

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
GENERATOR_KEY = "generator"
OBJECTIVE_PREFIX = "objective."
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d{8})(?:_(\d+))?$")
"""`checkpoint_{step:08d}`, with `_{n}` when a resume skipped that name as unreadable (`dir_name`)."""

_skipped_names: set[str] = set()
"""Checkpoint names this worker's resume skipped. Ray Train still tracks them: a new checkpoint reusing
one would be deleted with the old entry (num_to_keep), so `dir_name` steps around them."""


@dataclass
class TrainerState:
    """Where the loop is: optimiser steps done and the data position within the current epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    image_epoch: int = 0
    """Joint image-video training: passes over this rank's image shard, and batches drawn in the current one."""
    image_batches: int = 0
    world_size: int = 0
    """Workers of the run that wrote it; 0 (older checkpoints, which lack the field): this run's own."""
    epoch_positions: list[list[int]] | None = None
    """The positions of the epoch's order the ranks' shares are cut from, as ascending [start, stop) pairs,
    after a resume on another world size within this epoch (`reshard.resized_position`; [] when nothing was
    left); None (JSON null; older checkpoints lack the field): the whole epoch."""


OPTIONAL_FIELDS = {"world_size", "epoch_positions"}
"""Fields an older trainer_state.json may lack."""


def rank_file(directory: Path, rank: int) -> Path:
    """Rank `rank`'s generator + objective state: safetensors, which cannot carry code."""
    return directory / f"rank{rank}.safetensors"


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
    tensors = {GENERATOR_KEY: generator.get_state()}
    for key, value in objective.state_dict().items():
        tensors[OBJECTIVE_PREFIX + key] = value.detach().cpu().contiguous()
    save_file(tensors, str(rank_file(directory, rank)))
    if rank == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(asdict(state)))
        (directory / CONFIG_FILE).write_text(to_yaml(cfg))


def read_trainer_state(path: Path) -> TrainerState:
    """trainer_state.json: exactly TrainerState's fields, each a non-negative int (a damaged or edited
    file must not resume at step "abc" or -5)."""
    names = [f.name for f in fields(TrainerState)]
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected an object with fields {names}, got {raw!r}")
    unknown = sorted(raw.keys() - set(names))
    missing = [n for n in names if n not in raw and n not in OPTIONAL_FIELDS]
    if unknown or missing:
        raise CheckpointError(f"{path}: unknown fields {unknown}, missing fields {missing}")
    for name in raw.keys() - {"epoch_positions"}:
        if not natural(raw[name]):
            raise CheckpointError(f"{path}: field '{name}' must be a non-negative integer, got {raw[name]!r}")
    if raw.get("epoch_positions") is not None and not ascending_pairs(raw["epoch_positions"]):
        raise CheckpointError(
            f"{path}: field 'epoch_positions' must be null or ascending [start, stop) pairs of non-negative "
            f"integers, got {raw['epoch_positions']!r}"
        )
    return TrainerState(**raw)


def natural(value) -> bool:
    """Whether `value` is a non-negative int (not a bool)."""
    return type(value) is int and value >= 0  # bool is an int to isinstance


def ascending_pairs(value) -> bool:
    """Whether `value` is a list of [start, stop] pairs, each non-empty and after the one before."""
    if not isinstance(value, list):
        return False
    stop = 0
    for pair in value:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(map(natural, pair))
            and stop <= pair[0] < pair[1]
        ):
            return False
        stop = pair[1]
    return True


def read_rank_tensors(directory: Path, rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(generator state, objective state dict) of rank `rank`, read without unpickling anything."""
    path = rank_file(directory, rank)
    legacy = directory / f"rank{rank}.pt"
    if not path.is_file() and legacy.is_file():
        raise CheckpointError(
            f"{legacy} is a pickled rank file of an older T2V-Ray: refused (unpickling it could run code); "
            "resume from a checkpoint written by this version, or start the run anew"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no state for rank {rank}: it was written by fewer workers than run.num_workers"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {e}"
        ) from e
    generator = tensors.pop(GENERATOR_KEY, None)
    stray = sorted(k for k in tensors if not k.startswith(OBJECTIVE_PREFIX))
    if generator is None or generator.dtype != torch.uint8 or stray:
        raise CheckpointError(
            f"{path}: expected a uint8 '{GENERATOR_KEY}' and '{OBJECTIVE_PREFIX}*' tensors only"
        )
    return generator, {k[len(OBJECTIVE_PREFIX) :]: v for k, v in tensors.items()}


def read_rank_files(
    directory: Path,
    rank: int,
    generator: torch.Generator,
    objective: torch.nn.Module,
    source: int | None = None,
    seed: int | None = None,
) -> TrainerState:
    """Restore one rank's generator and objective state from rank `source`'s file (default `rank`'s); returns
    the shared trainer state. `seed`: seed the generator with it instead (a rank the checkpoint lacks).

    Every file is read and checked before anything is set: an unreadable one leaves both untouched."""
    source = rank if source is None else source
    state_file = directory / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{directory} is not a T2V-Ray training checkpoint (no {TRAINER_STATE})")
    state = read_trainer_state(state_file)
    generator_state, objective_state = read_rank_tensors(directory, source)
    try:
        objective.load_state_dict(objective_state)
        if seed is None:
            generator.set_state(generator_state)
        else:
            generator.manual_seed(seed)
    except RuntimeError as e:  # another queue size, or a CUDA generator's state on CPU
        raise CheckpointError(f"{rank_file(directory, source)} does not fit this run: {e}") from e
    return state


def check_checkpoint(directory: Path, rank: int, world: int = 1) -> None:
    """Read (not apply) everything rank `rank` of `world` would resume from `directory`; raises what is wrong."""
    if not (directory / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{directory} is not a T2V-Ray training checkpoint (no {TRAINER_STATE})")
    saved = saved_world(read_trainer_state(directory / TRAINER_STATE), world)
    read_rank_tensors(directory, rank % saved)
    ds.check_shard(directory, rank % saved)  # another world size: the shared model file (+ FULL_STATE)


def saved_world(state: TrainerState, world: int) -> int:
    """The world size that wrote `state` (a checkpoint that does not say: `world`, this run's)."""
    return state.world_size or world


def current_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def older_checkpoints(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's checkpoints before `latest` (its siblings `checkpoint_*` of a lower step), newest first."""
    match = CHECKPOINT_NAME.match(posixpath.basename(latest.path.rstrip("/")))
    if match is None:
        return []
    parent = posixpath.dirname(latest.path.rstrip("/"))
    found = []
    for info in latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent)):
        m = CHECKPOINT_NAME.match(info.base_name)
        if m and info.type == pyarrow.fs.FileType.Directory and int(m[1]) < int(match[1]):
            found.append(((int(m[1]), int(m[2] or 0)), info.path))
    return [ray.train.Checkpoint(p, latest.filesystem) for _, p in sorted(found, reverse=True)]


def resume(
    engine,
    checkpoint: ray.train.Checkpoint,
    rank: int,
    generator: torch.Generator,
    objective,
    fallback: bool,
    cfg: TrainConfig | None = None,
) -> tuple[ray.train.Checkpoint, TrainerState]:
    """Load `checkpoint` (or, with `fallback`, the newest intact one of its run): every rank reads its files
    first and all agree before any reaches the engine, so all resume from the same step. `cfg` is needed
    when the checkpoint's world size is not this run's (`reshard.py`)."""
    tried = [checkpoint, *older_checkpoints(checkpoint)] if fallback else [checkpoint]
    problems, world = [], current_world()
    for candidate in tried:
        with candidate.as_directory() as directory:
            problem = _problem(Path(directory), rank, world)
            if ds.all_ranks_ok(engine, problem is None):
                return candidate, _load(engine, Path(directory), rank, world, generator, objective, cfg)
        problem = problem or CheckpointError(f"{candidate.path} is unreadable on another rank (see its log)")
        if not fallback:
            raise problem
        _skipped_names.add(posixpath.basename(candidate.path.rstrip("/")))
        log.warning("rank %d: skipping checkpoint %s: %s", rank, candidate.path, problem)
        say(f"rank {rank}: skipped checkpoint {candidate.path}: {problem}")
        problems.append(f"{candidate.path}: {problem}")
    raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(problems))


def _problem(directory: Path, rank: int, world: int) -> Exception | None:
    """What keeps rank `rank` from resuming from `directory`, or None (only checkpoint errors count)."""
    try:
        check_checkpoint(directory, rank, world)
        saved = saved_world(read_trainer_state(directory / TRAINER_STATE), world)
        if saved != world and (directory / reshard.FULL_STATE).exists():
            reshard.read_full_state(directory)
    except (CheckpointError, FileNotFoundError) as e:
        return e
    return None


def _load(engine, directory: Path, rank: int, world: int, generator, objective, cfg) -> TrainerState:
    """Apply a checked checkpoint; on another world size as `reshard.py` says (the data position is moved by
    the loop, which knows the epoch's rows: `reshard.resized_position`)."""
    saved = saved_world(read_trainer_state(directory / TRAINER_STATE), world)
    if saved == world:
        ds.load_shard(engine, directory)
        return read_rank_files(directory, rank, generator, objective)
    if cfg is None:
        raise ValueError(f"{directory} was written by {saved} workers, this run has {world}: pass cfg")
    reshard.check_resized(directory, engine.zero_optimization_stage(), saved, world)  # ZeRO-3: refused
    reshard.load_resized(engine, directory)
    step = read_trainer_state(directory / TRAINER_STATE).step
    seed = None if rank < saved else reshard.fresh_generator_seed(cfg, rank, step)
    state = read_rank_files(directory, rank, generator, objective, source=rank % saved, seed=seed)
    state.image_batches = reshard.resized_image_batches(state.image_batches, saved, world)
    if rank == 0:
        say(
            f"resuming {directory.name} of {saved} workers on {world}: the rows of epoch {state.epoch} the "
            f"{saved} ranks had not trained on ({state.batches_in_epoch} micro-batches each done) are split "
            f"among the {world}"
        )
    return state  # the data position as `saved` ranks left it: `reshard.resized_position` moves it


def restore(engine, cfg: TrainConfig, rank: int, generator: torch.Generator, objective) -> TrainerState:
    """Resume from the run's latest checkpoint (same run name, or after a worker failure; an unreadable one
    falls back to the newest intact) or from `run.resume_from` (no fallback). A new run starts at 0."""
    latest = ray.train.get_checkpoint()
    if latest is None and not cfg.run.resume_from:
        return TrainerState()
    if latest is None:
        checkpoint, state = resume(
            engine, ray.train.Checkpoint(cfg.run.resume_from), rank, generator, objective, False, cfg
        )
    else:
        checkpoint, state = resume(engine, latest, rank, generator, objective, True, cfg)
    if rank == 0:
        say(f"resumed from {checkpoint.path} at step {state.step} (epoch {state.epoch})")
    return state


def dir_name(step: int) -> str:
    """`checkpoint_{step:08d}`, or with the first `_{n}` that no skipped (unreadable) checkpoint has."""
    name, n = f"checkpoint_{step:08d}", 0
    while (f"{name}_{n}" if n else name) in _skipped_names:
        n += 1
    return f"{name}_{n}" if n else name


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
    checkpoint directory in storage (ray #33369: rank-0-only saving loses the other shards). A full disk, here
    or in storage, raises `OutOfSpace` naming the step and where."""
    directory = Path(tempfile.mkdtemp(prefix="t2v-ckpt-"))
    name, local = dir_name(state.step), True
    try:
        ds.save_shard(engine, directory)
        if cfg.run.resizable_checkpoints:  # collective: every rank gathers, rank 0 writes
            reshard.write_full_state(engine, directory, rank)
        state.world_size = current_world()
        write_rank_files(directory, rank, state, generator, objective, cfg)
        local = False  # the files are whole; Ray Train copies them into the run's storage
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=name,
        )
    except Exception as exc:
        # torch.save on a full disk says only "unexpected pos": then the temp dir's free space tells.
        if not (out_of_space(exc) or (local and _disk_full(directory))):
            raise
        run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
        where = f"this worker's temp dir {directory}" if local else f"{run_dir}/{name}"
        raise OutOfSpace(
            f"out of space (no space left on device) writing the checkpoint of step {state.step} to {where} "
            f"(rank {rank})"
        ) from exc
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _disk_full(path: Path, margin: int = 2**20) -> bool:
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False
