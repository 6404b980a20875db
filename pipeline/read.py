"""Read stage: webdataset tar shards (listed by `pipeline.shards`) -> sample rows.

A small streaming tar parser instead of `ray.data.read_webdataset`, because a damaged shard must yield
its good samples plus a recorded rejection for the rest: `read_webdataset` fails the whole job on a
non-UTF-8 caption and on a cut tar, and `max_errored_blocks` would drop the shard's good samples too.
Each shard is one Ray Data read task; it ends with an `end` row holding the shard's sample count.
Shards are listed by name (`.tar`, `.tar.gz`, `.tgz`) but decompressed by their first bytes (`open_shard`):
a crawler that gzips a shard without renaming it still writes `00002.tar`.
"""

from __future__ import annotations

import bz2
import functools
import lzma
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import stream
from pipeline.config import ReadConfig
from pipeline.schema import Reason, Stage
from pipeline.shards import Shard
from pipeline.shards import list_shards as list_shards  # re-exported: the reader's callers list with it

_BLOCK = 512
_ZERO_BLOCK = b"\0" * _BLOCK
_SKIP_CHUNK = 16 * 2**20  # bytes per read while streaming past an oversized member

# A stream's compression, from its magic number (gzip: deflate only; bz2: a block or end-of-stream marker after
# the level digit, so a plain tar whose first member is named "BZh..." stays a tar).
COMPRESSION_MAGIC = {
    "gzip": re.compile(rb"\x1f\x8b\x08"),
    "zstd": re.compile(rb"\x28\xb5\x2f\xfd"),
    "bz2": re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)"),
    "xz": re.compile(rb"\xfd7zXZ\x00"),
}
_SNIFF_BYTES = 10
_STDLIB_READERS = {"bz2": bz2.BZ2File, "xz": lzma.LZMAFile}  # where pyarrow has no codec (xz: never)


@dataclass(frozen=True)
class Skipped:
    """A tar member over the reader's byte limit: streamed past, never held in memory."""

    size: int


class TarTruncated(Exception):
    """The archive ends (or turns to garbage) before its end-of-archive marker."""

    def __init__(self, message: str, member: str | None):
        super().__init__(message)
        self.member = member  # the member being read when the data ran out (None: between members)


