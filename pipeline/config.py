"""The curation pipeline's config: nested dataclasses loaded with `pipeline.configlib.load_config`.

    cfg = load_config(PipelineConfig, "pipeline/configs/demo.yaml", ["clip.min_score=0.2"])

Presets in `pipeline/configs/` hold only what they change. Every threshold and limit is a field here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pipeline import configlib
from pipeline.configlib import THRESHOLD, ConfigError, RangeTable, above, at_least, to_dict


@dataclass
class ReadConfig:
    RANGES: RangeTable = {
        "samples_per_block": at_least(1),
        "max_member_bytes": at_least(1),
        "num_cpus": at_least(0),
        "concurrency": at_least(0),
    }

    samples_per_block: int = 16
    """Samples per Ray Data block out of the reader (keep small: mp4 bytes ride in the block)."""
    max_member_bytes: int = 2**30
    """Tar members larger than this are streamed past unread and their sample rejected `too_large` (a
    memory guard while reading; `metadata.max_bytes` then bounds the media bytes that were read)."""
    video_exts: list[str] = field(default_factory=lambda: ["mp4", "webm", "mkv", "avi", "mov"])
    """Member extensions read as the sample's video."""
    image_exts: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """Member extensions read as the sample's image (image shards for joint training)."""
    caption_ext: str = "txt"
    """Member extension holding the caption."""
    caption_errors: Literal["reject", "replace"] = "reject"
    """A caption that is not UTF-8: reject the sample, or decode with U+FFFD replacements."""
    num_cpus: float = 1.0
    """CPUs reserved per read task (the metadata filter runs fused with it)."""
    concurrency: int = 0
    """Shards read at once (0 = as Ray Data sees fit); bounds the shards the driver holds open."""


@dataclass
class MetadataConfig:
    """Checks on the sample's json and bytes, before anything is decoded (cheap, and guards memory)."""

    RANGES: RangeTable = {
        "min_duration_s": at_least(0),
        "max_duration_s": above(0),
        "min_side": at_least(0),
        "max_side": at_least(1),
        "max_bytes": at_least(1),
    }

    enabled: bool = True
    """Run the metadata filter (the byte/size guards below stay on even when False)."""
    min_duration_s: float = 1.0
    """Reject videos whose declared duration is shorter (seconds)."""
    max_duration_s: float = 600.0
    """Reject videos whose declared duration is longer (seconds); decoding them costs too much."""
    min_side: int = 64
    """Reject sources whose declared shorter side is below this (pixels)."""
    max_side: int = 4096
    """Reject sources whose declared longer side is above this (pixels): decoded frames would not fit."""
    max_bytes: int = 512 * 2**20
    """Reject media files larger than this many bytes."""
    check_declared_size: bool = True
    """Reject files whose byte size differs from the json's `format.size` (truncated downloads)."""


@dataclass
class ViewConfig:
    """One output view: how many frames, at which rate, at which resolution."""

    RANGES: RangeTable = {
        "num_frames": at_least(1),
        "fps": at_least(0),
        "frame_stride": at_least(1),
        "height": at_least(8),
        "width": at_least(8),
    }

    num_frames: int = 16
    """Frames per clip (1 for image samples regardless)."""
    fps: float = 0.0
    """Target frame rate, sampled by timestamps; 0 means use `frame_stride` on source frames."""
    frame_stride: int = 1
    """Take every n-th source frame (used when `fps` is 0; PYoCo's base model uses 5)."""
    height: int = 256
    """Output height (pixels, multiple of 8): resize the shorter side, then center-crop."""
    width: int = 256
    """Output width (pixels, multiple of 8)."""


@dataclass
class DecodeConfig:
    RANGES: RangeTable = {
        "clips_per_video": at_least(1),
        "seed": at_least(0),
        "timeout_s": above(0),
        "max_samples_per_process": at_least(1),
        "batch_size": at_least(1),
        "concurrency": at_least(1),
        "num_cpus": at_least(0),
    }

    clips_per_video: int = 1
    """Clips taken from each video (each becomes one output row)."""
    start: Literal["center", "uniform", "random"] = "center"
    """Clip start: centred, spread evenly over the video, or random (seeded by `seed` and the key)."""
    seed: int = 0
    """Seed for the `random` start policy."""
    timeout_s: float = 60.0
    """Wall-clock limit for decoding one sample; a hung decoder is killed and the sample rejected."""
    max_samples_per_process: int = 500
    """Restart the isolated decoder process after this many samples (decord leaks memory)."""
    batch_size: int = 4
    """Samples per decode batch (small: decoded frames are ~100x the mp4)."""
    concurrency: int = 1
    """Decode actors (each owns one crash-isolated decoder process)."""
    num_cpus: float = 1.0
    """CPUs reserved per decode actor."""


