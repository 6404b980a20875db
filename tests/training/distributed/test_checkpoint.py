"""The non-DeepSpeed part of a training checkpoint (`training/distributed/checkpoint.py`): what each rank
writes and reads back on resume. No Ray Train here (`restore` / `save_checkpoint` are run by the runner tests)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.configlib import load_config
from training.config import TrainConfig
from training.diffusion.objective import HarivoObjective
from training.distributed.checkpoint import (
    CONFIG_FILE,
    TRAINER_STATE,
    CheckpointError,
    TrainerState,
    read_rank_files,
    write_rank_files,
)

HSPACE = 8


def config(**overrides) -> TrainConfig:
    return load_config(TrainConfig, None, {"loss.queue_size": 16, "model.num_frames": 4, **overrides})


def trained_objective(cfg: TrainConfig, seed: int) -> HarivoObjective:
    """An objective whose L_DC queue holds a few (seeded) pushes, as after some training steps."""
    objective = HarivoObjective(cfg, HSPACE)
    g = torch.Generator().manual_seed(seed)
    for n in (5, 7, 9):  # 21 items into a 16-slot queue: it wrapped around
        objective.queue.push(torch.randn(n, HSPACE, generator=g))
    return objective


def used_generator(seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    torch.randn(100, generator=g)  # mid-stream, not at a seed boundary
    return g


def test_rank_files_round_trip(tmp_path):
    cfg = config()
    state = TrainerState(step=1234, epoch=3, batches_in_epoch=17)
    generator, objective = used_generator(7), trained_objective(cfg, seed=1)
    saved = {k: v.clone() for k, v in objective.state_dict().items()}
    assert {"queue.items", "queue.ptr", "queue.count"} <= saved.keys()
    assert int(saved["queue.count"]) == 16 and int(saved["queue.ptr"]) == 21 % 16

    write_rank_files(tmp_path / "ckpt", 0, state, generator, objective, cfg)
    after_original = torch.rand(5, generator=generator)

    fresh_generator = torch.Generator().manual_seed(999)
    fresh = HarivoObjective(cfg, HSPACE)
    assert not torch.equal(fresh.state_dict()["queue.items"], saved["queue.items"])
    restored = read_rank_files(tmp_path / "ckpt", 0, fresh_generator, fresh)

    assert restored == state
    # The noise stream continues where it was saved: the next draws are the ones the run would have made.
    assert torch.equal(torch.rand(5, generator=fresh_generator), after_original)
    got = fresh.state_dict()
    assert got.keys() == saved.keys()
    for key in saved:
        assert torch.equal(got[key], saved[key]) and got[key].dtype == saved[key].dtype, key
    # The restored queue behaves as the original from here on.
    z = torch.randn(3, HSPACE, generator=torch.Generator().manual_seed(5))
    objective.queue.push(z)
    fresh.queue.push(z)
    assert torch.equal(fresh.queue.negatives(), objective.queue.negatives())


def test_rank_zero_writes_the_shared_files(tmp_path):
    cfg = config(**{"optim.lr": 3e-5, "data.frame_stride": 2})
    state = TrainerState(step=6, epoch=1, batches_in_epoch=2)
    objective = trained_objective(cfg, 0)
    write_rank_files(tmp_path / "r1", 1, state, used_generator(1), objective, cfg)
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["rank1.safetensors"]
    write_rank_files(tmp_path / "r0", 0, state, used_generator(0), objective, cfg)
    assert sorted(p.name for p in (tmp_path / "r0").iterdir()) == sorted(
        ["rank0.safetensors", TRAINER_STATE, CONFIG_FILE]
    )
    # Tensors only, no pickle: the generator's state and the objective's state dict.
    assert load_file(tmp_path / "r0" / "rank0.safetensors").keys() == {"generator"} | {
        f"objective.{k}" for k in objective.state_dict()
    }
    assert json.loads((tmp_path / "r0" / TRAINER_STATE).read_text()) == {
        "step": 6,
        "epoch": 1,
        "batches_in_epoch": 2,
        "image_epoch": 0,  # joint training's image stream position (data.images_per_clip)
        "image_batches": 0,
        "world_size": 0,  # set by save_checkpoint to the run's workers; 0: not recorded
        "epoch_positions": None,  # the whole epoch; after a resize, the rows the old ranks had left
    }
    assert load_config(TrainConfig, tmp_path / "r0" / CONFIG_FILE) == cfg  # the resolved config, reloadable


def test_each_rank_gets_its_own_state_back(tmp_path):
    cfg = config()
    state = TrainerState(step=10)
    directory = tmp_path / "ckpt"
    nexts = {}
    for rank in range(3):  # ranks write into one directory, as Ray Train merges them
        g = used_generator(100 + rank)
        write_rank_files(directory, rank, state, g, trained_objective(cfg, rank), cfg)
        nexts[rank] = torch.rand(4, generator=g)
    for rank in (2, 0, 1):
        g, objective = torch.Generator(), HarivoObjective(cfg, HSPACE)
        assert read_rank_files(directory, rank, g, objective) == state
        assert torch.equal(torch.rand(4, generator=g), nexts[rank])
        assert torch.equal(objective.queue.items, trained_objective(cfg, rank).queue.items)


def test_missing_trainer_state_is_a_clear_error(tmp_path):
    cfg = config()
    write_rank_files(
        tmp_path / "ckpt", 1, TrainerState(step=3), used_generator(0), trained_objective(cfg, 0), cfg
    )
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    with pytest.raises(
        FileNotFoundError, match=f"is not a T2V-Ray training checkpoint \\(no {TRAINER_STATE}\\)"
    ):
        read_rank_files(tmp_path / "ckpt", 1, g, HarivoObjective(cfg, HSPACE))
    assert torch.equal(g.get_state(), before)  # nothing half-restored
    with pytest.raises(FileNotFoundError, match="not a T2V-Ray training checkpoint"):
        read_rank_files(tmp_path / "nowhere", 0, g, HarivoObjective(cfg, HSPACE))


def test_missing_rank_file_is_a_clear_error(tmp_path):
    cfg = config()
    objective = trained_objective(cfg, 0)
    for rank in (0, 1):  # written by 2 workers
        write_rank_files(tmp_path / "ckpt", rank, TrainerState(step=3), used_generator(rank), objective, cfg)
    g, fresh = torch.Generator().manual_seed(3), HarivoObjective(cfg, HSPACE)
    before, items = g.get_state(), fresh.queue.items.clone()
    with pytest.raises(FileNotFoundError, match="has no state for rank 2: it was written by fewer workers"):
        read_rank_files(tmp_path / "ckpt", 2, g, fresh)  # resumed with 3
    assert torch.equal(g.get_state(), before) and torch.equal(fresh.queue.items, items)


def test_an_objective_of_another_shape_is_refused(tmp_path):
    cfg = config()
    write_rank_files(tmp_path / "ckpt", 0, TrainerState(), used_generator(0), trained_objective(cfg, 0), cfg)
    other = HarivoObjective(config(**{"loss.queue_size": 32}), HSPACE)
    # Not silently resumed with a wrong queue; the error names the file.
    with pytest.raises(RuntimeError, match="(?s)rank0.safetensors does not fit this run.*queue.items"):
        read_rank_files(tmp_path / "ckpt", 0, torch.Generator(), other)


class Payload:
    """Unpickling this runs code: it creates `marker` (what a planted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("planted", ["rank0.pt", "rank0.safetensors"])
def test_a_pickle_planted_as_a_rank_file_is_refused_and_never_runs(planted, tmp_path):
    cfg = config()
    directory = tmp_path / "ckpt"
    write_rank_files(directory, 0, TrainerState(step=3), used_generator(0), trained_objective(cfg, 0), cfg)
    for old in directory.glob("rank0.*"):
        old.unlink()
    marker = tmp_path / "pwned"
    torch.save({"generator": Payload(marker), "objective": {}}, tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)  # the payload is live: unpickled, it runs
    assert marker.exists()
    marker.unlink()
    (directory / planted).write_bytes((tmp_path / "payload.pt").read_bytes())
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    with pytest.raises(CheckpointError, match=f"{directory / planted} is (a pickled|not a readable)"):
        read_rank_files(directory, 0, g, HarivoObjective(cfg, HSPACE))
    assert not marker.exists() and torch.equal(g.get_state(), before)


def test_a_truncated_rank_file_is_named(tmp_path):
    cfg = config()
    write_rank_files(tmp_path, 0, TrainerState(), used_generator(0), trained_objective(cfg, 0), cfg)
    path = tmp_path / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{path} is not a readable safetensors file"):
        read_rank_files(tmp_path, 0, torch.Generator(), HarivoObjective(cfg, HSPACE))


FIELDS = {"step": 6, "epoch": 1, "batches_in_epoch": 2, "image_epoch": 0, "image_batches": 0}


@pytest.mark.parametrize(
    "saved, message",
    [
        ({**FIELDS, "step": "abc"}, "field 'step' must be a non-negative integer, got 'abc'"),
        ({**FIELDS, "step": -5}, "field 'step' must be a non-negative integer, got -5"),
        ({**FIELDS, "step": {}}, "field 'step' must be a non-negative integer, got {}"),
        ({**FIELDS, "epoch": 1.5}, "field 'epoch' must be a non-negative integer, got 1.5"),
        ({**FIELDS, "batches_in_epoch": True}, "field 'batches_in_epoch' must be a non-negative integer"),
        ({**FIELDS, "image_batches": None}, "field 'image_batches' must be a non-negative integer, got None"),
        ({**FIELDS, "epoch_positions": [[8, 4]]}, "field 'epoch_positions' must be null or ascending"),
        (
            {**FIELDS, "epoch_positions": [[0, 8], [6, 12]]},
            "field 'epoch_positions' must be null or ascending",
        ),
        ({**FIELDS, "epoch_positions": [[0, 8, 9]]}, "field 'epoch_positions' must be null or ascending"),
        ({**FIELDS, "epoch_positions": [[-2, 8]]}, "field 'epoch_positions' must be null or ascending"),
        ({**FIELDS, "epoch_positions": "0-8"}, "field 'epoch_positions' must be null or ascending"),
        ({**FIELDS, "stepp": 6}, r"unknown fields \['stepp'\], missing fields \[\]"),
        (
            {k: v for k, v in FIELDS.items() if k != "epoch"},
            r"unknown fields \[\], missing fields \['epoch'\]",
        ),
        ([6, 1, 2], "expected an object with fields"),
        ("{not json", "is unreadable"),
    ],
)
def test_trainer_state_is_validated_naming_file_and_field(saved, message, tmp_path):
    cfg = config()
    write_rank_files(tmp_path, 0, TrainerState(), used_generator(0), trained_objective(cfg, 0), cfg)
    path = tmp_path / TRAINER_STATE
    path.write_text(saved if isinstance(saved, str) else json.dumps(saved))
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
        read_rank_files(tmp_path, 0, g, HarivoObjective(cfg, HSPACE))
    assert torch.equal(g.get_state(), before)  # nothing restored from a checkpoint that is refused
