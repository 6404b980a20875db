"""Decode stage: clip sampling, resizing, and surviving a decoder that kills its process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.decode import (
    IsolatedDecoder,
    _decord_clips,
    _pyav_clips,
    clip_starts,
    decode_sample,
    resize_crop,
)
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
        assert "again (signal SIGSEGV) on a retry in a fresh process" in message  # the crash repeated
        assert "error" not in dec.decode(request(good_mp4(2)))  # a fresh child took over
        assert (dec.restarts, dec.recovered) == (2, 0)
    finally:
        dec.close()


def test_a_crash_that_does_not_repeat_is_retried_not_rejected(tmp_path, monkeypatch, caplog):
    """A transient crash (the child dies once, whatever the input) costs a retry in a fresh process, not the
    sample: before, one crash was a permanent `decoder_crash` rejection."""
    monkeypatch.setenv("T2V_FLAKY_MARKER", str(tmp_path / "crashed-once"))
    dec = IsolatedDecoder(timeout_s=60, max_samples=100, module="tests.pipeline.flaky_decoder")
    try:
        with caplog.at_level("WARNING", logger="pipeline.decode"):
            resp = dec.decode(dict(request(good_mp4()), key="k0"))
        assert "error" not in resp and len(resp["clips"]) == 1
        assert (tmp_path / "crashed-once").exists()  # the first child really died
        assert (dec.restarts, dec.recovered) == (1, 1)
        assert "signal SIGSEGV) on key k0; the retry in a fresh process succeeded" in caplog.text
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


# ---------------------------------------------------------------------------------------------------
# The PyAV fallback: every codec this machine's PyAV can encode, decoded by decord or else by PyAV.

SMALL = {"name": "small", "num_frames": 4, "fps": 4.0, "frame_stride": 1, "height": 36, "width": 32}
AV1_ENCODERS = ("libaom-av1", "libsvtav1", "librav1e")
# (id, encoder or encoders, container, pix_fmt, width, display rotation, the reader that decodes it)
CODECS = [
    ("av1", AV1_ENCODERS, "mp4", "yuv420p", 64, 0, "pyav"),  # decord: "cannot find video stream"
    ("vp9", ("libvpx-vp9",), "webm", "yuv420p", 64, 0, "decord"),
    ("hevc", ("libx265",), "mp4", "yuv420p", 64, 0, "decord"),
    ("mpeg4", ("mpeg4",), "mp4", "yuv420p", 64, 0, "decord"),
    ("h264", ("libx264",), "mp4", "yuv420p", 64, 0, "decord"),
    ("h264-10bit", ("libx264",), "mp4", "yuv420p10le", 64, 0, "decord"),
    ("h264-444", ("libx264",), "mp4", "yuv444p", 64, 0, "decord"),
    ("h264-72px-wide", ("libx264",), "mp4", "yuv420p", 72, 0, "pyav"),  # decord: from_size == to_size
    ("h264-rotated", ("libx264",), "mp4", "yuv420p", 64, 90, "pyav"),  # decord: from_size == to_size
    ("gif", ("gif",), "gif", "rgb8", 64, 0, "pyav"),  # decord: broken metadata
]
QUALITY = {"libx264": {"crf": "12"}, "libx265": {"crf": "12"}, "libvpx-vp9": {"crf": "12", "b": "0"}}


def pattern(n: int, height: int, width: int) -> np.ndarray:
    """(n, H, W, 3) uint8 frames that tell each other apart: green and blue levels count the frame, red
    marks the left half. Every value is exact in GIF's rgb8 palette (3-3-2 bits), so only codecs add error."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 1] = round(255 * (i % 8) / 7)
        frames[i, ..., 2] = 85 * (1 + i // 8)
    frames[:, :, : width // 2, 0] = 255
    return frames


def has_encoder(name: str) -> bool:
    import av

    try:
        av.Codec(name, "w")
    except av.codec.codec.UnknownCodecError:
        return False
    return True


def encode(encoders: tuple[str, ...], fmt: str, pix_fmt: str, frames: np.ndarray, rotation: int = 0) -> bytes:
    """`frames` at 8 fps with the first of `encoders` this PyAV build has (skips if none); an mp4 has its
    index first, as web video does, so a cut one still opens."""
    import tempfile
    from pathlib import Path

    import av

    available = [e for e in encoders if has_encoder(e)]
    if not available:
        pytest.skip(f"this PyAV build has no encoder of {encoders}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"video.{fmt}"  # faststart rewrites the file, so a real file, not BytesIO
        with av.open(str(path), "w", options={"movflags": "faststart"} if fmt == "mp4" else {}) as container:
            stream = container.add_stream(available[0], rate=8, options=QUALITY.get(available[0], {}))
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = pix_fmt
            if rotation:
                stream.set_display_rotation(rotation)
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        return path.read_bytes()


@pytest.fixture(scope="module")
def decoder():
    dec = IsolatedDecoder(timeout_s=120, max_samples=100)
    yield dec
    dec.close()


@pytest.mark.parametrize(
    "name,encoders,fmt,pix_fmt,width,rotation,reader", CODECS, ids=[c[0] for c in CODECS]
)
def test_every_codec_is_decoded_by_decord_or_pyav(
    decoder, name, encoders, fmt, pix_fmt, width, rotation, reader
):
    src = pattern(12, 72, width)
    resp = decoder.decode(request(encode(encoders, fmt, pix_fmt, src, rotation), clips=2, views=(SMALL,)))
    assert "error" not in resp, resp
    assert resp["decoder"] == reader
    shown = np.rot90(src, rotation // 90, axes=(1, 2))  # what a player shows: rotated counter-clockwise
    for clip in resp["clips"]:
        idx, frames, fps = clip["views"]["small"]
        assert frames.shape == (4, 36, 32, 3) and frames.dtype == np.uint8 and fps == 4.0
        assert list(np.diff(idx)) == [2, 2, 2]  # 4 fps out of 8
        assert (clip["source_height"], clip["source_width"]) == shown.shape[1:3]
        err = np.abs(frames.astype(int) - resize_crop(shown[idx], 36, 32)).mean()
        assert err < 4, f"{name}: mean abs error {err:.1f} against the encoded frames"  # a frame off: >= 12


@pytest.mark.parametrize("gop", [0, 6])
def test_pyav_takes_the_same_frames_as_decord(gop):
    """Where both read a video, the fallback gives the same clips: indices, times and pixels (seeking to a
    keyframe included, with `gop`)."""
    from fixtures.synth import make_video_sample

    data = make_video_sample(3, 0, 60, 30, 64, 96, gop=gop)[1]["mp4"]
    keyframes = dict(VIEW, name="keyframes", num_frames=4, fps=0.0, frame_stride=5)
    for policy in ("uniform", "random", "center"):
        ours = _pyav_clips(data, [VIEW, keyframes], 3, policy, 5)
        for a, b in zip(_decord_clips(data, [VIEW, keyframes], 3, policy, 5), ours, strict=True):
            assert (a["start_s"], a["source_fps"]) == (b["start_s"], b["source_fps"])
            for name, (idx, frames, fps) in a["views"].items():
                idx2, frames2, fps2 = b["views"][name]
                assert list(idx) == list(idx2) and fps == fps2
                assert np.abs(frames.astype(int) - frames2).mean() < 0.5


def test_undecodable_bytes_name_both_decoders_errors(decoder):
    reason, message = decoder.decode(request(b"<html>403 Forbidden</html>" * 8))["error"]
    assert reason == Reason.DECODE_ERROR
    assert message.startswith("decord: ") and "; pyav: " in message
    assert "InvalidDataError" in message.split("; pyav: ")[1]  # FFmpeg's own words, not a generic failure


def test_pyav_refuses_a_cut_download_it_could_partly_decode(decoder):
    """AV1 (decord cannot) cut at 80%: FFmpeg would decode the frames there are; the container says more."""
    data = encode(AV1_ENCODERS, "mp4", "yuv420p", pattern(12, 72, 64))
    reason, message = decoder.decode(request(data[: len(data) * 4 // 5], views=(SMALL,)))["error"]
    assert reason == Reason.DECODE_ERROR and "truncated" in message.split("; pyav: ")[1]


def test_the_in_process_decode_used_by_evaluation_falls_back_too():
    """`training.evaluation.reference` reads real videos with `decode_sample` in its own process."""
    src = pattern(12, 72, 64)
    req = request(encode(("gif",), "gif", "rgb8", src), views=(SMALL,))
    resp = decode_sample(req)
    assert resp["decoder"] == "pyav"
    idx, frames, _ = resp["clips"][0]["views"]["small"]
    assert np.abs(frames.astype(int) - resize_crop(src[idx], 36, 32)).mean() < 4
