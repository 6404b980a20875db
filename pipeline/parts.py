"""The data path stays in the workers: part files written where the clips are encoded, shards committed by tasks.

The last actor stage of the stream (the encode actors) ends with `PartWriter`: each batch's rows, grouped by
shard, go to `OUTPUT/parts/<stem>/<writer token>.<n>.parquet`, and what flows on to the driver is one small
manifest row per part (path, rows, bytes, sha256, the sample index and clip count of each row, the stage
timings) and each shard's `end` row. The driver only counts (`ShardTracker`): once every clip of every sample
of a shard is in some part, `Committer` starts `commit_shard` as a Ray task, which reads the parts back
(checking their sizes and checksums), writes the shard's `rejected/` and `clips/` files exactly as a single
writer would (`pipeline.write.ShardWriter` sorts the rows, so the files are byte-identical whichever batches
and actors the rows came through) and deletes the parts. No latent byte crosses the driver, whose CPU per clip
would otherwise cap a whole cluster (`python -m pipeline.bench_driver`).

Crash safety is the same as with one writer: a shard is complete only when both its files exist. A run killed
at any point leaves parts and temp files that the next run deletes (under the output's lock) before redoing
the shard. A part that no manifest names (written by a batch whose actor died before its manifest was out;
Ray Data retries the batch, which writes a new part under the restarted actor's token) is never read, and goes
with its shard's parts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import stream
from pipeline.write import CLIPS_DIR, REJECTED_DIR, OutputStore, ShardWriter

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
PART = "part"
PART_KEYS = ("path", "rows", "bytes", "sha256")  # what a commit needs of a part's manifest row

MANIFEST_SCHEMA = pa.schema(
    [
        ("row_kind", pa.string()),  # PART or stream.END
        ("shard", pa.string()),
        ("shard_uri", pa.string()),
        ("path", pa.string()),  # of the part, relative to the output root
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("samples", pa.list_(pa.int64())),  # sample_index of each row of the part
        ("clips", pa.list_(pa.int32())),  # clips_in_sample of each row (1 where the sample never got clips)
        ("accepted", pa.int64()),  # rows not rejected
        ("shard_samples", pa.int64()),  # end rows: samples in the shard
        ("stage_t", pa.string()),  # JSON {stage: [rows, seconds]} over the part's rows
    ]
)


class PartWriter:
    """The stream's last stage (chained into the encode actors): rows -> part files, batch -> manifest rows."""

    name = "write"

    def __init__(self, cfg: dict):
        if not cfg.get("output"):
            raise ValueError("PartWriter needs the config's `output`: the part files are written under it")
        self.store = OutputStore(cfg["output"])  # its token (host, pid, random) names this writer's parts
        self._seq = itertools.count()

    def ensure_ready(self) -> None:
        """Nothing to load (the `stream.chain` protocol)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict] = []
        shard = batch.column("shard")
        for stem in pc.unique(shard).to_pylist():
            of_shard = batch.filter(pc.equal(shard, stem))
            is_end = pc.equal(of_shard.column("row_kind"), stream.END)
            for end in of_shard.filter(is_end).select(["shard_uri", "shard_samples"]).to_pylist():
                rows.append(dict(end, row_kind=stream.END, shard=stem))
            samples = of_shard.filter(pc.invert(is_end))
            if samples.num_rows:
                t0 = time.perf_counter()
                part = self._write_part(stem, samples)
                if part["accepted"]:  # as `stream.timed`: the time goes to the rows still alive
                    timings = json.loads(part["stage_t"])
                    timings[self.name] = [part["accepted"], time.perf_counter() - t0]
                    part["stage_t"] = json.dumps(timings)
                rows.append(part)
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)

    def _write_part(self, stem: str, table: pa.Table) -> dict:
        sink = pa.BufferOutputStream()
        # A temporary file read once by the commit: uncompressed, no dictionaries (latents do not repeat).
        pq.write_table(table, sink, compression="none", use_dictionary=False)
        data = sink.getvalue()
        rel = posixpath.join(PARTS_DIR, stem, f"{self.store.token}.{next(self._seq)}.parquet")
        path = posixpath.join(self.store.root, rel)
        self.store.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.store.fs.open_output_stream(path) as f:
            f.write(data)
        # As the driver counts a shard's samples: a row without a clip count (rejected before decode) is one.
        clips = (
            table.column("clips_in_sample").to_pylist() if "clips_in_sample" in table.column_names else None
        )
        reason = table.column("reason")
        return {
            "row_kind": PART,
            "shard": stem,
            "shard_uri": table.column("shard_uri")[0].as_py(),
            "path": rel,
            "rows": table.num_rows,
            "bytes": data.size,
            "sha256": hashlib.sha256(memoryview(data)).hexdigest(),
            "samples": table.column("sample_index").to_pylist(),
            "clips": [1] * table.num_rows if clips is None else [c or 1 for c in clips],
            "accepted": int(pc.sum(pc.or_kleene(pc.is_null(reason), pc.equal(reason, ""))).as_py() or 0),
            "shard_samples": None,
            "stage_t": json.dumps(_stage_times(table)),
        }


def _stage_times(table: pa.Table) -> dict[str, list[float]]:
    """{stage: [rows that spent time in it, their seconds]} from the rows' `t_<stage>` columns."""
    out = {}
    for name in table.column_names:
        if name.startswith("t_"):
            col = pc.drop_null(table.column(name))
            col = col.filter(pc.not_equal(col, 0.0))
            if len(col):
                out[name[2:]] = [len(col), pc.sum(col).as_py()]
    return out


