"""The validation split chosen once per run (`training/distributed/split.py`) on a synthetic store: its files hold
exactly the first K keys `is_validation` holds out (K: what a validation reads), choosing reads the latents of
only the row groups holding them, training leaves out every held-out key, a validation reads only the split's
files, a resume reuses them (or chooses more for more workers), and a choice cut short is never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures.latent_store import CountingFileSystem, write_latent_store
from pipeline import schema
from training.distributed import split as split_module
from training.distributed.data import StoreInfo, feed_columns, is_validation
from training.distributed.rows import RowReader
from training.distributed.split import MANIFEST, SPLIT_DIR, choose_split, validation_clips

SHAPE = (8, 4, 16, 16)  # 16 KiB of latents a clip: a row group's chunk outgrows a footer's 64 KiB read
FRACTION = 0.1
K = validation_clips(val_batches=2, batch_size=2, workers=2)  # 8 of the store's 27 held-out clips


@pytest.fixture
def store(tmp_path):
    """StoreInfo of 240 clips in 4 files, row groups of 8."""
    write_latent_store(tmp_path / "store", 240, files=4, row_group_size=8, latents_shape=SHAPE)
    return StoreInfo(str(tmp_path / "store" / "clips"), "latents", list(SHAPE), False, {})


def store_keys(info: StoreInfo) -> list[str]:
    return pq.read_table(info.clips_path, columns=[schema.KEY]).column(schema.KEY).to_pylist()


def held_out_groups(info: StoreInfo, fraction: float) -> list[tuple[str, int, str]]:
    """(file path, row group, key) of every held-out clip, in stored order."""
    out = []
    for path in sorted(Path(info.clips_path).glob("*.parquet")):
        parquet = pq.ParquetFile(path)
        for g in range(parquet.num_row_groups):
            keys = parquet.read_row_group(g, columns=[schema.KEY]).column(schema.KEY).to_pylist()
            out += [(str(path), g, k) for k in keys if is_validation(k, fraction)]
    return out


def all_keys(rows, info: StoreInfo) -> list[str]:
    """Every row of a split in stored order (one rank, unshuffled, one batch at a time)."""
    reader = RowReader(rows, feed_columns(info))
    return [str(k) for batch in reader.first(0, 1, 1, rows.num_rows) for k in batch[schema.KEY]]


def test_the_split_holds_the_first_k_held_out_clips_and_training_leaves_out_all(store, tmp_path):
    s = choose_split(store, FRACTION, str(tmp_path / "run"), K)
    keys = store_keys(store)
    held_out = [k for k in keys if is_validation(k, FRACTION)]
    assert K < len(held_out) < len(keys)
    assert all_keys(s.val, store) == held_out[:K]  # the first K of the hash's membership, in stored order
    assert all_keys(s.train, store) == [k for k in keys if not is_validation(k, FRACTION)]  # all K or not
    # Their own small files, holding the columns training reads, with the store's metadata.
    split_dir = tmp_path / "run" / SPLIT_DIR
    val_files = sorted(p.name for p in split_dir.glob("*.parquet"))
    assert val_files == sorted(s.val.files) and s.val.root == str(split_dir)
    file_schema = pq.read_schema(split_dir / val_files[0])
    assert file_schema.names == feed_columns(store)
    assert schema.decode_metadata(file_schema)[schema.META_VIEWS] == {"main": {"latents_shape": list(SHAPE)}}
    # split.json says what was chosen, for which store.
    manifest = json.loads((split_dir / MANIFEST).read_text())
    chosen = manifest["chosen_for"]
    assert chosen["store"] == store.clips_path and chosen["val_fraction"] == FRACTION
    assert [name for name, _ in chosen["files"]] == [f"part-{n:05d}.parquet" for n in range(4)]
    assert chosen["columns"] == feed_columns(store)
    assert manifest["val_clips"] == K and manifest["held_out"] == len(held_out)
    assert manifest["val_rows"] == K and manifest["train_rows"] == len(keys) - len(held_out)
    assert manifest["val"]["files"] == s.val.files


def test_choosing_reads_the_key_column_and_only_the_row_groups_holding_the_first_k(store, tmp_path):
    """The old choice copied every held-out clip, so read the latents of every row group holding one (19 of
    30 here); now only of those holding the first K, at most K groups whatever the fraction."""
    held = held_out_groups(store, FRACTION)
    wanted = {(path, g) for path, g, _ in held[:K]}
    assert len({(path, g) for path, g, _ in held}) > 2 * K  # held-out clips spread over many row groups
    fs = CountingFileSystem()
    choose_split(store, FRACTION, str(tmp_path / "run"), K, store_fs=fs)
    latents_read = set()
    for n in range(4):
        path = f"{store.clips_path}/part-{n:05d}.parquet"
        groups = pq.ParquetFile(path).metadata.num_row_groups
        assert fs.groups_read(path, schema.KEY) == set(range(groups))  # the key pass: every training count
        latents_read |= {(path, g) for g in fs.groups_read(path, "latents")}
    assert latents_read == wanted and len(latents_read) <= K


def test_a_small_store_validates_on_every_held_out_clip(store, tmp_path):
    """K beyond the held-out clips: the split holds them all, and a resume asking as much reuses it."""
    run = str(tmp_path / "run")
    s = choose_split(store, FRACTION, run, 1000)
    held_out = [k for k in store_keys(store) if is_validation(k, FRACTION)]
    assert all_keys(s.val, store) == held_out
    fs = CountingFileSystem()
    assert choose_split(store, FRACTION, run, 1000, store_fs=fs) == s and fs.reads == []


def test_a_validation_reads_only_the_split_files(store, tmp_path):
    """The old validation filtered the whole store every time; now two ranks' 2 batches read a row group or two
    of the split files and nothing of the store."""
    s = choose_split(store, FRACTION, str(tmp_path / "run"), K)
    fs = CountingFileSystem()
    batches = [b for rank in range(2) for b in RowReader(s.val, feed_columns(store), fs).first(rank, 2, 2, 2)]
    assert [len(b[schema.KEY]) for b in batches] == [2, 2, 2, 2]
    opened = {path for path, _, _ in fs.reads}
    assert opened and all(path.startswith(f"{tmp_path / 'run' / SPLIT_DIR}/") for path in opened)
    store_bytes = sum(f.stat().st_size for f in (tmp_path / "store" / "clips").glob("*.parquet"))
    assert fs.bytes_read() < store_bytes / 4  # the old validation read it all


def test_a_resume_reuses_the_split_and_another_fraction_chooses_again(store, tmp_path, caplog):
    run = str(tmp_path / "run")
    first = choose_split(store, FRACTION, run, K)
    fs = CountingFileSystem()
    assert choose_split(store, FRACTION, run, K, store_fs=fs) == first
    assert choose_split(store, FRACTION, run, K // 2, store_fs=fs) == first  # fewer workers read fewer
    assert fs.reads == []  # reused from split.json: not a byte of the store read
    other = choose_split(store, 0.3, run, K)
    assert "chosen for another val_fraction" in caplog.text
    assert set(other.val.files).isdisjoint(first.val.files) and other.train.num_rows < first.train.num_rows
    assert sorted(p.name for p in (tmp_path / "run" / SPLIT_DIR).glob("*.parquet")) == sorted(other.val.files)


def test_a_resume_on_more_workers_chooses_more_validation_clips(store, tmp_path, caplog):
    """Twice the workers read twice the clips: chosen again with a warning; the training split is the same."""
    run = str(tmp_path / "run")
    first = choose_split(store, FRACTION, run, K)
    more = choose_split(store, FRACTION, run, 2 * K)
    assert "holds 8 validation clips, this run reads 16" in caplog.text
    held_out = [k for k in store_keys(store) if is_validation(k, FRACTION)]
    assert all_keys(more.val, store) == held_out[: 2 * K]
    assert more.train == first.train
    assert sorted(p.name for p in (tmp_path / "run" / SPLIT_DIR).glob("*.parquet")) == sorted(more.val.files)


def test_a_choice_cut_short_is_never_trusted(store, tmp_path, monkeypatch):
    """A crash after the validation files but before split.json leaves the previous choice in force; the next
    choice removes the orphans. A damaged split.json is chosen again."""
    run = str(tmp_path / "run")
    first = choose_split(store, FRACTION, run, K)

    def crash(*args):
        raise KeyboardInterrupt("killed while choosing")

    monkeypatch.setattr(split_module, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        choose_split(store, 0.3, run, K)
    monkeypatch.undo()
    split_dir = tmp_path / "run" / SPLIT_DIR
    assert len(list(split_dir.glob("*.parquet"))) > len(
        first.val.files
    )  # the cut choice's files are there...
    assert choose_split(store, FRACTION, run, K) == first  # ...but split.json still names the first choice
    chosen = choose_split(store, 0.3, run, K)
    assert sorted(p.name for p in split_dir.glob("*.parquet")) == sorted(chosen.val.files)  # orphans removed
    (split_dir / MANIFEST).write_text('{"chosen_for": ')  # cut short by a full disk
    assert choose_split(store, 0.3, run, K).val.num_rows == chosen.val.num_rows
