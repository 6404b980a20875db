"""Each epoch's order of the training rows and a rank's batches in it (`training/distributed/rows.py`), on a
synthetic store written directly (no pipeline, no Ray): every rank trains an equal share, each clip once per
epoch; a resumed epoch continues exactly where it stopped without reading the latents it already trained on."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fixtures.latent_store import CountingFileSystem, write_latent_store
from training.distributed.data import StoreInfo, feed_columns, is_validation
from training.distributed.reshard import resized_batches
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


def epoch_keys(split, info, epoch: int, rank: int, world: int, fs=None, start: int = 0) -> list[list[str]]:
    """Rank `rank`'s batches of `epoch` (from micro-batch `start`) as lists of keys."""
    reader = RowReader(split.train, feed_columns(info), fs)
    batches = reader.epoch(epoch, rank, world, BATCH, SHUFFLE, seed=0, start=start)
    return [[str(k) for k in batch["key"]] for batch in batches]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for batch in batches for k in batch]


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

    windows = epoch_windows([g[2] for g in s.train.groups], SHUFFLE, seed=0, epoch=3)
    done, read = (
        set(),
        set(),
    )  # row groups of windows holding nothing left to train on; groups whose latents were read
    for groups in windows:
        keys = set()
        for index in groups:
            file, group, _ = s.train.groups[index]
            path = f"{s.train.root}/{s.train.files[file]}"
            keys |= set(pq.ParquetFile(path).read_row_group(group, columns=["key"]).column("key").to_pylist())
            if group in fs.groups_read(path, "latents"):
                read.add(index)
        if not keys & set(after):
            done |= set(groups)
    assert not done & read
    if position > 1:
        assert len(done) * 8 > position * BATCH  # whole windows it had trained on were never opened


def test_another_world_size_resumes_at_resized_batches_without_reading_the_skipped_rows(split):
    """2 ranks stopped at micro-batch 20 and 1 rank resumes (grad_accum 2: the same global batch): it skips
    `resized_batches` of its share (the epoch's count, not the clips' identity: reshard.py) and reads only from
    there on: the window in progress and the one read ahead."""
    info, s = split
    skip = resized_batches(20, 2, 1, grad_accum=2)
    assert skip == 40
    reader = RowReader(s.train, feed_columns(info))
    batches = reader.epoch(0, 0, 1, BATCH, SHUFFLE, seed=0, start=skip)
    assert [str(k) for k in next(batches)["key"]] == epoch_keys(s, info, 0, 0, 1)[skip]
    batches.close()  # waits for the window read ahead, counted too
    largest = max(8 * len(w) for w in epoch_windows([g[2] for g in s.train.groups], SHUFFLE, 0, 0))
    assert reader.stats.rows <= 2 * largest < skip * BATCH


def test_a_share_smaller_than_a_batch_has_no_batch(split):
    info, s = split
    reader = RowReader(s.train, feed_columns(info))
    world = s.train.num_rows // (BATCH - 1)  # one row each
    assert reader.num_batches(world, BATCH) == 0
    assert list(reader.epoch(0, 0, world, BATCH, SHUFFLE, 0)) == []