@dataclass
class MotionConfig:
    RANGES: RangeTable = {"min_score": THRESHOLD, "size": at_least(1)}

    enabled: bool = True
    """Compute the motion score and drop static clips."""
    min_score: float = 0.002
    """Reject clips whose mean absolute frame difference (grey, 0-1 scale) is below this."""
    size: int = 32
    """Frames are downsampled to this square size before differencing."""


@dataclass
class ClipConfig:
    RANGES: RangeTable = {"num_frames": at_least(1), "min_score": THRESHOLD}

    enabled: bool = True
    """Compute the CLIP text-video similarity and filter on it."""
    model: str = "ViT-L-14"
    """open_clip model name, "hf-hub:org/repo" or "local-dir:/path"."""
    pretrained: str = "openai"
    """open_clip pretrained tag or checkpoint path ('' for none, e.g. with local-dir:)."""
    num_frames: int = 4
    """Frames per clip embedded (evenly spaced); their embeddings are averaged."""
    min_score: float = 0.2
    """Reject clips whose cosine similarity with the caption is below this."""


@dataclass
class AestheticConfig:
    RANGES: RangeTable = {"min_score": THRESHOLD}

    enabled: bool = True
    """Score frames with the LAION improved aesthetic predictor (on the CLIP embeddings)."""
    head: str = "models/sac+logos+ava1-l14-linearMSE.pth"
    """Path to the aesthetic MLP state dict (LAION's public layout)."""
    min_score: float = 4.5
    """Reject clips whose mean aesthetic score over the CLIP frames is below this."""


@dataclass
class ScoreConfig:
    """Where CLIP (+ aesthetic head) runs, once per clip: in the encode actors (default) or its own pool."""

    RANGES: RangeTable = {
        "batch_size": at_least(1),
        "concurrency": at_least(1),
        "num_cpus": at_least(0),
        "num_gpus": at_least(0),
        "torch_threads": at_least(1),
    }

    own_actors: bool = False
    """False: score inside the encode actors (one model actor per slot loads CLIP, head and VAE; clips skip an
    object-store hop, and on a small machine the models load once, not twice). True: a scoring pool of its own,
    sized by the fields below, to scale scoring and encoding separately (e.g. GPU fractions for each)."""
    batch_size: int = 16
    """Clips per scoring batch."""
    concurrency: int = 1
    """Scoring actors (with `own_actors`)."""
    num_cpus: float = 1.0
    """CPUs reserved per scoring actor (with `own_actors`)."""
    num_gpus: float = 0.0
    """GPUs per scoring actor (with `own_actors`; 0 on CPU-only clusters; fractions share a GPU)."""
    torch_threads: int = 1
    """torch intra-op threads per actor on CPU (with `own_actors`; else the encode actor's)."""


@dataclass
class EncodeConfig:
    RANGES: RangeTable = {
        "frames_per_batch": at_least(1),
        "batch_size": at_least(1),
        "concurrency": at_least(1),
        "num_cpus": at_least(0),
        "num_gpus": at_least(0),
        "torch_threads": at_least(1),
    }

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Stable Diffusion hub id or local diffusers directory holding the VAE (and text encoder)."""
    vae_subfolder: str = "vae"
    """Subfolder of `model` with the AutoencoderKL."""
    revision: str = ""
    """Hub revision (branch, tag or commit) of `model`; '' for the default branch."""
    latent_dist: Literal["mean", "sample"] = "mean"
    """Store the posterior mean, or a sample (seeded per clip)."""
    latents_dtype: Literal["float16", "float32"] = "float16"
    """dtype of the stored latents."""
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """VAE compute dtype: auto = float16 on GPU, float32 on CPU."""
    frames_per_batch: int = 32
    """Frames through the VAE at once."""
    text_embeds: bool = False
    """Also store the SD text encoder's caption embeddings (`prompt_embeds`)."""
    batch_size: int = 8
    """Clips per encode batch."""
    concurrency: int = 1
    """Encoder actors."""
    num_cpus: float = 1.0
    """CPUs reserved per encoder actor."""
    num_gpus: float = 0.0
    """GPUs per encoder actor."""
    torch_threads: int = 1
    """torch intra-op threads per actor on CPU."""


