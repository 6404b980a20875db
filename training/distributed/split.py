"""The train / validation split, chosen once per run: the training split is the store minus every held-out clip
(`data.is_validation`, a hash of the key), read in place; the validation split is the first `val_clips` of those
held-out clips in the store's stored order, copied into a few small Parquet files of their own.

`val_clips` is what one validation reads and no more (`validation_clips`: data.val_batches x optim.batch_size x
run.num_workers, each rank's first val_batches batches), since Parquet is read by row group: copying every
held-out clip read the latents of each row group holding one, 1 - (1 - f)^G of the store (72% at f = 0.5% and
the pipeline's G = 256 rows a group), where the first K held-out clips lie in at most K row groups.

The driver chooses it before any worker starts (`choose_split`). One pass reads the key column of every store
file (no latents) and decides each row, which every training row count needs; a second reads only the row
groups holding the first `val_clips` held-out clips, and writes those clips (the columns training reads) to
`RUN_DIR/data_split/val-<token>-<i>.parquet`. `split.json`, written last under a temporary name and renamed,
states what was chosen: for which store files (name, size), val_fraction and columns; `val_clips` asked for and
`held_out` (every held-out clip of the store); the training rows of every row group; the validation files and
their row groups. Every validation then reads only those files (only the row groups its batches need), and the
training split is the store minus all held-out keys, read in place (`rows.py`): `val_clips` never changes it.

A later run of the same RUN_DIR (a resume) reuses the split while the store files, val_fraction and columns
are the same and it holds the `val_clips` the run asks for (or every held-out clip); with more workers it asks
for more, and the split is chosen again with a warning (the validation clips grow, the training split stays the
same); a changed store, fraction or columns chooses again with a warning too. A crash while choosing leaves no
new `split.json`: a split is trusted only through it, and files it does not name are removed by the next choice.
"""

from __future__ import annotations

import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema
from training.distributed.data import StoreInfo, feed_columns, filesystem, is_validation, parquet_files
from training.distributed.rows import RowGroups

log = logging.getLogger(__name__)

SPLIT_DIR = "data_split"
MANIFEST = "split.json"
VERSION = 2
VAL_GROUP_ROWS = 16
"""Rows per row group of the validation files: a validation reads whole row groups, so small ones keep it to
the rows its batches use."""
VAL_FILE_ROWS = 8192
"""Rows per validation file."""


@dataclass
class Split:
    """The run's training rows (the store read in place, held-out keys left out) and validation rows (their
    own files)."""

    train: RowGroups
    val: RowGroups

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        return cls(RowGroups(**d["train"]), RowGroups(**d["val"]))


@dataclass
class KeyPass:
    """One store file's rows as the key pass saw them: the row count of each row group, and the in-group
    indices of its held-out rows."""

    name: str
    group_rows: list[int]
    val_rows: list[list[int]]


def validation_clips(val_batches: int, batch_size: int, workers: int) -> int:
    """Clips one validation reads: every rank's first `val_batches` batches (`RowReader.first`), so the
    validation split needs no more."""
    return val_batches * batch_size * workers


def choose_split(
    store: StoreInfo,
    val_fraction: float,
    run_dir: str,
    val_clips: int,
    store_fs: pafs.FileSystem | None = None,
) -> Split:
    """The run's split: `RUN_DIR/data_split/` as chosen before when it still fits the store, val_fraction and
    columns and holds `val_clips` validation clips (or every held-out one), else chosen now (and recorded there).
    `val_clips`: how many of the held-out clips, the first in stored order, the validation split holds
    (`validation_clips`); training leaves out every held-out clip whatever it is. `store_fs`: read the store
    through it (default: its path's)."""
    if val_clips < 0:
        raise ValueError(f"val_clips={val_clips}: the validation split cannot hold fewer than 0 clips")
    fs, store_root = filesystem(store.clips_path)
    store_fs = store_fs or fs
    run_fs, run_root = filesystem(run_dir)
    split_root = f"{run_root.rstrip('/')}/{SPLIT_DIR}"
    split_dir = _user_path(f"{run_dir.rstrip('/')}/{SPLIT_DIR}", split_root)
    columns = feed_columns(store)
    files = parquet_files(store_fs, store_root)
    chosen_for = {
        "version": VERSION,
        "store": _user_path(store.clips_path, store_root),
        "files": [[f.base_name, f.size] for f in files],
        "val_fraction": val_fraction,
        "columns": columns,
    }
    manifest = _read_manifest(run_fs, split_root)
    if manifest is not None and manifest["chosen_for"] == chosen_for:
        if manifest["val_rows"] >= val_clips or manifest["val_rows"] == manifest["held_out"]:
            return _split(manifest, chosen_for["store"], split_dir)
        log.warning(
            "%s/%s holds %d validation clips, this run reads %d (data.val_batches x optim.batch_size x "
            "run.num_workers): choosing the validation split again (the training split stays the same)",
            split_root,
            MANIFEST,
            manifest["val_rows"],
            val_clips,
        )
    elif manifest is not None:
        changed = [k for k in chosen_for if manifest["chosen_for"].get(k) != chosen_for[k]]
        log.warning(
            "%s/%s was chosen for another %s: choosing the validation split again (a resumed epoch's position "
            "then names other clips)",
            split_root,
            MANIFEST,
            " / ".join(changed),
        )
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        passes = list(pool.map(lambda f: _key_pass(store_fs, f.path, val_fraction), files))
    held_out = sum(len(held) for p in passes for held in p.val_rows)
    run_fs.create_dir(split_root, recursive=True)
    token = uuid.uuid4().hex[:12]
    val = _write_val(store_fs, store_root, _first(passes, val_clips), columns, run_fs, split_root, token)
    train = RowGroups(
        "",
        [p.name for p in passes],
        [
            [i, g, n - len(held)]
            for i, p in enumerate(passes)
            for g, (n, held) in enumerate(zip(p.group_rows, p.val_rows))
            if n > len(held)
        ],
        val_fraction,
    )
    manifest = {
        "chosen_for": chosen_for,
        "val_clips": val_clips,
        "held_out": held_out,
        "train_rows": train.num_rows,
        "val_rows": val.num_rows,
        "train": _recorded(train),
        "val": _recorded(val),
    }
    _write_manifest(run_fs, split_root, manifest, token)
    _remove_unnamed(run_fs, split_root, val.files)
    log.info(
        "chose the validation split: the first %d of %d held-out clips (data.val_fraction=%g of %d) in %d files "
        "under %s; training leaves out all %d",
        val.num_rows,
        held_out,
        val_fraction,
        held_out + train.num_rows,
        len(val.files),
        split_root,
        held_out,
    )
    return _split(manifest, chosen_for["store"], split_dir)


