"""FVD's real set: random windows decoded from the user's shards (as the pipeline decodes them), UCF-101 and
MSR-VTT copies read in their released layouts."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import tarfile

import numpy as np
import pytest
import torch

from training.evaluation.datasets import (
    UCF101_CLASSES,
    msrvtt_captions,
    msrvtt_video_path,
    ucf101_prompt,
    ucf101_videos,
)
from training.evaluation.reference import real_clips
from training.sampling.video_io import write_mp4


def _ramp(path, frames: int = 30, fps: float = 10.0, size: int = 32):
    """A video whose frame k is a flat grey of level 8 k: the window's frame indices are readable back."""
    levels = torch.arange(frames, dtype=torch.float32)[:, None, None, None] * 8 / 255
    write_mp4(levels.expand(frames, 3, size, size).contiguous(), path, fps=fps, crf=0)
    return path


def _levels(video: torch.Tensor) -> np.ndarray:
    return (video.float().mean(dim=(1, 2, 3)) / 8).round().numpy().astype(int)


def test_windows_follow_the_stated_stride_and_fps(tmp_path):
    for k in range(3):
        _ramp(tmp_path / f"v{k}.mp4")
    videos, protocol = real_clips(str(tmp_path), 10, 5, 16, 16, stride=3, seed=0)
    assert videos.dtype == torch.uint8 and videos.shape == (3, 5, 3, 16, 16)
    for v in videos:
        assert np.all(np.diff(_levels(v)) == 3)  # every third source frame
    assert (protocol.kind, protocol.stride, protocol.fps, protocol.num_videos) == ("files", 3, None, 3)
    slow, protocol = real_clips(str(tmp_path), 10, 5, 16, 16, fps=5.0, seed=0)
    assert all(np.all(np.diff(_levels(v)) == 2) for v in slow)  # 10 fps source read at 5 fps
    starts = {
        int(_levels(v)[0])
        for seed in range(4)
        for v in real_clips(str(tmp_path), 10, 5, 16, 16, stride=1, seed=seed)[0]
    }
    assert len(starts) > 1  # random windows, not the first frames
    again, _ = real_clips(str(tmp_path), 10, 5, 16, 16, stride=1, seed=3)
    assert torch.equal(again, real_clips(str(tmp_path), 10, 5, 16, 16, stride=1, seed=3)[0])  # seeded


def test_too_short_videos_are_skipped_and_counted(tmp_path):
    _ramp(tmp_path / "a.mp4")
    _ramp(tmp_path / "b.mp4")
    _ramp(tmp_path / "short.mp4", frames=3)
    _, protocol = real_clips(str(tmp_path), 10, 8, 16, 16, stride=1)
    assert protocol.num_videos == 2 and protocol.skipped == 1
    with pytest.raises(ValueError, match="give the real window exactly one of fps or stride"):
        real_clips(str(tmp_path), 10, 8, 16, 16)


def test_shards_and_the_store_they_made_give_the_same_real_set(demo_shards, demo_latents):
    from_shards, protocol = real_clips(str(demo_shards), 4, 8, 32, 32, fps=4.0, seed=1)
    assert protocol.kind == "shards" and from_shards.shape == (4, 8, 3, 32, 32)
    store, _ = demo_latents  # a pipeline output dir: the shards its summary.json says it read
    from_store, _ = real_clips(str(store), 4, 8, 32, 32, fps=4.0, seed=1)
    assert torch.equal(from_shards, from_store)


def test_a_compressed_shard_named_tar_is_read_by_its_bytes(tmp_path):
    # The reference reader shares the pipeline's `open_shard`: a gzip (or xz, ...) stream named `.tar` is read.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for k in range(2):
            data = _ramp(tmp_path / f"v{k}.mp4").read_bytes()
            info = tarfile.TarInfo(f"{k:05d}.mp4")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(gzip.compress(buf.getvalue()))
    (shards / "00001.tar").write_bytes(lzma.compress(buf.getvalue()))
    videos, protocol = real_clips(str(shards), 10, 5, 16, 16, stride=1, seed=0)
    assert protocol.kind == "shards" and protocol.num_videos == 4 and videos.shape == (4, 5, 3, 16, 16)


