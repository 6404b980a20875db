"""The written contract between the curation pipeline and training: columns, dtypes, file metadata.

Output layout of `python -m pipeline.run --output OUT`:

    OUT/clips/<shard>.parquet      one row per accepted clip (the training input)
    OUT/rejected/<shard>.parquet   one row per rejected sample or clip: key, shard, stage, reason, message
    OUT/summary.json, OUT/summary.png

`<shard>` is the input shard's path relative to the input root, `/` -> `__`, without `.tar` (`.tar.gz` / `.tgz`
kept), escaped so that no two shards share a name (`pipeline.shards.output_stem`).

Clip rows. Tensors are Arrow canonical `arrow.fixed_shape_tensor` columns (no pickles), so plain pyarrow
reads them: `pq.read_table(p)[LATENTS].combine_chunks().to_numpy_ndarray()` -> (N, F, C, h, w).

    key str, shard str, clip_index int32, media str ("video" | "image"), caption str,
    start_s float32 (clip start in the source, seconds), source_fps float32,
    source_height int32, source_width int32,
    motion_score, clip_score, aesthetic_score float32 (null when that filter is off or not applicable),
    per view (primary view unsuffixed, others suffixed `_<view>`):
      frame_indices list<int32> (source frame numbers, F of them), fps float32 (of the clip),
      num_frames, height, width int32 (pixels of the decoded clip),
      latents fixed_shape_tensor<float16|float32>[F, C, H/8, W/8] = VAE latents x scaling_factor,
    prompt_embeds fixed_shape_tensor<float16>[77, D] (only with encode.text_embeds).

Every file's schema metadata holds the `META_*` keys below (values are JSON text), so a latent store made
with another VAE, scaling factor or decode setting can be detected before training on it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.configlib import to_json

SCHEMA_VERSION = 1
PIPELINE_VERSION = "0.2.0"

# --- clip columns --------------------------------------------------------------------------------
KEY = "key"
SHARD = "shard"
CLIP_INDEX = "clip_index"
MEDIA = "media"
CAPTION = "caption"
START_S = "start_s"
SOURCE_FPS = "source_fps"
SOURCE_HEIGHT = "source_height"
SOURCE_WIDTH = "source_width"
MOTION_SCORE = "motion_score"
CLIP_SCORE = "clip_score"
AESTHETIC_SCORE = "aesthetic_score"
SCORES = (MOTION_SCORE, CLIP_SCORE, AESTHETIC_SCORE)
# per-view columns (use `view_column`)
FRAME_INDICES = "frame_indices"
FPS = "fps"
NUM_FRAMES = "num_frames"
HEIGHT = "height"
WIDTH = "width"
LATENTS = "latents"
PER_VIEW = (FRAME_INDICES, FPS, NUM_FRAMES, HEIGHT, WIDTH, LATENTS)
PROMPT_EMBEDS = "prompt_embeds"

# --- rejected columns ----------------------------------------------------------------------------
STAGE = "stage"
REASON = "reason"
MESSAGE = "message"


class Stage:
    READ = "read"
    METADATA = "metadata"
    DECODE = "decode"
    MOTION = "motion"
    SCORE = "score"
    ENCODE = "encode"
    WRITE = "write"


class Reason:
    """Reason codes in the rejected table (a score under its threshold is a rejection too)."""

    SHARD_UNREADABLE = "shard_unreadable"  # the shard could not be opened or is not a tar
    SHARD_TRUNCATED = "shard_truncated"  # the shard ends inside this sample
    MISSING_MEDIA = "missing_media"  # no video/image member
    MISSING_CAPTION = "missing_caption"  # no caption member
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    EMPTY_CAPTION = "empty_caption"
    BAD_JSON = "bad_json"  # sample json unparsable
    EMPTY_FILE = "empty_file"  # zero-byte media
    NOT_VIDEO = "not_video"  # bytes are not a known container / image format
    TRUNCATED_FILE = "truncated_file"  # byte size differs from the json's format.size
    TOO_LARGE = "too_large"  # declared resolution, duration or byte size beyond the limits
    TOO_SHORT = "too_short"  # declared duration below the minimum
    LOW_RESOLUTION = "low_resolution"
    DECODE_ERROR = "decode_error"  # the decoder raised
    DECODER_CRASH = "decoder_crash"  # the decoder process died (e.g. SIGSEGV); the job went on
    DECODE_TIMEOUT = "decode_timeout"
    TOO_FEW_FRAMES = "too_few_frames"  # the video is shorter than a clip
    STATIC = "static"  # motion score below threshold
    LOW_CLIP_SCORE = "low_clip_score"
    LOW_AESTHETIC = "low_aesthetic"
    SCORE_ERROR = "score_error"  # CLIP / aesthetic model raised on this clip
    ENCODE_ERROR = "encode_error"
    MIXED_SHAPES = "mixed_shapes"  # a clip whose latent shape differs from the rest of its shard
    DUPLICATE_KEY = "duplicate_key"  # a later copy of a key already read from this shard


# --- file metadata keys (values are JSON text) -----------------------------------------------------
META_SCHEMA_VERSION = "t2v.schema_version"
META_PIPELINE_VERSION = "t2v.pipeline_version"
META_CONFIG_HASH = "t2v.config_hash"  # hash of every config field that changes the output
META_VAE = "t2v.vae"  # hub id or path of the SD model holding the VAE
META_VAE_REVISION = "t2v.vae_revision"  # resolved hub commit, or "" for a local directory
META_VAE_HASH = "t2v.vae_hash"  # sha256 of the VAE's config (+ weights when local)
META_SCALING_FACTOR = "t2v.scaling_factor"  # vae.config.scaling_factor, already applied
META_LATENT_DIST = "t2v.latent_dist"  # "mean" or "sample"
META_LATENTS_DTYPE = "t2v.latents_dtype"
META_VIEWS = "t2v.views"  # {view: {num_frames, fps, frame_stride, height, width, latents_shape, columns}}
META_DECODE = "t2v.decode"  # clip sampling: clips_per_video, start policy, seed
META_FILTERS = "t2v.filters"  # thresholds in force
META_TEXT_ENCODER = "t2v.text_encoder"  # model of prompt_embeds, or null
META_SHARD = "t2v.shard"  # input shard URI
META_SHARD_SAMPLES = "t2v.shard_samples"  # samples read from the input shard
META_KEYS = (
    META_SCHEMA_VERSION,
    META_PIPELINE_VERSION,
    META_CONFIG_HASH,
    META_VAE,
    META_VAE_REVISION,
    META_VAE_HASH,
    META_SCALING_FACTOR,
    META_LATENT_DIST,
    META_LATENTS_DTYPE,
    META_VIEWS,
    META_DECODE,
    META_FILTERS,
    META_TEXT_ENCODER,
    META_SHARD,
    META_SHARD_SAMPLES,
)


def view_column(name: str, view: str, primary: str) -> str:
    """Column `name` of `view`: unsuffixed for the primary view, `name_<view>` otherwise."""
    return name if view == primary else f"{name}_{view}"


def latents_shape(num_frames: int, height: int, width: int, channels: int = 4, factor: int = 8) -> list[int]:
    """(F, C, H/8, W/8) of a view's latents."""
    return [num_frames, channels, height // factor, width // factor]


def tensor_type(dtype: str, shape: list[int]) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), shape)


