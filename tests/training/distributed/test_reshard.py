"""The data position on another world size (`reshard.resized_batches`) and older trainer states without one."""

from __future__ import annotations

import json

import pytest

from training.distributed.checkpoint import TRAINER_STATE, read_trainer_state, saved_world
from training.distributed.reshard import resized_batches, resized_image_batches


@pytest.mark.parametrize(
    "done, saved, world, accum, expected",
    [
        (3, 2, 1, 2, 6),  # 2 -> 1 with the global batch kept (grad_accum doubled): the same 6 micro-batches
        (6, 1, 2, 1, 3),  # 1 -> 2: 6 micro-batches between 2 ranks
        (3, 2, 2, 1, 3),  # same size: unchanged
        (3, 1, 2, 1, 1),  # 3 between 2 ranks: 1 each, one micro-batch is trained again
        (4, 2, 3, 2, 2),  # 8 micro-batches, steps of 3 x 2 = 6: one step (2 per rank) skipped, 2 again
        (0, 4, 3, 1, 0),
    ],
)
def test_the_position_is_the_epochs_global_count_rounded_down_to_whole_steps(
    done, saved, world, accum, expected
):
    assert resized_batches(done, saved, world, accum) == expected


@pytest.mark.parametrize("saved, world, accum", [(2, 1, 1), (2, 1, 2), (1, 2, 1), (3, 2, 2), (8, 3, 4)])
def test_the_new_ranks_never_skip_more_than_was_trained_and_resume_on_a_step(saved, world, accum):
    for done in range(0, 50):
        skip = resized_batches(done, saved, world, accum)
        consumed, resumed = done * saved, skip * world  # micro-batches of the epoch, all ranks together
        assert skip % accum == 0  # a step boundary: the loop counts steps by batches_in_epoch % grad_accum
        assert 0 <= consumed - resumed < world * accum  # re-trained: less than one global step
    assert resized_image_batches(5, 2, 1) == 10 and resized_image_batches(5, 1, 2) == 2


def test_a_trainer_state_without_world_size_is_read_as_this_runs(tmp_path):
    path = tmp_path / TRAINER_STATE
    path.write_text(
        json.dumps({"step": 6, "epoch": 1, "batches_in_epoch": 2, "image_epoch": 0, "image_batches": 0})
    )
    state = read_trainer_state(path)
    assert state.world_size == 0 and saved_world(state, 3) == 3
    path.write_text(json.dumps({**json.loads(path.read_text()), "world_size": 2}))
    assert saved_world(read_trainer_state(path), 3) == 2
