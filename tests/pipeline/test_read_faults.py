"""Faults inside a shard are records, never exceptions: non-tars, garbage headers, huge claimed sizes, broken
gzip, compressed shards under a plain name, duplicate keys; output names that never collide; a remote input
that fails fast (no Ray needed)."""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import logging
import lzma
import os
import socket
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import ReadConfig
from pipeline.read import list_shards, read_shard, sniff_compression
from pipeline.schema import Reason
from pipeline.shards import SHARD_EXTS, Shard, _check_unique, output_stem

MP4 = b"\0\0\0\x18ftypisom"


def sample(key: str, n: int = 100) -> list[tuple[str, bytes]]:
    """The members of one sample: (name, bytes) of its mp4 (n bytes after the magic), txt and json."""
    return [(f"{key}.mp4", MP4 + b"\1" * n), (f"{key}.txt", b"a caption"), (f"{key}.json", b"{}")]


def tar_bytes(members: list[tuple[str, bytes]], end: bool = True) -> bytes:
    """A ustar archive of `members`; without its end-of-archive blocks when `end` is False."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if end:
        return data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return data[: last.offset_data + -(-last.size // 512) * 512]


def header_offset(data: bytes, i: int) -> int:
    """Byte offset of the header of member `i`."""
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        return tar.getmembers()[i].offset


def read_all(path: Path, cfg: ReadConfig | None = None) -> tuple[list[dict], dict]:
    """(sample rows, end row) of the one shard at `path`."""
    fs, shards = list_shards(str(path))
    rows = [r for table in read_shard(shards[0], fs, cfg or ReadConfig()) for r in table.to_pylist()]
    assert rows[-1]["row_kind"] == "end" and rows[-1]["shard_samples"] == len(rows) - 1
    assert [r["sample_index"] for r in rows[:-1]] == list(range(len(rows) - 1))
    return rows[:-1], rows[-1]


def outcome(samples: list[dict]) -> list[tuple[str, str]]:
    return [(r["key"], r["reason"]) for r in samples]


def test_a_non_tar_named_tar_is_one_shard_record(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"<html><h1>403 Forbidden</h1></html>\n" * 100)
    samples, _ = read_all(tmp_path / "junk.tar")
    assert outcome(samples) == [("", Reason.SHARD_UNREADABLE)]
    assert "junk.tar" in samples[0]["message"] and "bad tar header" in samples[0]["message"]


def test_a_garbage_header_keeps_the_samples_before_it(tmp_path):
    data = bytearray(tar_bytes(sample("a") + sample("b") + sample("c")))
    at = header_offset(data, 3)  # b.mp4
    data[at + 148 : at + 156] = b"zz\0zzzz\0"  # a checksum field that is not octal
    (tmp_path / "s.tar").write_bytes(data)
    samples, end = read_all(tmp_path / "s.tar")
    assert outcome(samples) == [("a", ""), ("", Reason.SHARD_TRUNCATED)]
    assert "bad tar header at byte" in samples[1]["message"] and "s.tar" in samples[1]["message"]
    assert "bad tar header" in end["message"]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_header_claiming_1_tib_is_truncation_and_never_allocated(tmp_path, suffix):
    huge = tarfile.TarInfo("b.mp4")
    huge.size = 2**40
    data = tar_bytes(sample("a"), end=False) + huge.tobuf(format=tarfile.GNU_FORMAT) + b"\1" * 5000
    (tmp_path / f"s{suffix}").write_bytes(gzip.compress(data) if suffix.endswith("gz") else data)
    samples, end = read_all(tmp_path / f"s{suffix}")
    assert outcome(samples) == [("a", ""), ("b", Reason.SHARD_TRUNCATED)]
    assert "tar ends at byte" in samples[1]["message"] and "'b.mp4'" in end["message"]


def test_a_member_over_the_limit_is_streamed_past_and_rejected_too_large(tmp_path):
    (tmp_path / "s.tar").write_bytes(tar_bytes(sample("a", n=50_000) + sample("b")))
    samples, _ = read_all(tmp_path / "s.tar", ReadConfig(max_member_bytes=10_000))
    assert outcome(samples) == [("a", Reason.TOO_LARGE), ("b", "")]
    assert ".mp4 (50012 bytes) > read.max_member_bytes=10000" in samples[0]["message"]
    assert samples[0]["media"] == "video" and samples[1]["media_bytes"] == MP4 + b"\1" * 100


def test_gzip_shards_are_listed_and_read(tmp_path, caplog):
    data = tar_bytes(sample("a") + sample("b"))
    (tmp_path / "p.tar").write_bytes(data)
    (tmp_path / "g.tar.gz").write_bytes(gzip.compress(data))
    (tmp_path / "t.tgz").write_bytes(gzip.compress(data))
    (tmp_path / "notes.txt").write_text("not a shard")
    (tmp_path / "manifest.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="pipeline.shards"):
        fs, shards = list_shards(str(tmp_path))
    assert [s.stem for s in shards] == ["g.tar.gz", "p", "t.tgz"]
    assert "skipped 2 files" in caplog.text
    for shard in shards:
        rows = [r for table in read_shard(shard, fs, ReadConfig()) for r in table.to_pylist()]
        assert outcome(rows[:-1]) == [("a", ""), ("b", "")], shard
        assert rows[0]["media_bytes"] == MP4 + b"\1" * 100


def test_a_corrupt_gzip_keeps_what_was_read_and_records_the_fault(tmp_path):
    big = os.urandom(300_000)  # incompressible: the CRC error comes late in the stream
    gz = bytearray(
        gzip.compress(tar_bytes(sample("a") + sample("b") + [("c.mp4", MP4 + big)] + sample("c")[1:]))
    )
    gz[-8:-4] = bytes(b ^ 0xFF for b in gz[-8:-4])  # the gzip trailer's CRC
    (tmp_path / "s.tar.gz").write_bytes(gz)
    samples, end = read_all(tmp_path / "s.tar.gz")
    assert outcome(samples)[:2] == [("a", ""), ("b", "")]
    assert [r["key"] for r in samples if r["key"]] in (["a", "b"], ["a", "b", "c"])  # c: cut, or read whole
    fault = samples[-1]
    assert fault["reason"] == Reason.SHARD_UNREADABLE
    assert "s.tar.gz" in fault["message"] and "OSError" in fault["message"] and "OSError" in end["message"]


def zstd_compress(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as f:
        f.write(data)
    return sink.getvalue().to_pybytes()


COMPRESS = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zstd": zstd_compress}


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_a_compressed_shard_is_read_by_its_bytes_whatever_its_name(tmp_path, kind):
    # What a crawler that compresses without renaming writes: `00002.tar` holding a gzip (or zstd, ...) stream.
    members = sample("a") + sample("b")[::2] + sample("c")  # b has no caption: a per-key rejection
    plain = tar_bytes(members)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "00002.tar").write_bytes(plain)
    (tmp_path / "00002.tar").write_bytes(COMPRESS[kind](plain))
    (tmp_path / "plain_named.tar.gz").write_bytes(plain)  # and the other way round: a plain tar named .tar.gz
    assert sniff_compression((tmp_path / "00002.tar").read_bytes()[:10]) == kind
    expected, _ = read_all(tmp_path / "plain" / "00002.tar")
    assert outcome(expected) == [("a", ""), ("b", Reason.MISSING_CAPTION), ("c", "")]
    for name in ("00002.tar", "plain_named.tar.gz"):
        samples, end = read_all(tmp_path / name)
        assert outcome(samples) == outcome(expected) and end["message"] == "", name
        assert [r["media_bytes"] for r in samples] == [r["media_bytes"] for r in expected]


def test_a_plain_tar_whose_first_member_looks_like_a_magic_number_stays_a_tar(tmp_path):
    (tmp_path / "s.tar").write_bytes(tar_bytes(sample("BZh9") + sample("x")))
    assert sniff_compression((tmp_path / "s.tar").read_bytes()[:10]) is None
    samples, _ = read_all(tmp_path / "s.tar")
    assert outcome(samples) == [("BZh9", ""), ("x", "")]


class _CodecsWithout:
    """`pyarrow.Codec` of a build without some codecs."""

    def __init__(self, *missing: str):
        self.missing = missing

    def is_available(self, name: str) -> bool:
        return name not in self.missing


def test_codecs_pyarrow_lacks_are_read_by_python_or_named_in_the_rejection(tmp_path, monkeypatch):
    plain = tar_bytes(sample("a"))
    (tmp_path / "b.tar").write_bytes(bz2.compress(plain))
    (tmp_path / "z.tar").write_bytes(zstd_compress(plain))
    monkeypatch.setattr(pa, "Codec", _CodecsWithout("bz2", "zstd"))
    samples, _ = read_all(tmp_path / "b.tar")  # Python's bz2 module reads it instead
    assert outcome(samples) == [("a", "")]
    samples, end = read_all(tmp_path / "z.tar")  # no reader here: the shard's one record says why
    assert outcome(samples) == [("", Reason.SHARD_UNREADABLE)]
    assert (
        "z.tar" in samples[0]["message"] and "zstd-compressed shard: not supported" in samples[0]["message"]
    )
    assert "decompress it first" in samples[0]["message"]


def test_duplicate_keys_keep_the_first_copy(tmp_path):
    members = sample("a", n=1) + sample("a", n=2) + sample("b") + sample("a", n=3)
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    samples, _ = read_all(tmp_path / "s.tar")
    dup = Reason.DUPLICATE_KEY
    assert outcome(samples) == [("a", ""), ("a", dup), ("b", ""), ("a", dup)]
    assert samples[0]["media_bytes"] == MP4 + b"\1"
    assert "first read as sample 0" in samples[1]["message"] and samples[3]["media_bytes"] == b""


def test_output_names_are_one_to_one_and_keep_plain_names(tmp_path):
    names = ["a/b.tar", "a__b.tar", "a.tar", "a.tar.gz", "a.tgz", "a.tar.tar", "x.tar", "_y_.tar", "p%5F.tar"]
    data = tar_bytes(sample("k"))
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(("gz", "tgz")) else data)
    _, shards = list_shards(str(tmp_path))
    stems = {Path(s.path).relative_to(tmp_path).as_posix(): s.stem for s in shards}
    assert set(stems) == set(names) and len(set(stems.values())) == len(names)
    assert stems["a/b.tar"] == "a__b" and stems["a__b.tar"] == "a_%5Fb"
    assert stems["x.tar"] == "x" and stems["a.tar"] == "a" and stems["a.tar.gz"] == "a.tar.gz"


def test_output_stem_is_one_to_one_on_tricky_paths():
    parts = ["a", "_", "__", "a_", "_a", "a__", "%", "%5F", "a.tar", "a.tgz"]
    paths = [
        "/".join(p) + ext for n in (1, 2) for p in itertools.product(parts, repeat=n) for ext in SHARD_EXTS
    ]
    assert len({output_stem(p) for p in paths}) == len(paths)


def test_two_shards_with_one_output_name_are_refused():
    shards = [Shard(uri="in/a.tar", path="in/a.tar", stem="a", size=1), Shard("in/b", "in/b", "a", 1)]
    with pytest.raises(ValueError, match="both map to output name 'a'"):
        _check_unique(shards)


def test_an_s3_endpoint_that_never_answers_fails_fast_naming_the_uri(monkeypatch):
    for var, value in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")]:
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []  # accepted and never answered

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    uri = f"s3://bucket/shards?endpoint_override=127.0.0.1:{server.getsockname()[1]}&scheme=http"
    t0 = time.monotonic()
    try:
        with pytest.raises(FileNotFoundError) as err:  # what the CLI prints, exiting 2
            list_shards(uri)
    finally:
        server.close()
        for conn in held:
            conn.close()
    elapsed = time.monotonic() - t0
    print(f"s3 listing against a silent endpoint failed after {elapsed:.1f} s")
    assert elapsed < 30, elapsed
    assert uri in str(err.value) and "does not answer" in str(err.value)