def clips_schema(
    views: dict[str, dict],
    primary: str,
    latents_dtype: str,
    prompt_embeds_shape: list[int] | None,
    metadata: dict[str, Any] | None = None,
) -> pa.Schema:
    """Arrow schema of a clips file; `views[name]["latents_shape"]` gives each view's tensor shape."""
    fields = [
        (KEY, pa.string()),
        (SHARD, pa.string()),
        (CLIP_INDEX, pa.int32()),
        (MEDIA, pa.string()),
        (CAPTION, pa.string()),
        (START_S, pa.float32()),
        (SOURCE_FPS, pa.float32()),
        (SOURCE_HEIGHT, pa.int32()),
        (SOURCE_WIDTH, pa.int32()),
        (MOTION_SCORE, pa.float32()),
        (CLIP_SCORE, pa.float32()),
        (AESTHETIC_SCORE, pa.float32()),
    ]
    for view, spec in views.items():
        col = lambda n, view=view: view_column(n, view, primary)  # noqa: E731
        fields += [
            (col(FRAME_INDICES), pa.list_(pa.int32())),
            (col(FPS), pa.float32()),
            (col(NUM_FRAMES), pa.int32()),
            (col(HEIGHT), pa.int32()),
            (col(WIDTH), pa.int32()),
            (col(LATENTS), tensor_type(latents_dtype, spec["latents_shape"])),
        ]
    if prompt_embeds_shape is not None:
        fields.append((PROMPT_EMBEDS, tensor_type("float16", prompt_embeds_shape)))
    return pa.schema(fields, metadata=encode_metadata(metadata or {}))


REJECTED_SCHEMA = pa.schema(
    [
        (KEY, pa.string()),
        (SHARD, pa.string()),
        (CLIP_INDEX, pa.int32()),
        (STAGE, pa.string()),
        (REASON, pa.string()),
        (MESSAGE, pa.string()),
        (MOTION_SCORE, pa.float32()),
        (CLIP_SCORE, pa.float32()),
        (AESTHETIC_SCORE, pa.float32()),
    ]
)


def encode_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {k.encode(): to_json(v, sort_keys=True).encode() for k, v in meta.items()}


def decode_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The `t2v.*` metadata of a file's schema (e.g. `pq.read_schema(path)`), JSON-decoded."""
    raw = schema.metadata or {}
    return {k.decode(): json.loads(v) for k, v in raw.items() if k.startswith(b"t2v.")}


def latents_array(table: pa.Table, column: str = LATENTS) -> np.ndarray:
    """(N, F, C, h, w) numpy latents of a clips table (plain pyarrow + numpy)."""
    return table.column(column).combine_chunks().to_numpy_ndarray()