class ShardParts:
    """One shard as the driver sees it: its parts so far, and whether every clip of every sample is in them."""

    def __init__(self) -> None:
        self.parts: list[dict] = []
        self.expected: int | None = None  # samples in the shard, known from its `end` row
        self.shard_uri = ""
        self.samples_done = 0
        self._clips_seen: Counter[int] = Counter()

    def add(self, m: dict) -> None:
        """One manifest row (a dict of `MANIFEST_SCHEMA`)."""
        self.shard_uri = m["shard_uri"]
        if m["row_kind"] == stream.END:
            self.expected = m["shard_samples"]
        else:
            self.parts.append({k: m[k] for k in PART_KEYS})
            self.count(m["samples"], m["clips"])

    def count(self, samples: Iterable[int], clips: Iterable[int]) -> None:
        """Rows arrived: the sample index of each and its sample's clip count (a sample is done once all are in)."""
        seen = self._clips_seen
        for idx, n in zip(samples, clips, strict=True):
            seen[idx] += 1
            if seen[idx] == n:
                self.samples_done += 1

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.samples_done == self.expected


class ShardTracker:
    """The driver's bookkeeping over the manifests: the shards still open, and the stage timings summed."""

    def __init__(self) -> None:
        self.open: dict[str, ShardParts] = {}
        self.stage_t: dict[str, list[float]] = {}  # stage -> [rows, seconds]

    def add(self, batch: pa.Table) -> list[tuple[str, ShardParts]]:
        """A batch of manifest rows; returns (stem, parts) of the shards it completed."""
        done = []
        for m in batch.to_pylist():
            for stage, (n, sec) in json.loads(m["stage_t"] or "{}").items():
                acc = self.stage_t.setdefault(stage, [0, 0.0])
                acc[0], acc[1] = acc[0] + n, acc[1] + sec
            p = self.open.setdefault(m["shard"], ShardParts())
            p.add(m)
            if p.complete:
                done.append((m["shard"], self.open.pop(m["shard"])))
        return done


