"""One split of the latent store as the loop reads it: its row groups, each epoch's order of its rows, and one
rank's batches in that order, read with pyarrow in the worker.

An epoch's order is a pure function of (run.seed, epoch, the split's row groups, data.shuffle_buffer): the row
groups in a seeded random order, joined into windows of whole groups of at least `shuffle_buffer` rows, each
window's rows shuffled together (`epoch_windows`). Rank r of W trains on positions [r L, r L + L) of that order,
L being every rank's equal share in whole batches (`rank_span`). So a checkpoint's data position,
`batches_in_epoch`, names the rows already trained on, and a resumed run starts right after them: windows
before its position are never opened, the window in progress is read whole (its consumed rows dropped), and
every row of the epoch is trained on exactly once across the resume.

On another world size the shares are cut from the positions the old ranks had left instead of the whole epoch
(`remaining_positions`, recorded as the trainer state's `epoch_positions`: `reshard.resized_position`): rank r
of M trains `rank_positions`, the same `rank_span` taken through those positions in order. However often the
world size changes, the epoch trains each row at most once, and each resize leaves out fewer than M batches'
rows more (the shares' whole-batch rounding, as for the whole epoch); windows holding none of a rank's
positions are never opened.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema
from training.distributed.data import LatentStoreError, filesystem, is_validation


@dataclass
class RowGroups:
    """A split's rows, where they lie: one entry per Parquet row group holding some of them."""

    root: str
    """The directory of `files` (local path or URI)."""
    files: list[str]
    """File names in `root`."""
    groups: list[list[int]]
    """[file index, row group index in that file, rows of the split in it] per row group, in stored order."""
    held_out: float = 0.0
    """Rows whose key `is_validation(key, held_out)` are not part of the split (the training split reads the
    store in place and leaves data.val_fraction of it out); 0 keeps every row."""

    @property
    def num_rows(self) -> int:
        return sum(g[2] for g in self.groups)


@dataclass
class ReadStats:
    """What a reader has read so far: row groups, and their rows (held-out ones included)."""

    groups: int = 0
    rows: int = 0


