"""The data position on another world size (`reshard.resized_position`, `rows.remaining_positions`), as
positions of the epoch's order (no store: `test_rows.py` reads them), and older trainer states without one."""

from __future__ import annotations

import json

import pytest

from training.distributed.checkpoint import TRAINER_STATE, TrainerState, read_trainer_state, saved_world
from training.distributed.engine import CheckpointError
from training.distributed.reshard import resized_image_batches, resized_position
from training.distributed.rows import rank_positions, remaining_positions, take


def train(state: TrainerState, world: int, total: int, batch: int, batches: int | None) -> list[int]:
    """What `world` ranks resuming `state` train, as the loop does: the resumed position (`resized_position`),
    then `batches` micro-batches each (None: to the epoch's end). `state` is advanced to what their checkpoint
    records; returns the positions trained."""
    resized_position(state, world, total, batch)
    shares = [
        rank_positions(total, world, r, batch, state.batches_in_epoch, state.epoch_positions)
        for r in range(world)
    ]
    left = sum(map(len, shares[0])) // batch
    n = left if batches is None else min(batches, left)
    assert all(sum(map(len, share)) == left * batch for share in shares)  # every rank steps as often
    state.batches_in_epoch += n
    state.world_size = world  # as save_checkpoint records it
    return [p for share in shares for part in take(share, range(n * batch)) for p in part]


def test_the_old_ranks_rest_is_split_among_the_new_ones():
    state = TrainerState(epoch=4, batches_in_epoch=3, world_size=2)
    resized_position(state, 1, 20, 2)  # shares [0, 10) and [10, 20), 6 rows of each trained
    assert state == TrainerState(
        epoch=4, batches_in_epoch=0, world_size=1, epoch_positions=[[6, 10], [16, 20]]
    )
    assert rank_positions(20, 1, 0, 2, 0, state.epoch_positions) == [range(6, 10), range(16, 20)]
    # 3 ranks, 101 rows, batches of 4: shares of 33 rows cut to 32, 8 trained of each
    assert remaining_positions(101, 3, 4, 2) == [[8, 32], [41, 65], [74, 98]]
    assert remaining_positions(40, 2, 4, 0) == [[0, 40]]  # untouched shares that touch: joined
    again = remaining_positions(101, 2, 4, 1, [[8, 32], [41, 65], [74, 98]])  # 72 rows: 36 each, 4 done
    assert again == [[12, 32], [41, 53], [57, 65], [74, 98]]
    ended = TrainerState(batches_in_epoch=5, world_size=2)  # checkpointed after the shares' last batch
    resized_position(ended, 1, 20, 2)
    assert ended.epoch_positions == [] and rank_positions(20, 1, 0, 2, 0, ended.epoch_positions) == []


@pytest.mark.parametrize("world_size", [0, 3])
def test_the_same_world_size_or_an_unrecorded_one_keeps_the_position(world_size):
    state = TrainerState(epoch=1, batches_in_epoch=5, world_size=world_size, epoch_positions=[[4, 90]])
    resized_position(state, 3, 101, 4)
    assert state == TrainerState(
        epoch=1, batches_in_epoch=5, world_size=world_size, epoch_positions=[[4, 90]]
    )


@pytest.mark.parametrize("world", [1, 3])
def test_a_position_beyond_this_runs_rows_is_refused(world):
    """A checkpoint whose epoch_positions reach past this split's rows (written on other data) is refused, resized
    or not, naming both sizes; one within them resumes."""
    state = TrainerState(epoch=1, batches_in_epoch=2, world_size=3, epoch_positions=[[4, 90], [95, 120]])
    with pytest.raises(CheckpointError, match="rows up to 120, but this run's training split has 101 rows"):
        resized_position(state, world, 101, 4)
    resized_position(state, world, 120, 4)


@pytest.mark.parametrize(
    "worlds",
    [(2, 1), (1, 2), (2, 1, 2), (3, 2), (2, 3), (3, 1, 2), (4, 3, 3, 1), (2, 2, 1, 2)],
)
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_every_row_of_the_epoch_is_trained_once_across_resumes_on_other_world_sizes(worlds, batch):
    """Runs on `worlds` in turn, each stopping after a few micro-batches per rank (the last one trains to the
    end): no position comes twice, and only what the first world size leaves out of the epoch is missing,
    plus fewer than M batches' rows per resize to M ranks (the new shares' whole batches)."""
    for total in (57, 64, 101):
        for stops in ((1, 2, 3), (4, 0, 5), (7, 3, 1), (2, 6, 2)):
            state, trained = TrainerState(epoch=2), []
            for i, world in enumerate(worlds):
                last = i == len(worlds) - 1
                trained += train(state, world, total, batch, None if last else stops[i % len(stops)])
            assert len(trained) == len(set(trained)), (total, stops)  # nothing trained twice
            uninterrupted = set(train(TrainerState(epoch=2), worlds[0], total, batch, None))
            assert set(trained) <= uninterrupted  # nothing the first world size leaves out
            resizes = [m for n, m in zip(worlds, worlds[1:]) if m != n]
            missing = len(uninterrupted) - len(trained)
            assert missing < sum(m * batch for m in resizes), (total, stops, missing)


def test_a_resumed_epoch_on_one_world_size_is_the_uninterrupted_epoch():
    """The same world size resumes at its position: together the runs train the uninterrupted epoch's rows."""
    state = TrainerState()
    trained = train(state, 3, 101, 4, 5) + train(state, 3, 101, 4, None)
    assert sorted(trained) == sorted(train(TrainerState(), 3, 101, 4, None))


def test_image_batches_are_shared_among_the_new_ranks():
    assert resized_image_batches(5, 2, 1) == 10 and resized_image_batches(5, 1, 2) == 2


def test_a_trainer_state_without_world_size_is_read_as_this_runs(tmp_path):
    path = tmp_path / TRAINER_STATE
    path.write_text(
        json.dumps({"step": 6, "epoch": 1, "batches_in_epoch": 2, "image_epoch": 0, "image_batches": 0})
    )
    state = read_trainer_state(path)
    assert state.world_size == 0 and saved_world(state, 3) == 3
    assert state.epoch_positions is None  # older checkpoints: the whole epoch
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "world_size": 2, "epoch_positions": [[3, 9]]})
    )
    assert saved_world(read_trainer_state(path), 3) == 2
    assert read_trainer_state(path).epoch_positions == [[3, 9]]
