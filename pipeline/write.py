"""Writing a shard: one clips file and one rejected file per input shard, atomically.

`ShardWriter` turns a complete shard's rows into its two tables and writes them to temp names, then renames:
`rejected/<stem>.parquet` first, `clips/<stem>.parquet` last. A shard is complete when both exist, so a run
killed at any point leaves either a complete shard (skipped on re-run) or a partial one (redone; its leftovers
are removed first). Rows are sorted by (key, clip_index) so a re-run writes the same files. It runs in the
commit tasks of `pipeline.parts`, never on the driver.

One run writes an output at a time: `OutputLock` holds `OUTPUT/pipeline.lock` (owner host, pid, heartbeat) for
the whole run, and every writer's temp names are its own, so a second run can neither rename another's half
written file nor delete it as a leftover.

A full disk is the same as a kill: a temp file is left, and the next run removes it. `out_of_space` finds one in
whatever Ray wrapped it in, so the CLIs (`pipeline.run`, and `training.run` for its checkpoints) can say so in one
line (`OutOfSpace`) instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline import stream
from pipeline.configlib import ConfigError

log = logging.getLogger(__name__)

CLIPS_DIR, REJECTED_DIR = "clips", "rejected"

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads where it arrives without its errno: Ray's re-raised worker errors, safetensors' Rust error.
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28")


class OutOfSpace(RuntimeError):
    """A write failed because its disk (or quota) is full; the message says what is kept and how to resume."""


def find_error(exc: BaseException, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first error in `exc`'s chain that `match`es: causes and contexts, a Ray task error's `cause`, and a
    Ray Train run's `worker_failures` and `controller_failure` (Ray re-raises a worker's error wrapped)."""
    todo: list = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if match(e):
            return e
        failures = getattr(e, "worker_failures", None)
        wrapped = [getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        todo += [e.__cause__, e.__context__, *wrapped]
        todo += list(failures.values()) if isinstance(failures, dict) else []
    return None


def _no_space(e: BaseException) -> bool:
    if isinstance(e, OutOfSpace) or (isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS):
        return True
    return any(text in str(e) for text in NO_SPACE_TEXT)


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or an error it wraps) is a full disk or an exceeded quota."""
    return find_error(exc, _no_space) is not None


class OutputStore:
    """`OUTPUT/clips/`, `OUTPUT/rejected/` on a local path or any pyarrow filesystem URI."""

    def __init__(self, output: str):
        if "://" in output:
            self.fs, self.root = pafs.FileSystem.from_uri(output)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(output)
        # Temp names unique to this writer: two writers never share (or rename) one half-written file.
        self.token = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        for d in (CLIPS_DIR, REJECTED_DIR):
            self.fs.create_dir(posixpath.join(self.root, d), recursive=True)

    def path(self, kind: str, stem: str, suffix: str = "") -> str:
        return posixpath.join(self.root, kind, f"{stem}.parquet{suffix}")

    def _list(self, kind: str) -> list[str]:
        entries = self.fs.get_file_info(
            pafs.FileSelector(posixpath.join(self.root, kind), allow_not_found=True)
        )
        return [e.base_name for e in entries if e.is_file]

    def complete_stems(self) -> set[str]:
        clips = {n[: -len(".parquet")] for n in self._list(CLIPS_DIR) if n.endswith(".parquet")}
        rejected = {n[: -len(".parquet")] for n in self._list(REJECTED_DIR) if n.endswith(".parquet")}
        return clips & rejected

    def remove_partials(self) -> list[str]:
        """Delete temp files and half-written shards (rejected file without its clips file)."""
        done, removed = self.complete_stems(), []
        for kind in (CLIPS_DIR, REJECTED_DIR):
            for name in self._list(kind):
                if not name.endswith(".parquet") or name[: -len(".parquet")] not in done:
                    self.fs.delete_file(posixpath.join(self.root, kind, name))
                    removed.append(f"{kind}/{name}")
        return removed

    def read_schema(self, stem: str) -> pa.Schema:
        with self.fs.open_input_file(self.path(CLIPS_DIR, stem)) as f:
            return pq.read_schema(f)

    def read(self, kind: str, stem: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self.path(kind, stem)) as f:
            return pq.read_table(f, columns=columns)

    def write_atomic(
        self, table: pa.Table, kind: str, stem: str, row_group_size: int, compression: str
    ) -> None:
        tmp, final = self.path(kind, stem, f".{self.token}.tmp"), self.path(kind, stem)
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(
                table,
                f,
                row_group_size=row_group_size,
                compression=compression,
                use_dictionary=dictionary_columns(table.schema),
            )
        self.fs.move(tmp, final)

    def write_text(self, name: str, text: str | bytes) -> None:
        final = posixpath.join(self.root, name)
        tmp = f"{final}.{self.token}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode() if isinstance(text, str) else text)
        self.fs.move(tmp, final)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding: all but tensors (lists and tensor extension types), whose values
    rarely repeat: a dictionary over half floats is most of a clip's write time. Measured on 64 SD-sized clips
    (24 x 4 x 32 x 32 fp16 latents + 77 x 768 fp16 embeddings, zstd), alternating in one run: 1.7x faster
    without it, the file 2% smaller."""

    def tensor(t: pa.DataType) -> bool:
        if isinstance(t, pa.ExtensionType):
            t = t.storage_type
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    return [f.name for f in schema if not tensor(f.type)]


