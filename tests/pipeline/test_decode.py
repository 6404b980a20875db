"""Decode stage: clip sampling, resizing, and surviving a decoder that kills its process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.decode import IsolatedDecoder, clip_starts, resize_crop
from pipeline.schema import Reason
from tests.pipeline.conftest import decoder_killing_mp4

VIEW = {"name": "main", "num_frames": 8, "fps": 4.0, "frame_stride": 1, "height": 32, "width": 48}


def request(data: bytes, clips: int = 1, views=(VIEW,)) -> dict:
    return {
        "media": "video",
        "data": data,
        "views": list(views),
        "clips": clips,
        "start": "uniform",
        "seed": 0,
    }


def good_mp4(index: int = 0) -> bytes:
    from fixtures.synth import make_video_sample

    return make_video_sample(index, 0, 24, 8, 64, 64)[1]["mp4"]


def test_clip_starts_policies():
    assert clip_starts(0.0, 10.0, 2.0, 1, "center", 0) == [4.0]
    assert clip_starts(0.0, 10.0, 2.0, 2, "uniform", 0) == [2.0, 6.0]
    r = clip_starts(0.0, 10.0, 2.0, 3, "random", 7)
    assert r == clip_starts(0.0, 10.0, 2.0, 3, "random", 7) and all(0 <= t <= 8 for t in r)


def test_resize_crop_keeps_aspect_and_centres():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 30:50] = 255  # a bright band in the middle
    out = resize_crop(frames, 32, 32)  # (2, 40, 80) -> shorter side 32 -> (32, 64) -> centre 32x32
    assert out.shape == (2, 32, 32, 3)
    assert out[:, :, 12:20].mean() > 200 and out[:, :, :4].mean() < 20


@pytest.mark.parametrize(
    "shape", [(336, 596, 64, 64), (336, 596, 256, 256), (480, 640, 96, 160), (90, 60, 32, 32)]
)
def test_resize_crop_equals_resizing_the_whole_frame_then_cropping(shape):
    """The reference: PIL resizes the whole frame (shorter side to the target), then the centre is cut out."""
    from PIL import Image

    h0, w0, h, w = shape
    yy, xx = np.mgrid[0:h0, 0:w0]
    noise = np.random.default_rng(0).integers(0, 40, (h0, w0, 3))
    frame = (np.stack([xx * 255 / w0, yy * 255 / h0, (xx + yy) % 97 * 2], -1) + noise).clip(0, 255)
    frame = frame.astype(np.uint8)
    scale = max(h / h0, w / w0)
    nh, nw = max(h, round(h0 * scale)), max(w, round(w0 * scale))
    top, left = (nh - h) // 2, (nw - w) // 2
    ref = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.Resampling.BICUBIC))[
        top : top + h, left : left + w
    ]
    out = resize_crop(frame[None], h, w)[0]
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert out.shape == ref.shape and diff.mean() < 0.5 and diff.max() <= 3  # uint8 rounding between passes


def test_decodes_only_the_sampled_frames_in_isolation():
    dec = IsolatedDecoder(timeout_s=60, max_samples=2)
    try:
        view2 = dict(VIEW, name="keyframes", num_frames=4, fps=0.0, frame_stride=5)
        resp = dec.decode(request(good_mp4(), clips=2, views=(VIEW, view2)))
        assert "error" not in resp, resp
        clips = resp["clips"]
        assert len(clips) == 2 and clips[0]["start_s"] < clips[1]["start_s"]
        idx, frames, fps = clips[0]["views"]["main"]
        assert frames.shape == (8, 32, 48, 3) and fps == 4.0
        assert np.all(np.diff(idx) == 2)  # 4 fps out of 8 fps
        idx2, frames2, fps2 = clips[0]["views"]["keyframes"]
        assert (
            frames2.shape == (4, 32, 48, 3)
            and list(np.diff(idx2)) == [5, 5, 5]
            and fps2 == pytest.approx(8 / 5)
        )
        for _ in range(3):  # recycles the process every 2 samples
            assert "error" not in dec.decode(request(good_mp4(1)))
        assert dec.restarts == 0
    finally:
        dec.close()


def test_decoder_killing_input_really_kills_decord(tmp_path):
    # The input must be a real killer, or the isolation test below proves nothing.
    path = tmp_path / "killer.mp4"
    path.write_bytes(decoder_killing_mp4())
    code = (
        "import io, sys, decord; vr = decord.VideoReader(io.BytesIO(open(sys.argv[1], 'rb').read())); "
        "vr.get_batch(list(range(len(vr)))).asnumpy()"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    assert proc.returncode == -11, f"expected SIGSEGV, got {proc.returncode}: {proc.stderr[-500:]!r}"


def test_isolated_decoder_survives_a_segfault_and_goes_on():
    dec = IsolatedDecoder(timeout_s=60, max_samples=100)
    try:
        assert "error" not in dec.decode(request(good_mp4()))
        reason, message = dec.decode(request(decoder_killing_mp4()))["error"]
        assert reason == Reason.DECODER_CRASH and "SIGSEGV" in message
        assert "error" not in dec.decode(request(good_mp4(2)))  # a fresh child took over
        assert dec.restarts == 1
    finally:
        dec.close()


def test_bad_bytes_are_errors_not_crashes():
    dec = IsolatedDecoder(timeout_s=60, max_samples=100)
    try:
        assert dec.decode(request(b"not a video at all"))["error"][0] == Reason.DECODE_ERROR
        short = dict(VIEW, num_frames=64)
        assert dec.decode(request(good_mp4(), views=(short,)))["error"][0] == Reason.TOO_FEW_FRAMES
    finally:
        dec.close()
