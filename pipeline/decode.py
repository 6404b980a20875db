"""Decode stage: media bytes -> clips of frames per view, in a crash-isolated decoder process.

decord can kill its process with SIGSEGV on some truncated H.264 read from memory; no Python `try` catches
that, and Ray Data retrying the crashed task would crash again. So each `DecodeStage` actor owns a child
process (`python -m pipeline.decode`) that does all decoding; if it dies, the sample is tried once more in a
fresh child (a crash can be transient: memory pressure, a signal from outside) and rejected as `decoder_crash`
only when the crash repeats; a hung child is killed and the sample rejected (`decode_timeout`, not retried: it
would cost another `decode.timeout_s`). Either way the child is restarted and the batch goes on. The child is also
recycled every `decode.max_samples_per_process` samples because decord leaks. Where decord raises (AV1,
GIF, some widths and display rotations), the same child tries PyAV (`pipeline.pyav`) before rejecting
the sample; a `decode_error` message then gives both: "decord: ...; pyav: ...".

Clip sampling works on frame timestamps (VFR-safe): a view with `fps > 0` takes the frame shown at
`t0 + k / fps`; a view with `fps == 0` takes every `frame_stride`-th frame from `t0`. All views of a clip
share `t0`. Only the frames the clips need are decoded. Frames are resized (shorter side) and
center-cropped to each view's size with PIL's antialiased bicubic filter.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np

from pipeline import stream
from pipeline.schema import Reason, Stage

log = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")
_TOLERANCE = 0.5  # of a source frame interval, when checking that a clip fits in the video


class DecodeFailure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Child side: pure functions, run inside the isolated process.


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, height, width, 3): resize the shorter side, then center-crop.

    Resamples only the source region the crop keeps (PIL's `box`), with the scale of the full resize:
    the same filter taps as resizing the whole frame and cropping (up to PIL's uint8 rounding), and on
    16:9 video about 1.6x faster, since the cut-off sides are never filtered.
    """
    from PIL import Image

    _, h0, w0, _ = frames.shape
    scale = max(height / h0, width / w0)
    nh, nw = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    top, left = (nh - height) // 2, (nw - width) // 2
    sy, sx = h0 / nh, w0 / nw  # source pixels per pixel of the full resize
    box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame)
        if (nh, nw) == (h0, w0):
            out[i] = np.asarray(img)[top : top + height, left : left + width]
        else:
            out[i] = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC, box=box))
    return out


def clip_starts(lo: float, hi: float, span: float, k: int, policy: str, seed: int) -> list[float]:
    """Start times of `k` clips of length `span` within [lo, hi] (start <= hi - span)."""
    last = hi - span
    if policy == "uniform" or (policy == "center" and k > 1 and (last - lo) < span * (k - 1)):
        return [lo + (last - lo) * (j + 0.5) / k for j in range(k)]
    if policy == "center":  # back-to-back clips around the middle
        first = lo + (last - lo) / 2 - span * (k - 1) / 2
        return [first + span * j for j in range(k)]
    rng = np.random.default_rng(seed)
    return sorted(float(x) for x in rng.uniform(lo, max(last, lo), size=k))


def _decode_image(data: bytes, views: list[dict]) -> list[dict]:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    frame = np.asarray(img.convert("RGB"))[None]  # (1, H, W, 3)
    out = {
        v["name"]: (np.zeros(1, np.int32), resize_crop(frame, v["height"], v["width"]), 0.0) for v in views
    }
    return [
        {
            "start_s": 0.0,
            "source_fps": 0.0,
            "source_height": frame.shape[1],
            "source_width": frame.shape[2],
            "views": out,
        }
    ]


def _plan(ts: np.ndarray, avg_fps: float, views: list[dict], clips: int, policy: str, seed: int):
    """([(t0, {view: source frame indices})] per clip, the unique indices all clips need) from the
    frame start times `ts` (n,)."""
    n = len(ts)
    dt = 1.0 / avg_fps
    spans = {
        v["name"]: (
            (v["num_frames"] - 1) / v["fps"]
            if v["fps"] > 0
            else (v["num_frames"] - 1) * v["frame_stride"] * dt
        )
        for v in views
    }
    span = max(spans.values())
    lo, hi = float(ts[0]), float(ts[-1])
    if hi - lo + _TOLERANCE * dt < span:
        raise DecodeFailure(
            Reason.TOO_FEW_FRAMES,
            f"video has {n} frames ({hi - lo + dt:.2f}s), clip needs {span + dt:.2f}s",
        )
    starts = clip_starts(lo, max(hi, lo + span), span, clips, policy, seed)
    plans = []
    for t0 in starts:
        idx = {}
        for v in views:
            f = v["num_frames"]
            if v["fps"] > 0:
                times = t0 + np.arange(f) / v["fps"]
                i = np.searchsorted(ts, times + 1e-6, side="right") - 1  # frame on screen at each time
            else:
                i0 = int(np.searchsorted(ts, t0 + 1e-6, side="right") - 1)
                i0 = min(max(i0, 0), n - 1 - (f - 1) * v["frame_stride"])
                i = i0 + v["frame_stride"] * np.arange(f)
            idx[v["name"]] = np.clip(i, 0, n - 1).astype(np.int32)
        plans.append((t0, idx))
    needed = np.unique(np.concatenate([i for _, idx in plans for i in idx.values()]))
    return plans, needed