class OutputLocked(ConfigError):
    """Another run holds the output's lock."""


class OutputLock:
    """`OUTPUT/pipeline.lock`: one run writes an output at a time.

    The lock records the owner's host, pid and a heartbeat that a thread refreshes every `stale_s / 5` s. A lock
    is stale, and taken over with a warning, when its owner is a dead pid on this host or its heartbeat is older
    than `stale_s` (a run on another host killed without cleanup). On a local disk the lock is created with
    O_EXCL; object stores have no exclusive create, so there the lock is written, read back and checked to be
    ours (two runs started within the same moment could both pass: start runs on one output one at a time).
    """

    NAME = "pipeline.lock"

    def __init__(self, store: OutputStore, stale_s: float):
        self.store, self.stale_s = store, stale_s
        self.path = posixpath.join(store.root, self.NAME)
        self.local = isinstance(store.fs, pafs.LocalFileSystem)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": store.token}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.store.fs.open_input_stream(self.path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # unreadable or half written: treat as stale, say so
            return {"host": "?", "pid": -1, "heartbeat": 0.0, "error": str(exc)}

    def _stale(self, lock: dict) -> str | None:
        """Why `lock` is stale (None: its owner may be running)."""
        age = time.time() - float(lock.get("heartbeat", 0.0))
        if lock.get("host") == self.owner["host"] and not _pid_alive(int(lock.get("pid", -1))):
            return f"its owner pid {lock.get('pid')} on this host is not running"
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (write.lock_stale_s={self.stale_s:g})"
        return None

    def _write(self, exclusive: bool) -> None:
        data = json.dumps(dict(self.owner, heartbeat=time.time(), since=self.since)).encode()
        if exclusive and self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise OutputLocked(f"{self.store.root} was locked by another run a moment ago") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        tmp = f"{self.path}.{self.store.token}.tmp"
        with self.store.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.store.fs.move(tmp, self.path)

    def acquire(self) -> None:
        lock = self._read()
        if lock is not None:
            why = self._stale(lock)
            if why is None:
                raise OutputLocked(
                    f"{self.store.root} is being written by another run (host {lock.get('host')}, pid "
                    f"{lock.get('pid')}, since {time.ctime(float(lock.get('since', 0)))}); wait for it, or if it "
                    f"is gone, delete {self.path} (it goes stale by itself after write.lock_stale_s={self.stale_s:g} s)"
                )
            log.warning("taking over the stale lock of %s: %s (%s)", self.store.root, why, lock)
            self.store.fs.delete_file(self.path)
        self.since = time.time()
        self._write(exclusive=True)
        held = self._read()
        if not held or held.get("token") != self.owner["token"]:
            raise OutputLocked(f"{self.store.root}: another run took the lock at the same moment ({held})")
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_s / 5):
            try:
                self._write(exclusive=False)
            except OSError as exc:  # a storage hiccup: the next beat tries again
                log.warning("could not refresh %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("token") == self.owner["token"]:
            self.store.fs.delete_file(self.path)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _score(x) -> float | None:
    """A score for Parquet: null (not NaN) where it was never computed (filter off, one frame, rejected
    before scoring), so SQL engines and pandas see a missing value, not a number."""
    return None if x is None or x != x else float(x)


class ShardWriter:
    """Turns a complete shard's rows into its clips and rejected tables (see `pipeline.schema`)."""

    def __init__(
        self,
        store: OutputStore,
        views: dict[str, dict],
        primary: str,
        latents_dtype: str,
        prompt_embeds_shape: list[int] | None,
        metadata: dict,
        row_group_size: int,
        compression: str,
    ):
        self.store, self.views, self.primary = store, views, primary
        self.latents_dtype, self.pe_shape, self.metadata = latents_dtype, prompt_embeds_shape, metadata
        self.row_group_size, self.compression = row_group_size, compression

    def _clip_frames(self, row: dict) -> int:
        return len(row[f"frame_indices__{self.primary}"] or b"") // 4

    def write(self, stem: str, rows: list[dict], shard_uri: str, shard_samples: int) -> tuple[int, int]:
        """Write one shard from all its rows (stream rows, any order) and its sample count; returns (clips,
        rejected)."""
        rows = sorted(
            rows,
            key=lambda r: (
                r["key"],
                -1 if r.get("clip_index") is None else r["clip_index"],
                r["sample_index"],
            ),
        )
        ok = [r for r in rows if not r["reason"]]
        if ok:  # a shard mixing images (1 frame) and videos: keep the majority latent shape
            frames = Counter(self._clip_frames(r) for r in ok).most_common(1)[0][0]
            for r in ok:
                if self._clip_frames(r) != frames:
                    stream.reject(
                        r,
                        S.Stage.WRITE,
                        S.Reason.MIXED_SHAPES,
                        f"{self._clip_frames(r)} frames; this shard's clips have {frames}",
                    )
            ok = [r for r in ok if not r["reason"]]
        else:
            frames = None
        rejected = [r for r in rows if r["reason"]]
        meta = dict(self.metadata, **{S.META_SHARD: shard_uri, S.META_SHARD_SAMPLES: shard_samples})
        self.store.write_atomic(
            self.rejected_table(rejected), REJECTED_DIR, stem, self.row_group_size, self.compression
        )
        self.store.write_atomic(
            self.clips_table(ok, frames, meta), CLIPS_DIR, stem, self.row_group_size, self.compression
        )
        return len(ok), len(rejected)

    def rejected_table(self, rows: list[dict]) -> pa.Table:
        cols = {
            S.KEY: [r["key"] for r in rows],
            S.SHARD: [r["shard_uri"] for r in rows],
            S.CLIP_INDEX: [-1 if r.get("clip_index") is None else r["clip_index"] for r in rows],
            S.STAGE: [r["stage"] for r in rows],
            S.REASON: [r["reason"] for r in rows],
            S.MESSAGE: [r["message"] or "" for r in rows],
        }
        for score in S.SCORES:
            cols[score] = [_score(r.get(score)) for r in rows]
        return pa.table(cols, schema=S.REJECTED_SCHEMA)

    def clips_table(self, rows: list[dict], frames: int | None, meta: dict) -> pa.Table:
        views = {}
        for name, v in self.views.items():
            f = 1 if frames == 1 else v["num_frames"]  # image shards: one frame in every view
            views[name] = dict(v, latents_shape=[f, *v["latents_shape"][1:]])
        sch = S.clips_schema(views, self.primary, self.latents_dtype, self.pe_shape, meta)
        cols: dict[str, pa.Array | list] = {
            S.KEY: [r["key"] for r in rows],
            S.SHARD: [r["shard_uri"] for r in rows],
            S.CLIP_INDEX: [r["clip_index"] for r in rows],
            S.MEDIA: [r["media"] for r in rows],
            S.CAPTION: [r["caption"] for r in rows],
            S.START_S: [r["start_s"] for r in rows],
            S.SOURCE_FPS: [r["source_fps"] for r in rows],
            S.SOURCE_HEIGHT: [r["source_height"] for r in rows],
            S.SOURCE_WIDTH: [r["source_width"] for r in rows],
        }
        for score in S.SCORES:
            cols[score] = [_score(r.get(score)) for r in rows]
        for name, v in views.items():
            col = lambda n, name=name: S.view_column(n, name, self.primary)  # noqa: E731
            indices = [np.frombuffer(r[f"frame_indices__{name}"], np.int32).tolist() for r in rows]
            cols[col(S.FRAME_INDICES)] = indices
            cols[col(S.FPS)] = [r[f"fps__{name}"] for r in rows]
            cols[col(S.NUM_FRAMES)] = [len(i) for i in indices]
            cols[col(S.HEIGHT)] = [v["height"]] * len(rows)
            cols[col(S.WIDTH)] = [v["width"]] * len(rows)
            cols[col(S.LATENTS)] = self._tensor(
                rows, f"latents__{name}", self.latents_dtype, v["latents_shape"]
            )
        if self.pe_shape is not None:
            cols[S.PROMPT_EMBEDS] = self._tensor(rows, "prompt_embeds", "float16", self.pe_shape)
        arrays = [
            cols[f.name] if isinstance(cols[f.name], pa.Array) else pa.array(cols[f.name], f.type)
            for f in sch
        ]
        return pa.Table.from_arrays(arrays, schema=sch)

    @staticmethod
    def _tensor(rows: list[dict], column: str, dtype: str, shape: list[int]) -> pa.Array:
        """Arrow fixed-shape tensor column (N, *shape) from per-row bytes (also for N = 0)."""
        flat = np.concatenate([np.frombuffer(r[column], dtype) for r in rows]) if rows else np.zeros(0, dtype)
        if flat.size != len(rows) * int(np.prod(shape)):
            raise ValueError(f"{column}: {flat.size} values for {len(rows)} rows of shape {shape}")
        storage = pa.FixedSizeListArray.from_arrays(pa.array(flat), int(np.prod(shape)))
        return pa.ExtensionArray.from_storage(S.tensor_type(dtype, shape), storage)