class Committer:
    """Commits complete shards as Ray tasks (`commit_shard`), each with the CPU share of a read task: a commit
    waits on nothing in the stream, so it always gets its turn."""

    def __init__(self, writer: ShardWriter, num_cpus: float, max_retries: int):
        import ray

        self.task = ray.remote(commit_shard).options(
            num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=[OSError]
        )
        self.writer = ray.put(writer)
        self.pending: dict = {}  # ObjectRef -> stem

    def submit(self, stem: str, parts: ShardParts) -> None:
        ref = self.task.remote(self.writer, stem, parts.shard_uri, parts.expected, parts.parts)
        self.pending[ref] = stem

    def finished(self, wait: bool = False) -> list[tuple[str, int, int]]:
        """(stem, clips, rejected) of the commits done by now (all of them with `wait`); a failed commit raises."""
        import ray

        if not self.pending:
            return []
        refs = list(self.pending)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        return [(self.pending.pop(r), *ray.get(r)) for r in ready]

    def drain(self) -> None:
        """After a failure elsewhere: wait for the commits still running, so that none writes once the run has
        released the output's lock; their own errors are logged (the first failure is the one raised)."""
        import ray

        for ref, stem in list(self.pending.items()):
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - logged; the run is failing already
                # One line: a Ray task error's str is the task's whole traceback.
                cause = getattr(exc, "cause", None) or exc
                log.warning("commit of shard %s failed too: %s: %s", stem, type(cause).__name__, cause)
        self.pending.clear()


def commit_as_complete(
    batches: Iterable[pa.Table], tracker: ShardTracker, committer: Committer
) -> Iterator[list[tuple[str, int, int]]]:
    """The driver's loop: manifest batches in, each shard's commit started as soon as the shard is complete.
    Yields after every batch the (stem, clips, rejected) of the commits finished by then, and last those still
    running when the stream ended. On any failure the running commits are waited for before it is raised."""
    try:
        for batch in batches:
            for stem, parts in tracker.add(batch):
                committer.submit(stem, parts)
            yield committer.finished()
        yield committer.finished(wait=True)
    except BaseException:
        committer.drain()
        raise


class PartCorrupt(RuntimeError):
    """A part file is not what its manifest says (size or checksum)."""


def commit_shard(writer: ShardWriter, stem: str, shard_uri: str, expected: int, parts: list[dict]) -> tuple:
    """Write shard `stem`'s files from its parts, then delete them; returns (clips, rejected).

    Runs as a Ray task. Idempotent: a retry that finds the shard complete (a crash after its renames) returns
    the counts of the files it finds.
    """
    store = writer.store
    if _complete(store, stem):
        counts = []
        for kind in (CLIPS_DIR, REJECTED_DIR):
            with store.fs.open_input_file(store.path(kind, stem)) as f:
                counts.append(pq.read_metadata(f).num_rows)
        delete_parts(store, stem)
        return tuple(counts)
    tables = []
    for part in parts:
        with store.fs.open_input_stream(posixpath.join(store.root, part["path"])) as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != part["bytes"] or digest != part["sha256"]:
            raise PartCorrupt(
                f"{part['path']}: {len(data)} bytes, sha256 {digest[:12]}; its manifest says {part['bytes']} "
                f"bytes, {part['sha256'][:12]}"
            )
        tables.append(pq.read_table(pa.BufferReader(data)))
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist() if tables else []
    counts = writer.write(stem, rows, shard_uri, expected)
    delete_parts(store, stem)
    return counts


def _complete(store: OutputStore, stem: str) -> bool:
    infos = store.fs.get_file_info([store.path(CLIPS_DIR, stem), store.path(REJECTED_DIR, stem)])
    return all(i.is_file for i in infos)


def delete_parts(store: OutputStore, stem: str | None = None) -> int:
    """Delete shard `stem`'s parts (all parts when None); returns how many files were there."""
    root = posixpath.join(store.root, PARTS_DIR, *([stem] if stem else []))
    if store.fs.get_file_info(root).type == pafs.FileType.NotFound:
        return 0
    found = store.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    store.fs.delete_dir(root)
    return sum(f.is_file for f in found)