def _assemble(plans: list, needed: np.ndarray, frames: np.ndarray, avg_fps: float, views: list[dict]):
    """Clip dicts from the plans and `frames` (U, H, W, 3), the decoded frames `needed`."""
    where = {int(f): j for j, f in enumerate(needed)}
    out = []
    for t0, idx in plans:
        per_view = {}
        for v in views:
            sel = frames[[where[int(i)] for i in idx[v["name"]]]]
            fps = v["fps"] if v["fps"] > 0 else avg_fps / v["frame_stride"]
            per_view[v["name"]] = (idx[v["name"]], resize_crop(sel, v["height"], v["width"]), float(fps))
        out.append(
            {
                "start_s": t0,
                "source_fps": avg_fps,
                "source_height": frames.shape[1],
                "source_width": frames.shape[2],
                "views": per_view,
            }
        )
    return out


def _decord_clips(data: bytes, views: list[dict], clips: int, policy: str, seed: int) -> list[dict]:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    try:
        n = len(vr)
        if n < 1:  # decord's count, not necessarily the video's: PyAV gets to look
            raise ValueError("decord found no frames")
        ts = np.asarray(vr.get_frame_timestamp(np.arange(n)))[:, 0].astype(np.float64)  # (n,) start times
        avg_fps = float(vr.get_avg_fps()) or 1.0
        plans, needed = _plan(ts, avg_fps, views, clips, policy, seed)
        frames = vr.get_batch(needed.tolist()).asnumpy()  # (U, H, W, 3): only the frames clips use
    finally:
        del vr  # release the reader's buffers now (decord is known to leak)
    return _assemble(plans, needed, frames, avg_fps, views)


def _pyav_clips(data: bytes, views: list[dict], clips: int, policy: str, seed: int) -> list[dict]:
    from pipeline import pyav  # only where decord fails: the actors and the driver never import PyAV

    vr = pyav.VideoReader(data)
    if len(vr) < 1:
        raise DecodeFailure(Reason.TOO_FEW_FRAMES, "no frames")
    avg_fps = vr.avg_fps or 1.0
    plans, needed = _plan(vr.timestamps, avg_fps, views, clips, policy, seed)
    return _assemble(plans, needed, vr.get_batch(needed.tolist()), avg_fps, views)


def _describe(exc: BaseException, limit: int = 2000) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]


def _decode_video(
    data: bytes, views: list[dict], clips: int, policy: str, seed: int
) -> tuple[list[dict], str]:
    """(clips, decoder): decord, else PyAV where decord raises (AV1, GIF, some widths and rotations).

    A `DecodeFailure` (too few frames) is a verdict on the video, not a decoder failure: no fallback.
    """
    try:
        return _decord_clips(data, views, clips, policy, seed), "decord"
    except DecodeFailure:
        raise
    except Exception as exc:
        decord_error = _describe(exc, 900)  # both fit in a rejection message (2000 characters)
    try:
        return _pyav_clips(data, views, clips, policy, seed), "pyav"
    except DecodeFailure:
        raise
    except Exception as exc:
        raise DecodeFailure(
            Reason.DECODE_ERROR, f"decord: {decord_error}; pyav: {_describe(exc, 900)}"
        ) from None


def decode_sample(req: dict) -> dict:
    """{'clips': [...], 'decoder': name} or {'error': (reason, message)} for one request (child side)."""
    try:
        if req["media"] == "image":
            return {"clips": _decode_image(req["data"], req["views"]), "decoder": "pil"}
        clips, decoder = _decode_video(req["data"], req["views"], req["clips"], req["start"], req["seed"])
        return {"clips": clips, "decoder": decoder}
    except DecodeFailure as exc:
        return {"error": (exc.reason, str(exc))}
    except Exception as exc:  # decoder errors on bad data: recorded per sample
        return {"error": (Reason.DECODE_ERROR, _describe(exc))}


def _serve() -> None:
    """Child main loop: length-prefixed pickles in on stdin, out on stdout."""
    rin, wout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    while True:
        head = rin.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        req = pickle.loads(rin.read(_LEN.unpack(head)[0]))
        resp = pickle.dumps(decode_sample(req), protocol=pickle.HIGHEST_PROTOCOL)
        wout.write(_LEN.pack(len(resp)) + resp)
        wout.flush()


# ---------------------------------------------------------------------------------------------------
# Parent side.