def epoch_windows(rows: list[int], shuffle_rows: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's order as windows of row-group indices: every group once, in an order drawn from (seed, epoch),
    consecutive groups joined until a window holds at least `shuffle_rows` rows (its rows are then shuffled
    together). `shuffle_rows` 0: stored order, one group per window, nothing shuffled."""
    if shuffle_rows <= 0:
        return [[g] for g in range(len(rows))]
    windows, current, held = [], [], 0
    for g in np.random.default_rng([seed, epoch]).permutation(len(rows)).tolist():
        current.append(g)
        held += rows[g]
        if held >= shuffle_rows:
            windows.append(current)
            current, held = [], 0
    return windows + [current] if current else windows


def rank_span(total: int, world: int, rank: int, batch_size: int, drop_last: bool = True) -> range:
    """Positions of the epoch's order that rank `rank` of `world` reads: an equal share of `total` rows, cut to
    whole batches with `drop_last` (so every rank trains the same number of micro-batches)."""
    share = total // world
    used = share - share % batch_size if drop_last else share
    return range(rank * share, rank * share + used)


def rank_positions(
    total: int, world: int, rank: int, batch_size: int, start: int = 0, pool: list[list[int]] | None = None
) -> list[range]:
    """Rank `rank` of `world`'s positions of the epoch's order (of `total` rows) from its micro-batch `start`
    on, as ascending ranges: `rank_span` of the positions `pool` (the trainer state's `epoch_positions`,
    [start, stop) pairs; None: the whole epoch), taken through them in order."""
    parts = [range(total)] if pool is None else [range(a, b) for a, b in pool]
    share = take(parts, rank_span(sum(map(len, parts)), world, rank, batch_size))
    return take(share, range(start * batch_size, sum(map(len, share))))


def take(positions: list[range], indices: range) -> list[range]:
    """The positions at `indices` (a step-1 range) of the sequence `positions` lists, as ranges in order."""
    out, offset = [], 0
    for part in positions:
        lo, hi = max(indices.start - offset, 0), min(indices.stop - offset, len(part))
        if lo < hi:
            out.append(range(part.start + lo, part.start + hi))
        offset += len(part)
    return out


def remaining_positions(
    total: int, world: int, batch_size: int, start: int, pool: list[list[int]] | None = None
) -> list[list[int]]:
    """What `world` ranks have still to train of their shares (`rank_positions`) after `start` micro-batches
    each: every rank's rest, in the epoch's order, as [start, stop) pairs (ones that touch joined; [] when
    nothing is left)."""
    joined: list[list[int]] = []
    for rank in range(world):
        for part in rank_positions(total, world, rank, batch_size, start, pool):
            if joined and joined[-1][1] == part.start:
                joined[-1][1] = part.stop
            else:
                joined.append([part.start, part.stop])
    return joined


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A table as the numpy batch `collate` takes: tensor columns as (B, *shape) arrays, others 1-D."""
    out = {}
    for name, column in zip(table.column_names, table.columns):
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[name] = column.combine_chunks().to_numpy_ndarray()
        else:
            out[name] = column.to_numpy()
    return out


def window_pieces(
    positions: list[range], starts: np.ndarray, ends: np.ndarray
) -> dict[int, list[tuple[int, int]]]:
    """Window -> the slices [lo, hi) of its rows (in their shuffled order) that `positions` cover, for the
    windows holding some of them (windows [starts[w], ends[w]) of the order)."""
    pieces: dict[int, list[tuple[int, int]]] = {}
    for part in positions:
        w = int(np.searchsorted(ends, part.start, side="right"))  # the window holding position part.start
        while len(part) and w < len(ends) and starts[w] < part.stop:
            lo, hi = max(part.start, starts[w]), min(part.stop, ends[w])
            pieces.setdefault(w, []).append((int(lo - starts[w]), int(hi - starts[w])))
            w += 1
    return pieces


class RowReader:
    """Batches of one split read with pyarrow: one row group at a time (only `columns`), the next window read in
    a background thread while the loop trains on the current one. `stats` counts everything read."""

    def __init__(self, rows: RowGroups, columns: list[str], fs: pafs.FileSystem | None = None):
        self.rows, self.columns = rows, columns
        self.fs, self.root = (fs, rows.root) if fs is not None else filesystem(rows.root)
        self.counts = [g[2] for g in rows.groups]
        self.stats = ReadStats()
        self._footer: tuple[str, pq.FileMetaData] | None = None  # the last file's: stored order reads it once

    def num_batches(self, world: int, batch_size: int) -> int:
        """Micro-batches every rank trains on per epoch."""
        return len(rank_span(sum(self.counts), world, 0, batch_size)) // batch_size

    def epoch(
        self,
        epoch: int,
        rank: int,
        world: int,
        batch_size: int,
        shuffle_rows: int,
        seed: int,
        start: int = 0,
        pool: list[list[int]] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Rank `rank`'s micro-batches of `epoch` from micro-batch `start` on (a resumed run's position), its
        share cut from the positions `pool` (the trainer state's `epoch_positions`; None: the whole epoch)."""
        positions = rank_positions(sum(self.counts), world, rank, batch_size, start, pool)
        windows = epoch_windows(self.counts, shuffle_rows, seed, epoch)
        shuffle = (seed, epoch) if shuffle_rows > 0 else None
        return self._read(positions, windows, shuffle, batch_size)

    def first(self, rank: int, world: int, batch_size: int, batches: int) -> Iterator[dict[str, np.ndarray]]:
        """Validation: rank `rank`'s first `batches` batches of the stored order (its share's last may be short)."""
        span = rank_span(sum(self.counts), world, rank, batch_size, drop_last=False)
        windows = epoch_windows(self.counts, 0, 0, 0)
        return self._read([span[: batches * batch_size]], windows, None, batch_size)

    def _read(
        self,
        positions: list[range],
        windows: list[list[int]],
        shuffle: tuple[int, int] | None,
        batch_size: int,
    ) -> Iterator[dict[str, np.ndarray]]:
        """The rows at `positions` (ascending ranges of the order `windows` gives) in batches; only the
        windows holding some of them are read."""
        sizes = np.array([sum(self.counts[g] for g in w) for w in windows], dtype=np.int64)
        ends = np.cumsum(sizes)
        pieces = window_pieces(positions, ends - sizes, ends)
        todo = sorted(pieces)
        if not todo:
            return
        carry = None
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._window, windows[todo[0]])
            for i, w in enumerate(todo):
                table = pending.result()
                if i + 1 < len(todo):  # read ahead while this window is trained on
                    pending = pool.submit(self._window, windows[todo[i + 1]])
                order = np.arange(table.num_rows)
                if shuffle is not None:
                    order = np.random.default_rng([*shuffle, w]).permutation(table.num_rows)
                piece = table.take(np.concatenate([order[lo:hi] for lo, hi in pieces[w]]))
                carry = piece if carry is None else pa.concat_tables([carry, piece])
                while carry.num_rows >= batch_size:
                    yield numpy_batch(carry.slice(0, batch_size))
                    carry = carry.slice(batch_size)
        if carry is not None and carry.num_rows:  # only without drop_last: the share's short last batch
            yield numpy_batch(carry)

    def _window(self, groups: list[int]) -> pa.Table:
        return pa.concat_tables([self._group(g) for g in groups])

    def _group(self, index: int) -> pa.Table:
        """Row group `index`'s rows of the split, in stored order."""
        file, group, expected = self.rows.groups[index]
        path = f"{self.root.rstrip('/')}/{self.rows.files[file]}"
        footer = self._footer[1] if self._footer and self._footer[0] == path else None
        with self.fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f, metadata=footer)
            table = parquet.read_row_group(group, columns=self.columns)
        self._footer = (path, parquet.metadata)
        self.stats.groups += 1
        self.stats.rows += table.num_rows
        if self.rows.held_out > 0:
            keys = table.column(schema.KEY).to_pylist()
            table = table.filter(pa.array([not is_validation(k, self.rows.held_out) for k in keys]))
        if table.num_rows != expected:
            raise LatentStoreError(
                f"{path}: row group {group} holds {table.num_rows} rows of the split, RUN_DIR/data_split/"
                f"split.json says {expected}: the store changed after the run chose its split; run the same "
                "command again to choose it anew"
            )
        return table
