"""Read stage: the tar parser, damaged shards and caption decoding (no Ray needed)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline.config import ReadConfig
from pipeline.read import TarTruncated, iter_tar, list_shards, read_shard, split_key
from pipeline.schema import Reason


def rows_of(shard, fs, cfg=None):
    rows = []
    for table in read_shard(shard, fs, cfg or ReadConfig()):
        rows += table.to_pylist()
    return rows


def test_split_key_follows_webdataset():
    assert split_key("000001.mp4") == ("000001", "mp4")
    assert split_key("a/b/000001.seg.JSON") == ("a/b/000001", "seg.json")


def test_list_shards_dir_glob_and_file(demo_shards):
    _, by_dir = list_shards(str(demo_shards))
    _, by_glob = list_shards(str(demo_shards / "0000*.tar"))
    _, one = list_shards(str(demo_shards / "00001.tar"))
    assert [s.stem for s in by_dir] == [s.stem for s in by_glob] == ["00000", "00001"]
    assert [s.stem for s in one] == ["00001"]
    with pytest.raises(FileNotFoundError, match="no such"):
        list_shards(str(demo_shards / "missing"))


def test_demo_shard_reads_every_sample_once(demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    fs, shards = list_shards(str(demo_shards))
    rows = rows_of(shards[0], fs)
    samples, end = rows[:-1], rows[-1]
    expected = manifest["shards"]["00000.tar"]["samples"]
    assert [r["key"] for r in samples] == [s["key"] for s in expected]
    assert end["row_kind"] == "end" and end["shard_samples"] == len(expected)
    reasons = {r["key"].split("_bad_")[-1]: r["reason"] for r in samples}
    assert reasons["missing_txt"] == Reason.MISSING_CAPTION
    assert reasons["non_utf8_caption"] == Reason.CAPTION_NOT_UTF8
    replaced = rows_of(shards[0], fs, ReadConfig(caption_errors="replace"))
    assert "\ufffd" in next(r["caption"] for r in replaced if "non_utf8" in r["key"])


def test_cut_shard_yields_its_good_samples(tmp_path):
    from fixtures.synth import write_shards

    manifest = write_shards(
        tmp_path, shards=1, per_shard=6, frames=8, fps=8, height=32, width=32, cut_last=True
    )
    entry = manifest["shards"]["00000.tar"]
    fs, shards = list_shards(str(tmp_path))
    rows = rows_of(shards[0], fs)
    end, samples = rows[-1], rows[:-1]
    assert "tar ends" in end["message"] and end["shard_samples"] == len(samples)
    complete = [s["key"] for s in entry["samples"] if s["key"] not in entry["cut_keys"]]
    assert complete, "the cut should leave some complete samples"
    good = [r["key"] for r in samples if not r["reason"]]
    assert good == complete
    cut = [r for r in samples if r["reason"]]
    assert all(r["reason"] == Reason.SHARD_TRUNCATED and r["key"] in entry["cut_keys"] for r in cut)


def test_not_a_tar_is_one_recorded_rejection(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 10)
    fs, shards = list_shards(str(tmp_path))
    rows = rows_of(shards[0], fs)
    assert rows[0]["reason"] == Reason.SHARD_UNREADABLE and rows[-1]["shard_samples"] == 1


def test_iter_tar_requires_end_marker(demo_shards):
    data = (demo_shards / "00000.tar").read_bytes()
    assert len(list(iter_tar(io.BytesIO(data)))) == 13 * 3 - 1  # missing_txt has no .txt
    # cut exactly at a member boundary: no garbage, just no end-of-archive marker
    with tarfile.open(demo_shards / "00000.tar") as tar:
        boundary = tar.getmembers()[3].offset
    with pytest.raises(TarTruncated, match="end-of-archive"):
        list(iter_tar(io.BytesIO(data[:boundary])))
    with pytest.raises(TarTruncated, match="inside member"):
        list(iter_tar(io.BytesIO(data[: boundary + 600])))