class IsolatedDecoder:
    """A `python -m pipeline.decode` child process; `decode()` survives it crashing or hanging."""

    def __init__(self, timeout_s: float, max_samples: int, module: str = "pipeline.decode"):
        self.timeout_s, self.max_samples, self.module = timeout_s, max_samples, module
        self.proc: subprocess.Popen | None = None
        self.served = 0
        self.restarts = 0
        self.recovered = 0  # crashes that did not repeat on the retry

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.served = 0

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd, buf = self.proc.stdout.fileno(), bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def decode(self, req: dict) -> dict:
        """The child's response to `req`; a crash is retried once in a fresh child before it is a rejection."""
        resp = self._attempt(req)
        first = resp.pop("crash", None)
        if first is None:
            return resp
        retry = self._attempt(req)
        again = retry.pop("crash", None)
        if again is None:
            self.recovered += 1
            log.warning(
                "decoder process died (%s) on key %s; the retry in a fresh process succeeded",
                first,
                req.get("key"),
            )
            return retry
        message = f"decoder process died ({first}), and again ({again}) on a retry in a fresh process"
        return {"error": (Reason.DECODER_CRASH, message)}

    def _attempt(self, req: dict) -> dict:
        """One try: the response, or {'crash': how the child died} (the child is gone and will be restarted)."""
        if self.proc is None or self.proc.poll() is not None or self.served >= self.max_samples:
            self.close()
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.served += 1
        deadline = time.monotonic() + self.timeout_s
        try:
            payload = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.write(_LEN.pack(len(payload)) + payload)
            self.proc.stdin.flush()
            size = _LEN.unpack(self._read(_LEN.size, deadline))[0]
            return pickle.loads(self._read(size, deadline))
        except TimeoutError:
            self.close()
            self.restarts += 1
            return {"error": (Reason.DECODE_TIMEOUT, f"no result after {self.timeout_s}s; decoder killed")}
        except (EOFError, BrokenPipeError, OSError):
            code = self.proc.wait()
            self.proc = None
            self.restarts += 1
            if code > 0:  # Python itself failed (e.g. cannot import pipeline): a setup bug, not bad data
                raise RuntimeError(
                    f"decoder process exited with code {code} (see the worker's stderr)"
                ) from None
            return {"crash": f"signal {signal.Signals(-code).name}" if code < 0 else "exit code 0"}


def _seed(base: int, key: str) -> int:
    return (base * 1_000_003 + zlib.crc32(key.encode())) & 0xFFFFFFFF


class DecodeStage(stream.RowStage):
    """Ray Data actor: sample rows -> one row per clip with `frames__<view>` (uint8 (F, H, W, 3) bytes)."""

    name = "decode"
    self_timed = True

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.views = [
            dict(
                name=n,
                num_frames=v.num_frames,
                fps=v.fps,
                frame_stride=v.frame_stride,
                height=v.height,
                width=v.width,
            )
            for n, v in self.cfg.views.items()
        ]
        self.decoder: IsolatedDecoder | None = None

    def setup(self) -> None:
        d = self.cfg.decode
        self.decoder = IsolatedDecoder(d.timeout_s, d.max_samples_per_process)
        self.decoder.start()

    def added_columns(self) -> list[str]:
        cols = [
            "clip_index",
            "clips_in_sample",
            "start_s",
            "source_fps",
            "source_height",
            "source_width",
            "t_decode",
        ]
        for v in self.views:
            cols += [f"frames__{v['name']}", f"frame_indices__{v['name']}", f"fps__{v['name']}"]
        return cols

    def process(self, rows: list[dict]) -> list[dict]:
        d, out = self.cfg.decode, []
        for row in rows:
            if not stream.alive(row):
                out.append(row)
                continue
            t0 = time.perf_counter()
            req = {
                "media": row["media"],
                "data": row["media_bytes"],
                "views": self.views,
                "clips": d.clips_per_video,
                "start": d.start,
                "seed": _seed(d.seed, row["key"]),
                "key": row["key"],
            }
            resp = self.decoder.decode(req)  # type: ignore[union-attr]
            dt = time.perf_counter() - t0
            row["media_bytes"] = b""
            if "error" in resp:
                reason, message = resp["error"]
                out.append(dict(stream.reject(row, Stage.DECODE, reason, message), t_decode=dt))
                continue
            clips = resp["clips"]
            for j, clip in enumerate(clips):
                r = dict(
                    row,
                    clip_index=j,
                    clips_in_sample=len(clips),
                    start_s=clip["start_s"],
                    source_fps=clip["source_fps"],
                    source_height=clip["source_height"],
                    source_width=clip["source_width"],
                    t_decode=dt / len(clips),
                )
                for name, (idx, frames, fps) in clip["views"].items():
                    r[f"frames__{name}"] = frames.tobytes()  # (F, H, W, 3) uint8
                    r[f"frame_indices__{name}"] = idx.astype(np.int32).tobytes()
                    r[f"fps__{name}"] = fps
                out.append(r)
        return out

    def __del__(self):
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()


if __name__ == "__main__":
    _serve()
