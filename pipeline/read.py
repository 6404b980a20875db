"""Read stage: webdataset tar shards (local dir, glob or any pyarrow-filesystem URI) -> sample rows.

A small streaming tar parser instead of `ray.data.read_webdataset`, because a damaged shard must yield
its good samples plus a recorded rejection for the rest: `read_webdataset` fails the whole job on a
non-UTF-8 caption and on a cut tar, and `max_errored_blocks` would drop the shard's good samples too.
Each shard is one Ray Data read task; it ends with an `end` row holding the shard's sample count.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import stream
from pipeline.config import ReadConfig
from pipeline.raysession import where_resolved
from pipeline.schema import Reason, Stage

_BLOCK = 512


@dataclass(frozen=True)
class Shard:
    uri: str
    """The shard as the user would name it (path or URI); recorded in the outputs."""
    path: str
    """Path inside `filesystem`."""
    stem: str
    """Output file stem: path relative to the input root, `/` -> `__`, without `.tar`."""
    size: int


class TarTruncated(Exception):
    """The archive ends (or turns to garbage) before its end-of-archive marker."""

    def __init__(self, message: str, member: str | None):
        super().__init__(message)
        self.member = member  # the member being read when the data ran out (None: between members)


def list_shards(spec: str) -> tuple[pafs.FileSystem, list[Shard]]:
    """All `.tar` shards named by `spec`: a file, a directory (recursive), a glob, or a URI of those."""
    glob_at = min((spec.index(c) for c in "*?[" if c in spec), default=-1)
    base = spec if glob_at < 0 else spec[:glob_at].rpartition("/")[0] or "."
    if "://" in spec:
        fs, base_path = pafs.FileSystem.from_uri(base)
        uri_prefix = base[: len(base) - len(base_path)] if base.endswith(base_path) else None
    else:
        fs, base_path, uri_prefix = pafs.LocalFileSystem(), os.path.abspath(base), None
    info = fs.get_file_info(base_path)
    if glob_at >= 0:
        pattern = base_path.rstrip("/") + spec[len(base.rstrip("/")) :]
        entries = fs.get_file_info(pafs.FileSelector(base_path, recursive=True, allow_not_found=True))
        files = [e for e in entries if e.is_file and fnmatch.fnmatch(e.path, pattern)]
        root = base_path
    elif info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
        files = [e for e in entries if e.is_file and e.path.endswith(".tar")]
        root = base_path
    elif info.type == pafs.FileType.File:
        files, root = [info], posixpath.dirname(base_path)
    else:
        raise FileNotFoundError(
            f"--input {spec!r}: no such file, directory or glob match{where_resolved(spec)}"
        )
    files = [f for f in files if f.path.endswith(".tar")]
    if not files:
        raise FileNotFoundError(f"--input {spec!r}: no .tar shards found")
    shards = []
    for f in files:
        rel = posixpath.relpath(f.path, root)
        uri = f"{uri_prefix}{f.path}" if uri_prefix is not None else f.path
        shards.append(
            Shard(uri=uri, path=f.path, stem=rel[: -len(".tar")].replace("/", "__"), size=f.size or 0)
        )
    return fs, sorted(shards, key=lambda s: s.stem)


def _read_exact(f, n: int, what: str, member: str | None, offset: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarTruncated(f"tar ends at byte {offset + len(data)} inside {what}", member)
    return data


def iter_tar(f) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a ustar/pax/GNU tar read sequentially from `f`.

    Raises `TarTruncated` when the stream ends before the end-of-archive block or a header is garbage.
    """
    offset, long_name = 0, None
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise TarTruncated(
                f"tar ends at byte {offset + len(header)} without an end-of-archive marker", None
            )
        if header == b"\0" * _BLOCK:
            return
        stored = header[148:156].split(b"\0")[0].strip()
        chk = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if not stored or int(stored, 8) != chk:
            raise TarTruncated(f"bad tar header checksum at byte {offset}", None)
        name = header[:100].split(b"\0")[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0")[0].decode("utf-8", "replace") + "/" + name
        size_field = header[124:136]
        if size_field[0] & 0x80:  # GNU base-256 size
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.split(b"\0")[0].strip() or b"0", 8)
        typeflag = header[156:157]
        member = long_name or name
        offset += _BLOCK
        data = _read_exact(f, size, f"member {member!r}", member, offset)
        _read_exact(f, -size % _BLOCK, f"the padding of {member!r}", member, offset + size)
        offset += size + (-size % _BLOCK)
        if typeflag == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0")[0].decode("utf-8", "replace")
            continue
        if typeflag == b"x":  # pax extended header: "len key=value\n" records
            for record in data.decode("utf-8", "replace").splitlines():
                k, _, v = record.partition(" ")[2].partition("=")
                if k == "path":
                    long_name = v
            continue
        long_name = None
        if typeflag in (b"0", b"\0", b"7"):
            yield member, data


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/000001.mp4' -> ('dir/000001', 'mp4'); the key ends at the first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def sample_row(shard: Shard, index: int, key: str, members: dict[str, bytes], cfg: ReadConfig) -> dict:
    """One sample row from its tar members, rejected with a reason if a member is missing or unreadable."""
    row = {
        "row_kind": stream.SAMPLE,
        "key": key,
        "shard": shard.stem,
        "shard_uri": shard.uri,
        "sample_index": index,
        "media": "",
        "media_bytes": b"",
        "caption": "",
        "meta_json": "",
        "stage": "",
        "reason": "",
        "message": "",
    }
    video = next((e for e in cfg.video_exts if e in members), None)
    image = next((e for e in cfg.image_exts if e in members), None)
    if video is not None:
        row["media"], row["media_bytes"] = "video", members[video]
    elif image is not None:
        row["media"], row["media_bytes"] = "image", members[image]
    else:
        return stream.reject(row, Stage.READ, Reason.MISSING_MEDIA, f"members: {sorted(members)}")
    row["meta_json"] = members.get("json", b"{}").decode("utf-8", "replace")
    if cfg.caption_ext not in members:
        return stream.reject(
            row, Stage.READ, Reason.MISSING_CAPTION, f"no .{cfg.caption_ext}; members: {sorted(members)}"
        )
    raw = members[cfg.caption_ext]
    try:
        row["caption"] = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        if cfg.caption_errors == "reject":
            return stream.reject(row, Stage.READ, Reason.CAPTION_NOT_UTF8, f"{exc}; bytes {raw[:80]!r}")
        row["caption"] = raw.decode("utf-8", "replace").strip()
    return row