def _user_path(path: str, fs_path: str) -> str:
    """A URI as given; a local path made absolute (workers may run in another directory)."""
    return path if "://" in path else fs_path


def _split(manifest: dict, store_root: str, split_root: str) -> Split:
    return Split(RowGroups(store_root, **manifest["train"]), RowGroups(split_root, **manifest["val"]))


def _recorded(rows: RowGroups) -> dict:
    """A RowGroups as split.json records it: its root is the store's or the split's, known from elsewhere."""
    return {k: v for k, v in asdict(rows).items() if k != "root"}


def _key_pass(fs: pafs.FileSystem, path: str, val_fraction: float) -> KeyPass:
    """Which rows of one file are held out: its key column only (none at all when val_fraction is 0)."""
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        if val_fraction <= 0:
            return KeyPass(path.rsplit("/", 1)[-1], sizes, [[] for _ in sizes])
        keys = parquet.read(columns=[schema.KEY]).column(schema.KEY).to_pylist()
    held, start = [], 0
    for n in sizes:
        held.append([i for i in range(n) if is_validation(keys[start + i], val_fraction)])
        start += n
    return KeyPass(path.rsplit("/", 1)[-1], sizes, held)


def _first(passes: list[KeyPass], clips: int) -> list[tuple[KeyPass, int, list[int]]]:
    """The first `clips` held-out rows in stored order, as (file, row group, its rows taken) of the row groups
    holding them: at most `clips` groups, whatever the fraction."""
    wanted = []
    for p in passes:
        for g, held in enumerate(p.val_rows):
            if clips <= 0:
                return wanted
            if held:
                wanted.append((p, g, held[:clips]))
                clips -= len(wanted[-1][2])
    return wanted


def _write_val(
    store_fs: pafs.FileSystem,
    store_root: str,
    wanted: list[tuple[KeyPass, int, list[int]]],
    columns: list[str],
    run_fs: pafs.FileSystem,
    split_root: str,
    token: str,
) -> RowGroups:
    """Copy the `wanted` rows (`columns`, store metadata kept) into `val-<token>-<i>.parquet` files; reads only
    the row groups they lie in."""
    if not wanted:
        return RowGroups("", [], [])
    with store_fs.open_input_file(f"{store_root}/{wanted[0][0].name}") as f:
        file_schema = pq.ParquetFile(f).schema_arrow
    out_schema = pa.schema([file_schema.field(c) for c in columns], metadata=file_schema.metadata)

    def batches():
        for p, g, held in wanted:
            with store_fs.open_input_file(f"{store_root}/{p.name}") as f:
                table = pq.ParquetFile(f).read_row_group(g, columns=columns).take(held)
            yield from table.replace_schema_metadata(out_schema.metadata).to_batches()

    written: list[tuple[str, pq.FileMetaData]] = []
    pads.write_dataset(
        batches(),
        split_root,
        schema=out_schema,
        format="parquet",
        filesystem=run_fs,
        basename_template=f"val-{token}-{{i}}.parquet",
        max_rows_per_file=VAL_FILE_ROWS,
        min_rows_per_group=VAL_GROUP_ROWS,
        max_rows_per_group=VAL_GROUP_ROWS,
        existing_data_behavior="overwrite_or_ignore",
        preserve_order=True,
        file_visitor=lambda f: written.append((f.path.rsplit("/", 1)[-1], f.metadata)),
    )
    written.sort()
    groups = [
        [i, g, meta.row_group(g).num_rows]
        for i, (_, meta) in enumerate(written)
        for g in range(meta.num_row_groups)
    ]
    return RowGroups("", [name for name, _ in written], groups)


def _read_manifest(fs: pafs.FileSystem, split_root: str) -> dict | None:
    path = f"{split_root}/{MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        try:
            manifest = json.loads(f.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("%s is unreadable (%s): choosing the validation split again", path, exc)
            return None
    return manifest if isinstance(manifest, dict) and "chosen_for" in manifest else None


def _write_manifest(fs: pafs.FileSystem, split_root: str, manifest: dict, token: str) -> None:
    """split.json under a temporary name, then renamed: a crash leaves the previous one (or none) in place."""
    tmp = f"{split_root}/{MANIFEST}.tmp-{token}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest).encode())
    fs.move(tmp, f"{split_root}/{MANIFEST}")


def _remove_unnamed(fs: pafs.FileSystem, split_root: str, keep: list[str]) -> None:
    """Files of earlier choices, or of one that crashed: split.json does not name them."""
    for info in fs.get_file_info(pafs.FileSelector(split_root)):
        if info.type == pafs.FileType.File and info.base_name not in {MANIFEST, *keep}:
            fs.delete_file(info.path)