@dataclass
class WriteConfig:
    RANGES: RangeTable = {"row_group_size": at_least(1), "lock_stale_s": above(0)}

    compression: str = "zstd"
    """Parquet compression codec."""
    row_group_size: int = 256
    """Rows per Parquet row group."""
    overwrite: bool = False
    """Allow writing into an output written with a different config (otherwise an error)."""
    plot: bool = True
    """Write summary.png with the score distributions and thresholds."""
    lock_stale_s: float = 300.0
    """A run's lock on the output (pipeline.lock) whose heartbeat is older than this is stale and taken over."""


@dataclass
class RayConfig:
    RANGES: RangeTable = {"num_cpus": at_least(0), "max_block_mb": above(0), "max_retries": at_least(0)}

    address: str = ""
    """Ray address ('' = connect to a running cluster if in one, else start a local Ray)."""
    num_cpus: int = 0
    """CPUs for a local Ray started by the CLI (0 = all)."""
    max_block_mb: float = 32.0
    """Ray Data target max block size (MiB); small keeps decoded frames from spilling."""
    max_retries: int = 2
    """Retries of a crashed Ray task/actor (Ray Data's default of infinite would hang on a crash loop)."""
    progress_bars: bool = True
    """Show Ray Data's progress bars."""


@dataclass
class PipelineConfig:
    input: str = ""
    """Shards: a directory, a glob or a URI (s3://bucket/webvid/{00000..00099}.tar is not expanded; use a glob)."""
    output: str = ""
    """Output directory (local path or URI): clips/, rejected/, summary.json."""
    read: ReadConfig = field(default_factory=ReadConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    views: dict[str, ViewConfig] = field(default_factory=lambda: {"main": ViewConfig()})
    """Output views by name; the first is the primary one (unsuffixed columns, used by the filters)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        """What the per-field `RANGES` cannot say (checked before this runs)."""
        if not self.views:
            raise ConfigError("views must hold at least one view")
        for name, view in self.views.items():
            if not name.isidentifier():
                raise ConfigError(f"view name {name!r} must be an identifier (it becomes a column suffix)")
            if view.height % 8 or view.width % 8:
                raise ConfigError(
                    f"views.{name} size {view.height}x{view.width} must be multiples of 8 (VAE /8)"
                )
        m = self.metadata
        if m.min_duration_s > m.max_duration_s or m.min_side > m.max_side:
            raise ConfigError(
                f"metadata: min_duration_s ({m.min_duration_s:g}) <= max_duration_s ({m.max_duration_s:g}) and "
                f"min_side ({m.min_side}) <= max_side ({m.max_side}) are required"
            )

    @property
    def primary_view(self) -> str:
        return next(iter(self.views))


def from_dict(tree: dict) -> PipelineConfig:
    """A `PipelineConfig` from `pipeline.configlib.to_dict(cfg)` (how stages receive it across Ray)."""
    return configlib.from_dict(PipelineConfig, tree)


# Config fields that only change speed or placement, not the output (left out of the config hash).
_RUNTIME_FIELDS = {
    "batch_size",
    "concurrency",
    "num_cpus",
    "num_gpus",
    "torch_threads",
    "timeout_s",
    "max_samples_per_process",
    "samples_per_block",
    "frames_per_batch",
    "own_actors",
    "max_member_bytes",  # a memory guard above metadata.max_bytes: with the defaults it rejects nothing more
}


def config_hash(cfg: PipelineConfig) -> str:
    """Hash of every config field that changes what is written (not input/output/ray/write/speed knobs)."""
    tree = to_dict(cfg)
    for k in ("input", "output", "ray", "write"):
        tree.pop(k)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in _RUNTIME_FIELDS}
        return node

    return hashlib.sha256(json.dumps(strip(tree), sort_keys=True).encode()).hexdigest()[:16]
