"""Each epoch's order of the training rows and a rank's batches in it (`training/distributed/rows.py`), on a
synthetic store written directly (no pipeline, no Ray): every rank trains an equal share, each clip once per
epoch; a resumed epoch continues exactly where it stopped without reading the latents it already trained on,
on the same world size or another (`reshard.resized_position`)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fixtures.latent_store import CountingFileSystem, write_latent_store
from training.distributed.checkpoint import TrainerState
from training.distributed.data import StoreInfo, feed_columns, is_validation
from training.distributed.reshard import resized_position
from training.distributed.rows import RowReader, epoch_windows, rank_span
from training.distributed.split import choose_split

SHAPE = (
    8,
    4,
    16,
    16,
)  # 16 KiB of float16 latents a clip: a row group's chunk (8 clips) outgrows a footer read
FRACTION, BATCH, SHUFFLE = 0.1, 2, 16


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """(store info, split) of 240 clips in 4 files, row groups of 8, 10% held out."""
    out = tmp_path_factory.mktemp("rows-store")
    write_latent_store(out, 240, files=4, row_group_size=8, latents_shape=SHAPE)
    info = StoreInfo(str(out / "clips"), "latents", list(SHAPE), False, {})
    return info, choose_split(info, FRACTION, str(out / "run"), val_clips=8)


def epoch_keys(
    split, info, epoch: int, rank: int, world: int, fs=None, start: int = 0, pool=None
) -> list[list[str]]:
    """Rank `rank`'s batches of `epoch` (from micro-batch `start`, its share cut from `pool`) as key lists."""
    reader = RowReader(split.train, feed_columns(info), fs)
    batches = reader.epoch(epoch, rank, world, BATCH, SHUFFLE, seed=0, start=start, pool=pool)
    return [[str(k) for k in batch["key"]] for batch in batches]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for batch in batches for k in batch]


def unopened(split, fs, epoch: int, keys: list[str]) -> tuple[set[int], set[int]]:
    """(row groups whose latents `fs` read, row groups of the windows of `epoch` holding none of `keys`): a
    reader that opens no window it has nothing to train on from keeps the two apart."""
    keys, skipped, read = set(keys), set(), set()
    for groups in epoch_windows([g[2] for g in split.train.groups], SHUFFLE, seed=0, epoch=epoch):
        held = set()
        for index in groups:
            file, group, _ = split.train.groups[index]
            path = f"{split.train.root}/{split.train.files[file]}"
            held |= set(pq.ParquetFile(path).read_row_group(group, columns=["key"]).column("key").to_pylist())
            if group in fs.groups_read(path, "latents"):
                read.add(index)
        if not held & keys:
            skipped |= set(groups)
    return read, skipped


def test_windows_take_every_row_group_once_in_a_new_order_every_epoch():
    rows = [8, 7, 8, 3, 8, 8, 6, 8, 8, 8]
    for epoch in range(3):
        windows = epoch_windows(rows, 16, seed=0, epoch=epoch)
        assert sorted(g for w in windows for g in w) == list(range(len(rows)))
        assert all(sum(rows[g] for g in w) >= 16 for w in windows[:-1])  # only the last may be short
        assert windows == epoch_windows(rows, 16, seed=0, epoch=epoch)  # reproducible
    assert epoch_windows(rows, 16, 0, 0) != epoch_windows(rows, 16, 0, 1)
    assert epoch_windows(rows, 0, 0, 5) == [[g] for g in range(len(rows))]  # no shuffle: stored order
    assert [len(rank_span(101, 3, r, 4)) for r in range(3)] == [32, 32, 32]  # equal whole batches
    assert rank_span(101, 3, 2, 4, drop_last=False) == range(66, 99)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_trains_an_equal_share_and_each_clip_once_per_epoch(split, world):
    info, s = split
    share = s.train.num_rows // world // BATCH * BATCH
    for epoch in range(2):
        ranks = [flat(epoch_keys(s, info, epoch, r, world)) for r in range(world)]
        assert [len(keys) for keys in ranks] == [share] * world  # every rank steps the same number of times
        seen = flat(ranks)
        assert len(seen) == len(set(seen))  # each clip at most once in the epoch...
        assert s.train.num_rows - len(seen) < world * BATCH  # ...and all but the cut-off remainder
        assert not any(is_validation(k, FRACTION) for k in seen)
    assert epoch_keys(s, info, 0, 0, world) == epoch_keys(s, info, 0, 0, world)  # reproducible
    assert epoch_keys(s, info, 0, 0, world) != epoch_keys(s, info, 1, 0, world)  # reshuffled every epoch