def _ucf101_copy(root, tmp_path):
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF101_CLASSES)))
    rel = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi"]
    (lists / "testlist01.txt").write_text("\n".join(rel) + "\n")
    (lists / "trainlist01.txt").write_text(f"{rel[0]} 1\n")
    for r in rel:
        (root / "UCF-101" / r).parent.mkdir(parents=True, exist_ok=True)
        _ramp(tmp_path / "tmp.mp4").rename(root / "UCF-101" / r)


def test_ucf101_reader_and_prompts(tmp_path):
    assert (
        len(UCF101_CLASSES) == 101 and UCF101_CLASSES[0] == "ApplyEyeMakeup" and UCF101_CLASSES[-1] == "YoYo"
    )
    assert [ucf101_prompt(c) for c in ("ApplyEyeMakeup", "YoYo", "CleanAndJerk")] == [
        "apply eye makeup",
        "yo yo",
        "clean and jerk",
    ]
    root = tmp_path / "ucf"
    _ucf101_copy(root, tmp_path)
    test = ucf101_videos(root)
    assert [c for _, c in test] == ["ApplyEyeMakeup", "YoYo"] and all(p.is_file() for p, _ in test)
    assert [c for _, c in ucf101_videos(root, "train")] == ["ApplyEyeMakeup"]
    videos, protocol = real_clips(f"ucf101:{root}", 10, 4, 16, 16, stride=1)
    assert protocol.kind == "ucf101" and len(videos) == 2
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 Archery\n")
    with pytest.raises(ValueError, match="does not list UCF-101's 101 classes"):
        ucf101_videos(root)


def test_msrvtt_reader(tmp_path):
    annotation = tmp_path / "test_videodatainfo.json"
    annotation.write_text(
        json.dumps(
            {
                "videos": [
                    {"video_id": "video7010", "split": "test"},
                    {"video_id": "video0", "split": "train"},
                ],
                "sentences": [
                    {"video_id": "video7010", "caption": "a man is cooking ", "sen_id": 1},
                    {"video_id": "video0", "caption": "a car drives", "sen_id": 2},
                    {"video_id": "video7010", "caption": "someone cooks food", "sen_id": 3},
                ],
            }
        )
    )
    assert msrvtt_captions(annotation) == [
        ("video7010", "a man is cooking"),
        ("video7010", "someone cooks food"),
    ]
    assert len(msrvtt_captions(annotation, None)) == 3
    with pytest.raises(ValueError, match="no videos of split 'val'"):
        msrvtt_captions(annotation, "val")
    (tmp_path / "TestVideo").mkdir()
    (tmp_path / "TestVideo" / "video7010.mp4").write_bytes(b"")
    assert msrvtt_video_path(tmp_path, "video7010") == tmp_path / "TestVideo" / "video7010.mp4"
    with pytest.raises(FileNotFoundError):
        msrvtt_video_path(tmp_path, "video1")


def test_a_caption_file_with_bad_bytes_is_refused_naming_the_file_and_line(tmp_path, capsys):
    from training.evaluation.datasets import main

    annotation = tmp_path / "test_videodatainfo.json"
    annotation.write_bytes(b'{"videos": [],\n "sentences": [{"caption": "caf\xe9"}]}\n')
    with pytest.raises(SystemExit) as exit:
        main(["msrvtt-prompts", str(annotation)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "test_videodatainfo.json, line 2: not UTF-8 text" in err


def test_the_shipped_ucf101_prompt_file_is_the_class_list():
    from pathlib import Path

    shipped = Path(__file__).parents[3] / "training" / "prompts" / "ucf101.txt"
    assert shipped.read_text().split("\n")[:101] == [ucf101_prompt(c) for c in UCF101_CLASSES]
