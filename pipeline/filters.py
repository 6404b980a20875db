"""Filter stages, each writing its score column; a score under its threshold is a rejection with a reason.

- `MetadataFilter` (task): the sample json and bytes, before decoding: guards (empty, not a video,
  truncated download, too large) always, then caption / duration / resolution when enabled.
- `MotionFilter` (task): mean absolute grey-level difference of consecutive frames; drops static clips.
- `ClipScorer` (actor): open_clip image embeddings of k frames per clip, averaged, cosine with the caption
  embedding -> `clip_score`; the same per-frame embeddings feed the LAION aesthetic MLP -> mean
  `aesthetic_score`. CLIP runs once for both filters.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from pipeline import stream
from pipeline.schema import Reason, Stage

_VIDEO_MAGIC = (
    (4, b"ftyp"),  # mp4 / mov / 3gp
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"FLV"),
    (0, b"\x00\x00\x01\xba"),  # mpeg-ps
    (0, b"\x47"),  # mpeg-ts sync byte
)
_IMAGE_MAGIC = ((0, b"\xff\xd8\xff"), (0, b"\x89PNG"), (0, b"RIFF"), (0, b"GIF8"))
_ISO = re.compile(r"^P(?:T)?(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?$")


def sniff(data: bytes, media: str) -> bool:
    """True when the bytes start like a container of `media` ("video" or "image")."""
    table = _VIDEO_MAGIC if media == "video" else _IMAGE_MAGIC
    return any(data[off : off + len(magic)] == magic for off, magic in table)


def iso_seconds(text: str) -> float | None:
    """'PT00H01M03S' -> 63.0 (WebVid's duration column)."""
    m = _ISO.match(text.strip()) if isinstance(text, str) else None
    if not m:
        return None
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


class BadMeta(ValueError):
    """The sample json has a shape or a value the metadata filter cannot use (rejected `bad_json`)."""


def _obj(value: Any, where: str) -> dict:
    """`value` if it is a JSON object ({} when absent), else `BadMeta`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadMeta(f"{where} is a {type(value).__name__}, not an object")
    return value


def _num(value: Any, where: str) -> float | None:
    """A declared number; None when absent or not numeric text (ffprobe's "N/A"); `BadMeta` for a container,
    a bool or a value that is not finite ("nan", "inf", 1e400)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool | dict | list):
        raise BadMeta(f"{where} is {str(value)[:60]!r}, not a number")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        raise BadMeta(f"{where} is {str(value)[:60]!r}, not a finite number")
    return x


def _first(*candidates: tuple[Any, str]) -> float | None:
    """The first of (value, where) that declares a number."""
    return next((x for v, where in candidates if (x := _num(v, where)) is not None), None)


def _video_stream(vm: dict) -> dict:
    """The first video stream of `video_metadata` ({} when there is none); `BadMeta` for odd shapes."""
    streams = vm.get("streams")
    if streams is None:
        return {}
    if not isinstance(streams, list):
        raise BadMeta(f"video_metadata.streams is a {type(streams).__name__}, not a list")
    for i, st in enumerate(streams):
        _obj(st, f"video_metadata.streams[{i}]")
    return next((st for st in streams if st.get("codec_type", "video") == "video"), {})


def declared(meta: Any) -> dict[str, float | None]:
    """Duration (s), width, height and byte size the json declares (video2dataset / WebVid layout).

    Raises `BadMeta` when the json has an odd shape (a list where an object belongs, a non-finite size)."""
    meta = _obj(meta, "the json")
    vm = _obj(meta.get("video_metadata"), "video_metadata")
    fmt = _obj(vm.get("format"), "video_metadata.format")
    st = _video_stream(vm)
    duration = _first((fmt.get("duration"), "format.duration"), (st.get("duration"), "stream duration"))
    if duration is None and meta.get("duration") is not None:
        d = meta["duration"]
        duration = _num(iso_seconds(d), "duration") if isinstance(d, str) else _num(d, "duration")
    return {
        "duration": duration,
        "width": _first((st.get("width"), "stream width"), (meta.get("width"), "width")),
        "height": _first((st.get("height"), "stream height"), (meta.get("height"), "height")),
        "size": _num(fmt.get("size"), "format.size"),
    }


class MetadataFilter(stream.RowStage):
    name = Stage.METADATA

    def check(self, row: dict) -> tuple[str, str] | None:
        """(reason, message) if the sample must be rejected before decoding, else None."""
        c, data, media = self.cfg.metadata, row["media_bytes"] or b"", row["media"]
        if not data:
            return Reason.EMPTY_FILE, f"{media} member has 0 bytes"
        if len(data) > c.max_bytes:
            return Reason.TOO_LARGE, f"{len(data)} bytes > metadata.max_bytes={c.max_bytes}"
        if not sniff(data, media):
            return Reason.NOT_VIDEO, f"not a known {media} format; starts with {data[:16]!r}"
        try:
            d = declared(json.loads(row["meta_json"] or "{}"))
        except RecursionError:
            return Reason.BAD_JSON, "json nested too deep to parse"
        except ValueError as exc:  # not JSON (JSONDecodeError), or an odd shape (BadMeta)
            return Reason.BAD_JSON, str(exc)
        if c.check_declared_size and d["size"] is not None and int(d["size"]) != len(data):
            return Reason.TRUNCATED_FILE, f"{len(data)} bytes, json format.size says {int(d['size'])}"
        sides = [s for s in (d["width"], d["height"]) if s is not None]
        if sides and max(sides) > c.max_side:
            return Reason.TOO_LARGE, f"declared {d['width']}x{d['height']} > metadata.max_side={c.max_side}"
        if media == "video" and d["duration"] is not None and d["duration"] > c.max_duration_s:
            return Reason.TOO_LARGE, f"declared {d['duration']}s > metadata.max_duration_s={c.max_duration_s}"
        if not c.enabled:
            return None
        if not row["caption"].strip():
            return Reason.EMPTY_CAPTION, "caption is empty"
        if media == "video" and d["duration"] is not None and d["duration"] < c.min_duration_s:
            return Reason.TOO_SHORT, f"declared {d['duration']}s < metadata.min_duration_s={c.min_duration_s}"
        if len(sides) == 2 and min(sides) < c.min_side:
            return (
                Reason.LOW_RESOLUTION,
                f"declared {d['width']}x{d['height']} < metadata.min_side={c.min_side}",
            )
        return None

    def process(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            if not stream.alive(row):
                continue
            try:
                bad = self.check(row)
            except Exception as exc:  # a json shape not foreseen above: rejected, the job goes on
                bad = Reason.BAD_JSON, f"metadata check failed: {type(exc).__name__}: {exc}"
            if bad is not None:
                stream.reject(row, self.name, *bad)
        return rows


def motion_score(frames: np.ndarray, size: int) -> float:
    """Mean |grey(t+1) - grey(t)| in [0, 1] over (F, H, W, 3) uint8 frames downsampled to size x size."""
    from PIL import Image

    if len(frames) < 2:
        return float("nan")
    grey = (
        np.stack(
            [
                np.asarray(Image.fromarray(f).convert("L").resize((size, size), Image.Resampling.BILINEAR))
                for f in frames
            ]
        ).astype(np.float32)
        / 255.0
    )  # (F, size, size)
    return float(np.abs(np.diff(grey, axis=0)).mean())


def frames_of(row: dict, view: str, height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of `view` from a decoded row."""
    return np.frombuffer(row[f"frames__{view}"], np.uint8).reshape(-1, height, width, 3)


class MotionFilter(stream.RowStage):
    name = Stage.MOTION

    def added_columns(self) -> list[str]:
        return ["motion_score", f"t_{self.name}"]

    def process(self, rows: list[dict]) -> list[dict]:
        c, view = self.cfg.motion, self.cfg.primary_view
        v = self.cfg.views[view]
        for row in rows:
            row["motion_score"] = float("nan")
            if not stream.alive(row) or not c.enabled:
                continue
            row["motion_score"] = score = motion_score(frames_of(row, view, v.height, v.width), c.size)
            if score == score and score < c.min_score:  # NaN (single frame / image) is not filtered
                stream.reject(
                    row, self.name, Reason.STATIC, f"motion {score:.5f} < motion.min_score={c.min_score}"
                )
        return rows


class ClipScorer(stream.RowStage):
    """CLIP text-video similarity and LAION aesthetic score from one set of CLIP image embeddings."""

    name = Stage.SCORE

    def added_columns(self) -> list[str]:
        return ["clip_score", "aesthetic_score", f"t_{self.name}"]

    def setup(self) -> None:
        import torch

        from pipeline.models import load_aesthetic_head, load_clip

        s = self.cfg.score
        self.device = "cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(s.torch_threads)
        self.active = self.cfg.clip.enabled or self.cfg.aesthetic.enabled
        if not self.active:
            return
        self.model, self.preprocess, self.tokenizer = load_clip(
            self.cfg.clip.model, self.cfg.clip.pretrained or None, self.device
        )
        self.head = None
        if self.cfg.aesthetic.enabled:
            self.head = load_aesthetic_head(self.cfg.aesthetic.head, self.device)
            width = self.model.text_projection.shape[-1] if hasattr(self.model, "text_projection") else None
            if width is not None and self.head.embed_dim != width:
                raise ValueError(
                    f"aesthetic head {self.cfg.aesthetic.head} takes {self.head.embed_dim}-d embeddings "
                    f"but CLIP {self.cfg.clip.model} gives {width}-d"
                )

    def embed(self, rows: list[dict]):
        """Per-frame image embeddings (N, k, D) and caption embeddings (N, D), both L2-normalised."""
        from pipeline.models import clip_image_embeds, clip_text_embeds

        view = self.cfg.primary_view
        v, k = self.cfg.views[view], self.cfg.clip.num_frames
        picked = []
        for row in rows:
            frames = frames_of(row, view, v.height, v.width)
            picked.append(frames[np.linspace(0, len(frames) - 1, k).round().astype(int)])  # k evenly spaced
        img = clip_image_embeds(self.model, self.preprocess, np.concatenate(picked), self.device)  # (N k, D)
        txt = clip_text_embeds(self.model, self.tokenizer, [r["caption"] for r in rows], self.device)
        return img.reshape(len(rows), k, -1), txt  # (N, k, D), (N, D)

    def scores(self, rows: list[dict]):
        """(clip scores (N,), aesthetic scores (N,) or None) for decoded rows."""
        import torch

        img, txt = self.embed(rows)
        clip_scores = torch.nn.functional.normalize(img.mean(1), dim=-1).mul(txt).sum(-1)  # (N,) cosine
        aes = None
        if self.head is not None:
            with torch.inference_mode():
                aes = self.head(img.flatten(0, 1)).reshape(img.shape[0], img.shape[1]).mean(1)  # (N,)
        return clip_scores.tolist(), None if aes is None else aes.tolist()

    def process(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            row["clip_score"] = row["aesthetic_score"] = float("nan")
        live = [r for r in rows if stream.alive(r)]
        if not live or not self.active:
            return rows
        try:
            results = [(live, self.scores(live))]
        except Exception:  # find the row that fails; the others are scored
            results = []
            for row in live:
                try:
                    results.append(([row], self.scores([row])))
                except Exception as exc:
                    stream.reject(row, self.name, Reason.SCORE_ERROR, f"{type(exc).__name__}: {exc}")
        clip, aesthetic = self.cfg.clip, self.cfg.aesthetic
        for group, (clip_scores, aes) in results:
            for i, row in enumerate(group):
                if clip.enabled:
                    row["clip_score"] = clip_scores[i]
                if aes is not None:
                    row["aesthetic_score"] = aes[i]
                if clip.enabled and clip_scores[i] < clip.min_score:
                    stream.reject(
                        row,
                        self.name,
                        Reason.LOW_CLIP_SCORE,
                        f"clip {clip_scores[i]:.4f} < clip.min_score={clip.min_score}",
                    )
                elif aes is not None and aes[i] < aesthetic.min_score:
                    stream.reject(
                        row,
                        self.name,
                        Reason.LOW_AESTHETIC,
                        f"aesthetic {aes[i]:.4f} < aesthetic.min_score={aesthetic.min_score}",
                    )
        return rows
