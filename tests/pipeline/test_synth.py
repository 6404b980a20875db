"""Demo shards are real WebVid-format webdataset tars: members, json fields, decord, Ray Data."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict

import decord
import numpy as np
import pytest

from pipeline.synth import BAD_KINDS, render, sample_scene, write_shards

WEBVID_FIELDS = {"videoid", "contentUrl", "duration", "page_dir", "name"}
VIDEO2DATASET_FIELDS = {"url", "key", "status", "error_message", "caption", "video_metadata"}


def _members(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples[key][ext] = tar.extractfile(m).read()
    return samples


def test_good_samples_have_webvid_members_and_decode(demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["00000.tar", "00001.tar"]
    samples = _members(demo_shards / "00000.tar")
    good = [k for k in samples if "_bad_" not in k]
    assert len(good) == 4
    for key in good:
        assert set(samples[key]) == {"mp4", "txt", "json"}
        meta = json.loads(samples[key]["json"])
        assert WEBVID_FIELDS | VIDEO2DATASET_FIELDS <= set(meta)
        assert meta["key"] == key and meta["duration"] == "PT00H00M03S"  # 24 frames at 8 fps
        caption = samples[key]["txt"].decode("utf-8")
        assert caption == meta["caption"] == meta["name"] and caption.startswith("a ")
        reader = decord.VideoReader(io.BytesIO(samples[key]["mp4"]))
        assert len(reader) == 24 and reader.get_avg_fps() == pytest.approx(8.0)
        frames = reader.get_batch([0, 23]).asnumpy()
        assert frames.shape == (2, 64, 64, 3)
        assert (
            samples[key]["mp4"][4:8] == b"ftyp" and b"avc1" in samples[key]["mp4"][:4096]
        )  # H.264, moov first
        del reader


def test_caption_describes_the_motion():
    # "moves from left to right": the shape's centre of mass must travel right.
    rng = np.random.default_rng(0)
    scene = next(s for s in (sample_scene(rng) for _ in range(200)) if s.motion == "moves from left to right")
    frames = render(scene, 8, 64, 64).astype(np.float32)
    diff = np.abs(frames - frames[:, :, :1].mean(axis=(0, 1), keepdims=True)).sum(-1)  # far from bg column
    xs = [np.average(np.arange(64), weights=d.sum(0) + 1e-6) for d in diff]
    assert xs[-1] - xs[0] > 20, xs
    assert "left to right" in scene.caption


def test_bad_samples_are_what_their_key_says(demo_shards):
    samples = _members(demo_shards / "00001.tar")
    bad = {k.split("_bad_")[1]: v for k, v in samples.items() if "_bad_" in k}
    assert set(bad) == set(BAD_KINDS)
    assert bad["zero_bytes"]["mp4"] == b""
    assert b"<html>" in bad["not_video"]["mp4"]
    assert "txt" not in bad["missing_txt"]
    with pytest.raises(UnicodeDecodeError):
        bad["non_utf8_caption"]["txt"].decode("utf-8")
    assert bad["empty_caption"]["txt"].strip() == b""
    assert len(decord.VideoReader(io.BytesIO(bad["one_frame"]["mp4"]))) == 1
    assert len(decord.VideoReader(io.BytesIO(bad["too_short"]["mp4"]))) == 3
    stream = json.loads(bad["huge_resolution"]["json"])["video_metadata"]["streams"][0]
    assert stream["width"] == stream["height"] == 100_000
    with pytest.raises(decord.DECORDError):
        decord.VideoReader(io.BytesIO(bad["truncated"]["mp4"])).get_batch(list(range(24)))


def test_deterministic_bytes(tmp_path):
    a = write_shards(tmp_path / "a", shards=1, per_shard=2, frames=6, seed=3)
    b = write_shards(tmp_path / "b", shards=1, per_shard=2, frames=6, seed=3)
    assert a == b
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()
    c = write_shards(tmp_path / "c", shards=1, per_shard=2, frames=6, seed=4)
    assert (tmp_path / "c/00000.tar").read_bytes() != (tmp_path / "a/00000.tar").read_bytes()
    assert c["shards"]["00000.tar"]["samples"][0]["key"] == "000000000"


def test_image_shards(image_shards):
    samples = _members(image_shards / "00000.tar")
    assert len(samples) == 6
    for members in samples.values():
        assert set(members) == {"jpg", "txt", "json"}
        from PIL import Image

        assert Image.open(io.BytesIO(members["jpg"])).size == (64, 64)


def test_cut_last_shard_records_lost_keys(tmp_path):
    m = write_shards(tmp_path, shards=2, per_shard=3, frames=6, bad=True, cut_last=True)
    lost = m["shards"]["00001.tar"]["cut_keys"]
    assert lost and set(lost) < {s["key"] for s in m["shards"]["00001.tar"]["samples"]}
    with pytest.raises(tarfile.ReadError):
        with tarfile.open(tmp_path / "00001.tar") as tar:
            for member in tar:
                tar.extractfile(member).read()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="even"):
        write_shards("/tmp/never", height=63)
    with pytest.raises(ValueError, match="kind"):
        write_shards("/tmp/never", kind="audio")


def test_ray_data_reads_the_shards(ray_local, demo_shards):
    import ray.data

    # Ray's stock reader with its default decoding chokes on the non-UTF-8 caption (a known trap the
    # pipeline handles); with decoding off it must see every member of every sample.
    ds = ray.data.read_webdataset(
        str(demo_shards), decoder=None, filerename=None, suffixes=None, file_extensions=["tar"]
    )
    rows = ds.take_all()
    keys = {r["__key__"] for r in rows}
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    expected = {s["key"] for shard in manifest["shards"].values() for s in shard["samples"]}
    assert keys == expected
    good = next(r for r in rows if r["__key__"] == "000000000")
    assert isinstance(good["mp4"], bytes) and len(decord.VideoReader(io.BytesIO(good["mp4"]))) == 24


def test_gop_sets_the_keyframe_interval_and_first_index_the_keys(tmp_path):
    m = write_shards(tmp_path, shards=1, per_shard=2, frames=24, fps=8, gop=8, first_index=100)
    assert [s["key"] for s in m["shards"]["00000.tar"]["samples"]] == ["000000100", "000000101"]
    with tarfile.open(tmp_path / "00000.tar") as tar:
        mp4 = tar.extractfile("000000100.mp4").read()
    assert list(decord.VideoReader(io.BytesIO(mp4)).get_key_indices()) == [0, 8, 16]
    default = write_shards(tmp_path / "default", shards=1, per_shard=1, frames=24, fps=8)
    with tarfile.open(tmp_path / "default" / "00000.tar") as tar:
        mp4 = tar.extractfile(default["shards"]["00000.tar"]["samples"][0]["key"] + ".mp4").read()
    assert list(decord.VideoReader(io.BytesIO(mp4)).get_key_indices()) == [0]  # x264's default: 250
