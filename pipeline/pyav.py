"""PyAV video reader: the decode stage's fallback for videos decord cannot open or read.

decord 0.6 rejects AV1 ("cannot find video stream with wanted index: -1") and GIF, and fails its frame
copy check ("from_size == to_size") on some widths (72 px) and on 90-degree display rotations; PyAV's
FFmpeg reads all of them. It runs inside the same crash-isolated decoder child as decord (see
`pipeline.decode`), so a crash in FFmpeg rejects one sample too.

Frames are numbered and timed as decord does, so a clip is the same whichever reader decoded it (up to
colour-conversion rounding): a frame per packet of the best video stream, sorted by pts, timed from the
stream's start time in float32 seconds, at the stream's average frame rate; display rotation is applied.
A file with fewer packets than its container declares (a cut download) is refused, as decord refuses it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import av
import numpy as np


class VideoReader:
    """The part of `decord.VideoReader` the decode stage uses: `timestamps`, `avg_fps`, `get_batch`."""

    def __init__(self, data: bytes):
        self.data = data
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.best("video")
            if stream is None:
                raise ValueError("no video stream")
            pts = [p.pts for p in container.demux(stream) if p.pts is not None]
            if 0 < len(pts) < stream.frames:  # a cut download: decord fails it; FFmpeg would decode the rest
                raise ValueError(
                    f"{len(pts)} of the {stream.frames} frames the container declares: truncated"
                )
            self.pts = np.sort(np.array(pts, np.int64))
            start = stream.start_time or 0
            seconds = (self.pts - start) * float(stream.time_base)
            # float32 like decord's timestamps, so both readers choose the same frames at clip boundaries
            self.timestamps = seconds.astype(np.float32).astype(np.float64)
            rate = stream.average_rate or stream.guessed_rate
            self.avg_fps = float(rate) if rate else 0.0

    def __len__(self) -> int:
        return len(self.pts)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 RGB of ascending, unique frame `indices`.

        Decodes from the keyframe before the first index; if that seek lands past a needed frame (formats
        with a poor seek index), decodes again from the start.
        """
        want = [int(self.pts[i]) for i in indices]  # a pts twice (broken files) gives its frame twice
        need, first = set(want), (want[0] if indices[0] > 0 else None)
        got = self._decode(need, first)
        if len(got) < len(need) and first is not None:
            got = self._decode(need, None)
        if len(got) < len(need):
            raise ValueError(f"PyAV decoded {len(got)} of the {len(need)} frames needed")
        return np.stack([got[pts] for pts in want])

    def _decode(self, want: set[int], seek_pts: int | None) -> dict[int, np.ndarray]:
        """{pts: frame} for the frames whose pts `want` holds, decoding from `seek_pts` or the start."""
        got: dict[int, np.ndarray] = {}
        last = max(want)
        with av.open(io.BytesIO(self.data)) as container:
            stream = container.streams.best("video")
            assert stream is not None
            # one thread, as decord's num_threads=1: the stage runs one decoder per core
            stream.codec_context.thread_count = 1
            if seek_pts is not None:
                container.seek(seek_pts, stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts in want:
                    rgb = frame.to_ndarray(format="rgb24")  # any bit depth and chroma layout -> 8-bit RGB
                    got[frame.pts] = np.ascontiguousarray(np.rot90(rgb, round(frame.rotation / 90) % 4))
                if len(got) == len(want) or (frame.pts is not None and frame.pts >= last):
                    break
        return got