def _complete(members: dict[str, bytes], cfg: ReadConfig) -> bool:
    has_media = any(e in members for e in (*cfg.video_exts, *cfg.image_exts))
    return has_media and cfg.caption_ext in members and "json" in members


def read_shard(shard: Shard, fs: pafs.FileSystem, cfg: ReadConfig) -> Iterator[pa.Table]:
    """Blocks of sample rows of one shard, then its `end` row. Never raises on bad data."""
    clock = [time.perf_counter()]
    rows: list[dict] = []
    count = 0
    end = {"row_kind": stream.END, "key": "", "shard": shard.stem, "shard_uri": shard.uri, "message": ""}

    def add(row: dict) -> Iterator[pa.Table]:
        nonlocal rows, count
        rows.append(row)
        count += 1
        if len(rows) >= cfg.samples_per_block:
            yield _timed_table(rows, clock)
            rows = []

    try:
        f = fs.open_input_stream(shard.path)
    except OSError as exc:
        bad = sample_row(shard, 0, "", {}, cfg)
        yield from add(stream.reject(bad, Stage.READ, Reason.SHARD_UNREADABLE, str(exc)))
    else:
        with f:
            key, members = None, {}
            try:
                for name, data in iter_tar(f):
                    k, ext = split_key(name)
                    if k != key:
                        if key is not None:
                            yield from add(sample_row(shard, count, key, members, cfg))
                        key, members = k, {}
                    members[ext] = data
                if key is not None:
                    yield from add(sample_row(shard, count, key, members, cfg))
            except TarTruncated as exc:
                end["message"] = str(exc)
                cut_key = split_key(exc.member)[0] if exc.member else None
                if cut_key is not None and cut_key != key:  # the previous sample was finished
                    if key is not None:
                        yield from add(sample_row(shard, count, key, members, cfg))
                    key, members = cut_key, {}
                if key is not None and (cut_key is not None or not _complete(members, cfg)):
                    row = sample_row(shard, count, key, members, cfg)
                    msg = f"{exc}; later samples of this shard are lost"
                    yield from add(stream.reject(row, Stage.READ, Reason.SHARD_TRUNCATED, msg))
                elif key is not None:  # cut between members, after a complete sample
                    yield from add(sample_row(shard, count, key, members, cfg))
                else:  # not even one header: not a tar, or empty
                    bad = sample_row(shard, 0, "", {}, cfg)
                    yield from add(stream.reject(bad, Stage.READ, Reason.SHARD_UNREADABLE, str(exc)))
    end["shard_samples"] = count
    rows.append(end)
    yield _timed_table(rows, clock)


def _timed_table(rows: list[dict], clock: list[float]) -> pa.Table:
    samples = [r for r in rows if r["row_kind"] == stream.SAMPLE]
    now = time.perf_counter()
    share, clock[0] = (now - clock[0]) / max(len(samples), 1), now
    for r in rows:
        r["t_read"] = share if r["row_kind"] == stream.SAMPLE else 0.0
    return stream.to_table(rows, stream.READ_COLUMNS)


class ShardDatasource(Datasource):
    """One read task per shard (so a shard's rows and its `end` row come from one task)."""

    def __init__(self, shards: list[Shard], fs: pafs.FileSystem, cfg: ReadConfig):
        super().__init__()
        self.shards, self.fs, self.cfg = shards, fs, cfg

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(s.size for s in self.shards) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_shard, shard, self.fs, self.cfg),
                BlockMetadata(
                    num_rows=None, size_bytes=shard.size or None, input_files=[shard.uri], exec_stats=None
                ),
            )
            for shard in self.shards
        ]