@pytest.mark.parametrize("position", [1, 17, 40])
def test_a_resumed_epoch_continues_where_it_stopped_without_reading_what_it_trained_on(split, position):
    """Ranks resumed at micro-batch `position` train exactly the batches the uninterrupted epoch had left (so the
    epoch sees each clip once across the resume), and the only latents they read are of row groups in windows
    they still train on: the window in progress (read whole) and the ones after it. The old loop re-read every
    batch before the position."""
    info, s = split
    world, fs = 2, CountingFileSystem()
    before, after, whole = [], [], []
    for rank in range(world):
        uninterrupted = epoch_keys(s, info, 3, rank, world)
        resumed = epoch_keys(s, info, 3, rank, world, fs, start=position)
        assert resumed == uninterrupted[position:]
        before += flat(uninterrupted[:position])
        after += flat(resumed)
        whole += flat(uninterrupted)
    assert len(before + after) == len(set(before + after)) and set(before + after) == set(whole)

    read, done = unopened(s, fs, 3, after)  # done: row groups of windows holding nothing left to train on
    assert not done & read
    if position > 1:
        assert len(done) * 8 > position * BATCH  # whole windows it had trained on were never opened


@pytest.mark.parametrize("position", [1, 13, 40])
def test_another_world_size_trains_the_rows_the_old_ranks_had_left_without_reading_the_others(
    split, position
):
    """2 ranks stopped at micro-batch `position` and 1 rank resumes: it trains, in the epoch's order, exactly
    what both had left (rank 0's rest, then rank 1's), and opens only windows holding some of it: not those
    both ranks had trained on (before each old share's position). The old rule skipped 2 x `position`
    micro-batches of its own share, the whole epoch: rank 1's trained clips came again, as many of rank 0's
    rest never."""
    info, s = split
    uninterrupted = [epoch_keys(s, info, 3, rank, 2) for rank in range(2)]
    state = TrainerState(epoch=3, batches_in_epoch=position, world_size=2)
    resized_position(state, 1, s.train.num_rows, BATCH)
    fs = CountingFileSystem()
    resumed = epoch_keys(s, info, 3, 0, 1, fs, state.batches_in_epoch, state.epoch_positions)
    assert flat(resumed) == flat(uninterrupted[0][position:]) + flat(uninterrupted[1][position:])
    read, trained = unopened(s, fs, 3, flat(resumed))
    assert not trained & read
    assert bool(trained) == (position > 1)  # 2 rows in: no window was done with
    if position == 40:  # windows of more rows than one old rank trained on: of both old shares, never opened
        assert sum(s.train.groups[g][2] for g in trained) > position * BATCH


def resumed_run(split, info, state: TrainerState, world: int, batches: int | None) -> list[str]:
    """The clips `world` ranks resuming `state` train (as the loop reads them) in `batches` micro-batches each
    (None: to the epoch's end); `state` is advanced to what their checkpoint records. Every rank reads its
    whole rest, and is checked to open only windows holding some of it."""
    resized_position(state, world, split.train.num_rows, BATCH)
    trained, n = [], batches
    for rank in range(world):
        fs = CountingFileSystem()
        rest = epoch_keys(
            split, info, state.epoch, rank, world, fs, state.batches_in_epoch, state.epoch_positions
        )
        read, skipped = unopened(split, fs, state.epoch, flat(rest))
        assert not read & skipped
        n = len(rest) if batches is None else min(batches, len(rest))
        trained += flat(rest[:n])
    state.batches_in_epoch += n
    state.world_size = world  # as save_checkpoint records it
    return trained


@pytest.mark.parametrize(
    "worlds, stops",
    [
        ((2, 1), (13,)),
        ((2, 1, 2), (1, 5)),
        ((2, 1, 2), (13, 40)),
        ((2, 1, 2), (20, 0)),
        ((3, 2), (7,)),
        ((1, 3, 2), (30, 9)),
    ],
)
def test_each_clip_comes_once_in_an_epoch_resumed_on_other_world_sizes(split, worlds, stops):
    """Runs on `worlds` in turn, each checkpointing after `stops` micro-batches per rank (positions within
    windows; 0: resized again before a step), the last one to the epoch's end: every clip of the epoch is
    trained once, but for what an uninterrupted epoch on the first world size leaves out and fewer than M
    batches of clips per resize to M ranks (whole-batch shares)."""
    info, s = split
    state, trained = TrainerState(epoch=5), []
    for world, batches in zip(worlds, [*stops, None]):
        trained += resumed_run(s, info, state, world, batches)
    assert len(trained) == len(set(trained))  # nothing twice...
    assert not any(is_validation(k, FRACTION) for k in trained)
    uninterrupted = {k for rank in range(worlds[0]) for k in flat(epoch_keys(s, info, 5, rank, worlds[0]))}
    missing = uninterrupted - set(trained)
    assert set(trained) <= uninterrupted  # ...nothing the first world size leaves out...
    assert len(missing) < sum(m * BATCH for n, m in zip(worlds, worlds[1:]) if m != n)  # ...and all but a few


def test_a_share_smaller_than_a_batch_has_no_batch(split):
    info, s = split
    reader = RowReader(s.train, feed_columns(info))
    world = s.train.num_rows // (BATCH - 1)  # one row each
    assert reader.num_batches(world, BATCH) == 0
    assert list(reader.epoch(0, 0, world, BATCH, SHUFFLE, 0)) == []