def _read_exact(f, n: int, what: str, member: str | None, offset: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarTruncated(f"tar ends at byte {offset + len(data)} inside {what}", member)
    return data


def _skip(f, n: int, member: str, offset: int) -> None:
    """Read past `n` bytes in chunks: an oversized member is never held in memory whole."""
    left = n
    while left:
        got = len(f.read(min(left, _SKIP_CHUNK)))
        if not got:
            raise TarTruncated(f"tar ends at byte {offset + n - left} inside member {member!r}", member)
        left -= got


def _bad_header(offset: int) -> TarTruncated:
    return TarTruncated(f"bad tar header at byte {offset} (not a tar, or garbage inside it)", None)


def _parse_header(header: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, size, typeflag) of a tar header block; `TarTruncated` when it is not a valid one."""
    try:
        stored = int(header[148:156].split(b"\0")[0].strip(), 8)
        field = header[124:136]
        if field[0] == 0x80:  # GNU base-256 size (0xff would be negative)
            size = int.from_bytes(field[1:], "big")
        else:
            size = int(field.split(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        raise _bad_header(offset) from None
    chk = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != chk and stored != chk - 256 * sum(b > 127 for b in header[:148] + header[156:]):
        raise _bad_header(offset)  # neither the unsigned nor the (old, signed) checksum
    name = header[:100].split(b"\0")[0].decode("utf-8", "replace")
    if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
        name = header[345:500].split(b"\0")[0].decode("utf-8", "replace") + "/" + name
    return name, size, header[156:157]


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ("len key=value\\n")."""
    out = {}
    for record in data.decode("utf-8", "replace").splitlines():
        k, _, v = record.partition(" ")[2].partition("=")
        out[k] = v
    return out


def iter_tar(
    f, max_member_bytes: int = ReadConfig.max_member_bytes, file_size: int | None = None
) -> Iterator[tuple[str, bytes | Skipped]]:
    """(name, bytes) of each regular file of a ustar/pax/GNU tar read sequentially from `f`; a member
    over `max_member_bytes` comes as `Skipped` (streamed past, not read into memory).

    Raises `TarTruncated` when the stream ends before the end-of-archive block, a header is garbage, or
    a header claims more bytes than the file (`file_size`, when known) holds.
    """
    offset, long_name, pax_size = 0, None, None
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise TarTruncated(
                f"tar ends at byte {offset + len(header)} without an end-of-archive marker", None
            )
        if header == _ZERO_BLOCK:
            return
        name, size, typeflag = _parse_header(header, offset)
        if pax_size is not None:  # a pax `size` record overrides the header's
            size, pax_size = pax_size, None
        member = long_name or name
        offset += _BLOCK
        pad = -size % _BLOCK
        if file_size is not None and offset + size > file_size:
            raise TarTruncated(
                f"tar ends at byte {file_size} inside member {member!r} (its header claims {size} bytes)",
                member,
            )
        if size > max_member_bytes:
            _skip(f, size + pad, member, offset)
            data: bytes | Skipped = Skipped(size)
        else:
            data = _read_exact(f, size, f"member {member!r}", member, offset)
            _read_exact(f, pad, f"the padding of {member!r}", member, offset + size)
        offset += size + pad
        if typeflag in (b"L", b"x"):  # GNU long name / pax header for the next member
            if isinstance(data, bytes) and typeflag == b"L":
                long_name = data.split(b"\0")[0].decode("utf-8", "replace")
            elif isinstance(data, bytes):
                records = _pax(data)
                long_name = records.get("path", long_name)
                if records.get("size", "").isdigit():
                    pax_size = int(records["size"])
            continue
        long_name = None
        if typeflag in (b"0", b"\0", b"7"):
            yield member, data


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/000001.mp4' -> ('dir/000001', 'mp4'); the key ends at the first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def sample_row(shard: Shard, index: int, key: str, members: dict, cfg: ReadConfig) -> dict:
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
    media_ext = video or image
    row["media"] = "video" if video else "image" if image else ""
    big = [f".{e} ({m.size} bytes)" for e, m in members.items() if isinstance(m, Skipped)]
    if big:
        msg = f"{', '.join(big)} > read.max_member_bytes={cfg.max_member_bytes}; skipped unread"
        return stream.reject(row, Stage.READ, Reason.TOO_LARGE, msg)
    if media_ext is None:
        return stream.reject(row, Stage.READ, Reason.MISSING_MEDIA, f"members: {sorted(members)}")
    row["media_bytes"] = members[media_ext]
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


def _complete(members: dict, cfg: ReadConfig) -> bool:
    has_media = any(e in members for e in (*cfg.video_exts, *cfg.image_exts))
    return has_media and cfg.caption_ext in members and "json" in members


class _ShardRows:
    """The rows of one shard as its members arrive: the sample in progress, blocks, then the `end` row."""

    def __init__(self, shard: Shard, cfg: ReadConfig):
        self.shard, self.cfg = shard, cfg
        self.key: str | None = None  # the sample in progress, not yet emitted
        self.members: dict[str, bytes | Skipped] = {}
        self.first: dict[str, int] = {}  # key -> sample_index of its first copy
        self.rows: list[dict] = []
        self.count = 0
        self.message = ""
        self.clock = [time.perf_counter()]

    def add(self, row: dict) -> Iterator[pa.Table]:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.cfg.samples_per_block:
            yield _timed_table(self.rows, self.clock)
            self.rows = []

    def member(self, key: str, ext: str, data: bytes | Skipped) -> Iterator[pa.Table]:
        """One tar member; a new key, or an extension this sample already has, starts the next sample."""
        if key != self.key or ext in self.members:
            yield from self.flush()
            self.key = key
        self.members[ext] = data

    def flush(self, reason: str | None = None, message: str = "") -> Iterator[pa.Table]:
        """Emit the sample in progress (rejected with `reason` if given; a repeated key as a duplicate)."""
        if self.key is None:
            return
        key, members, self.key, self.members = self.key, self.members, None, {}
        row = sample_row(self.shard, self.count, key, members, self.cfg)
        if key in self.first:
            msg = f"a later copy of key {key!r} (first read as sample {self.first[key]} of this shard)"
            row = stream.reject(
                row, Stage.READ, Reason.DUPLICATE_KEY, f"{msg}; {message}" if message else msg
            )
        else:
            self.first[key] = self.count
            if reason is not None:
                row = stream.reject(row, Stage.READ, reason, message)
        yield from self.add(row)

    def fault(self, reason: str, message: str) -> Iterator[pa.Table]:
        """A shard-level record (key ''): a fault no sample of the shard can carry."""
        row = sample_row(self.shard, self.count, "", {}, self.cfg)
        yield from self.add(stream.reject(row, Stage.READ, reason, f"{self.shard.uri}: {message}"))

    def truncated(self, exc: TarTruncated) -> Iterator[pa.Table]:
        """The tar ended or turned to garbage: the sample it cut is rejected, or the shard records it."""
        self.message = str(exc)
        if exc.member is not None:
            key, ext = split_key(exc.member)
            if key != self.key or ext in self.members:  # the sample in progress was finished
                yield from self.flush()
                self.key = key
        if self.key is not None and (exc.member is not None or not _complete(self.members, self.cfg)):
            yield from self.flush(Reason.SHARD_TRUNCATED, f"{exc}; later samples of this shard are lost")
        elif self.key is not None:  # cut between members, after a complete sample
            yield from self.flush()
            yield from self.fault(Reason.SHARD_TRUNCATED, f"{exc}; later samples, if any, are lost")
        else:  # not even one header: not a tar, or empty
            yield from self.fault(Reason.SHARD_UNREADABLE, str(exc))

    def failed(self, exc: Exception) -> Iterator[pa.Table]:
        """Anything unforeseen: the samples read so far stay, the sample in progress and the fault are
        recorded."""
        self.message = msg = f"{type(exc).__name__}: {exc}; later samples of this shard are lost"
        if self.key is not None and not _complete(self.members, self.cfg):
            yield from self.flush(Reason.SHARD_UNREADABLE, f"{self.shard.uri}: {msg}")
        else:
            yield from self.flush()
            yield from self.fault(Reason.SHARD_UNREADABLE, msg)

    def end(self) -> pa.Table:
        """The last block: what is left, and the `end` row with the shard's sample count."""
        s, n = self.shard, self.count
        end = {"row_kind": stream.END, "key": "", "shard": s.stem, "shard_uri": s.uri, "shard_samples": n}
        end["message"] = self.message
        return _timed_table([*self.rows, end], self.clock)


def sniff_compression(head: bytes) -> str | None:
    """The compression (`gzip`, `zstd`, `bz2`, `xz`) whose magic number starts `head`, a stream's first bytes;
    None for an uncompressed stream."""
    return next((name for name, magic in COMPRESSION_MAGIC.items() if magic.match(head)), None)


def _pyarrow_reads(compression: str) -> bool:
    try:
        return pa.Codec.is_available(compression)
    except ValueError:  # a name pyarrow has no codec for at all (xz)
        return False


class _Decompressed:
    """A stdlib decompressor over a pyarrow stream, for the codecs this pyarrow lacks; closes both."""

    def __init__(self, raw, reader):
        self.raw, self.f = raw, reader(raw)

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def __enter__(self) -> _Decompressed:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.f.close()
        finally:
            self.raw.close()


def open_shard(fs: pafs.FileSystem, shard: Shard):
    """(the shard's tar byte stream, its compression or None): decompressed by what its first bytes say, not
    its name. An `OSError` names a compression that cannot be read here."""
    with fs.open_input_stream(shard.path, compression=None) as f:
        compression = sniff_compression(f.read(_SNIFF_BYTES))
    raw = fs.open_input_stream(shard.path, compression=None)
    if compression is None:
        return raw, None
    if _pyarrow_reads(compression):
        return pa.CompressedInputStream(raw, compression), compression
    if compression in _STDLIB_READERS:
        return _Decompressed(raw, _STDLIB_READERS[compression]), compression
    raw.close()
    raise OSError(
        f"{compression}-compressed shard: not supported (this pyarrow has no {compression} codec); "
        "decompress it first"
    )


def _read_samples(shard: Shard, fs: pafs.FileSystem, cfg: ReadConfig, out: _ShardRows) -> Iterator[pa.Table]:
    try:
        f, compression = open_shard(fs, shard)
    except OSError as exc:
        yield from out.fault(Reason.SHARD_UNREADABLE, str(exc))
        return
    size = shard.size if compression is None and shard.size else None
    with f:
        try:
            for name, data in iter_tar(f, cfg.max_member_bytes, size):
                yield from out.member(*split_key(name), data)
            yield from out.flush()
        except TarTruncated as exc:
            yield from out.truncated(exc)


def read_shard(shard: Shard, fs: pafs.FileSystem, cfg: ReadConfig) -> Iterator[pa.Table]:
    """Blocks of sample rows of one shard, then its `end` row. Never raises on bad data."""
    out = _ShardRows(shard, cfg)
    try:
        yield from _read_samples(shard, fs, cfg, out)
    except Exception as exc:  # e.g. a corrupt gzip stream, an I/O error, a parser bug: the job goes on
        yield from out.failed(exc)
    yield out.end()


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
