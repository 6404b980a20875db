"""Training data: the pipeline's Parquet latents (pipeline/schema.py), checked, and batch collation.

The driver checks the store against the model config (`inspect_store`); `split.py` chooses the held-out
validation clips (`is_validation`: a hash of the key) once per run and `rows.py` reads each rank's batches
of an epoch; joint training's image store streams through Ray Data (`build_datasets`). Numpy batches become
`(B, C, F, h, w)` latents in `collate`. Training never decodes video or runs the VAE encoder.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline import schema
from pipeline.raysession import where_resolved
from training.config import TrainConfig

log = logging.getLogger(__name__)


class LatentStoreError(ValueError):
    """The latent store is missing, empty, or was made with another VAE / scaling factor / text encoder."""


CACHE_LIMIT_BYTES = 1 << 30


@dataclass
class StoreInfo:
    """What the driver learned from the store's Parquet footers: where, which columns, what shape."""

    clips_path: str
    latents_column: str
    latents_shape: list[int]  # (F_stored, C, h, w)
    has_prompt_embeds: bool
    metadata: dict[str, Any]
    total_bytes: int = 0  # of all Parquet files in the store
    cond_column: str | None = None  # SR stage: latents of cascade.cond_view (same frames, lower resolution)
    cond_shape: list[int] | None = None  # (F_stored, C, h / scale, w / scale)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or a URI (s3://, gs://, ...)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def parquet_files(fs: pafs.FileSystem, fs_path: str) -> list[pafs.FileInfo]:
    """The `.parquet` files of a directory, sorted by path (the order every reader of a store agrees on)."""
    infos = fs.get_file_info(pafs.FileSelector(fs_path))
    return sorted((f for f in infos if f.path.endswith(".parquet")), key=lambda f: f.path)


def _clips_path(path: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, fs path, user-facing path) of the clips directory given the pipeline output or clips dir."""
    fs, fs_path = filesystem(path)
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        raise LatentStoreError(
            f"data.path not found: {path}{where_resolved(str(path))} (run `python -m pipeline.run ... "
            f"--output {path}` first)"
        )
    if info.type == pafs.FileType.File:
        raise LatentStoreError(
            f"data.path={path} is a file: pass the pipeline's --output directory (or its clips/ directory)"
        )
    sub = fs_path.rstrip("/") + "/clips"
    if fs.get_file_info(sub).type == pafs.FileType.Directory:
        fs_path = sub
        path = path.rstrip("/") + "/clips"
    return fs, fs_path, path


def _vae_scaling_factor(pretrained: str) -> float:
    from diffusers import AutoencoderKL

    return float(AutoencoderKL.load_config(pretrained, subfolder="vae")["scaling_factor"])


def _same_model(recorded: str, configured: str) -> bool:
    """Hub ids compare as strings; local directories by their resolved path."""
    if recorded == configured:
        return True
    a, b = Path(recorded), Path(configured)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _same_vae(meta: dict[str, Any], pretrained: str, revision: str | None) -> bool:
    """The configured base has the VAE the latents were encoded with: same id/dir, or same VAE files (hash)."""
    if _same_model(str(meta.get(schema.META_VAE)), pretrained):
        return True
    if not Path(pretrained).is_dir():
        return False  # a different hub id
    from pipeline.config import EncodeConfig
    from pipeline.encode import model_info

    return model_info(EncodeConfig(model=pretrained, revision=revision or ""))["vae_hash"] == meta.get(
        schema.META_VAE_HASH
    )


def inspect_store(cfg: TrainConfig) -> StoreInfo:
    """Open the store's first Parquet file and refuse it if it does not fit `cfg` (clear error, no training)."""
    if not cfg.data.path:
        raise LatentStoreError(
            "no training data: pass --data LATENTS (the pipeline's --output dir) or set data.path"
        )
    needed = (cfg.model.num_frames - 1) * cfg.data.frame_stride + 1
    return _inspect(cfg, cfg.data.path, cfg.data.view, needed, "data.view", with_cond_view=True)


def inspect_image_store(cfg: TrainConfig, clips: StoreInfo) -> StoreInfo | None:
    """The image store of joint image-video training (None without data.images_per_clip): single-frame latents
    of the same VAE, channels and size as the clips'."""
    if cfg.data.images_per_clip <= 0:
        return None
    info = _inspect(cfg, cfg.data.image_path, cfg.data.image_view, 1, "data.image_view")
    if info.latents_shape[1:] != clips.latents_shape[1:]:
        raise LatentStoreError(
            f"image store {cfg.data.image_path} holds latents {info.latents_shape[1:]} (C, h, w), the clips "
            f"{clips.latents_shape[1:]}: curate both at the same resolution"
        )
    if info.latents_shape[0] != 1:
        log.warning(
            "image store %s holds %d frames per row; training uses the first",
            cfg.data.image_path,
            info.latents_shape[0],
        )
    return info


def _inspect(
    cfg: TrainConfig,
    data_path: str,
    data_view: str | None,
    needed: int,
    view_field: str,
    with_cond_view: bool = False,
) -> StoreInfo:
    """A store's Parquet footers checked against `cfg` and against each other (every file must agree with the
    first: one VAE, one latent layout); `with_cond_view`: also SR's low-resolution view. Reads no row data."""
    fs, fs_path, path = _clips_path(data_path)
    infos = parquet_files(fs, fs_path)
    files = [f.path for f in infos]
    if not files:
        raise LatentStoreError(f"no .parquet files in {path}")
    footers = _read_footers(fs, files, path)
    for footer in footers:
        if not schema.decode_metadata(footer.schema):
            raise LatentStoreError(f"{footer.path} has no t2v.* metadata: not written by pipeline.run")
    _check_agreement(footers)
    file_schema = footers[0].schema
    meta = schema.decode_metadata(file_schema)
    if not any(f.num_rows for f in footers):
        raise LatentStoreError(
            f"no clips in {path}: its {len(files)} .parquet files hold 0 rows (every sample was rejected?)"
        )
    views = meta.get(schema.META_VIEWS, {})
    primary = next(iter(views), None)
    view = data_view or primary
    if view not in views:
        raise LatentStoreError(f"{view_field}={view!r} not in the views {sorted(views)} of {path}")
    column = schema.view_column(schema.LATENTS, view, primary)
    shape = list(views[view]["latents_shape"])

    vae = meta.get(schema.META_VAE)
    if not _same_vae(meta, cfg.model.pretrained, cfg.model.revision):
        raise LatentStoreError(
            f"latents in {path} were encoded with the VAE of {vae!r}, but model.pretrained="
            f"{cfg.model.pretrained!r} has another VAE; re-run the pipeline with that model or train on the "
            "matching base"
        )
    expected = _vae_scaling_factor(cfg.model.pretrained)
    recorded = meta.get(schema.META_SCALING_FACTOR)
    if recorded is None or abs(float(recorded) - expected) > 1e-6:
        raise LatentStoreError(
            f"latents in {path} were scaled by {recorded}, but {cfg.model.pretrained}'s vae.config.scaling_factor "
            f"is {expected}"
        )
    if shape[0] < needed:
        raise LatentStoreError(
            f"view {view!r} of {path} stores {shape[0]} frames; model.num_frames={cfg.model.num_frames} with "
            f"data.frame_stride={cfg.data.frame_stride} needs {needed}"
        )
    # Precomputed prompt embeddings are used only if they come from this base's text encoder.
    text_encoder = str(meta.get(schema.META_TEXT_ENCODER))
    has_embeds = schema.PROMPT_EMBEDS in file_schema.names and any(
        _same_model(text_encoder, c) for c in (cfg.model.pretrained, f"{cfg.model.pretrained}/text_encoder")
    )
    cond_column, cond_shape = _cond_view(cfg, views, view, primary, path) if with_cond_view else (None, None)
    return StoreInfo(
        path, column, shape, has_embeds, meta, sum(f.size for f in infos), cond_column, cond_shape
    )


@dataclass
class Footer:
    """What one Parquet file's footer tells: its Arrow schema (with the t2v.* metadata) and row count."""

    path: str  # as the user named the store
    schema: pa.Schema
    num_rows: int


def _read_footers(fs: pafs.FileSystem, files: list[str], path: str) -> list[Footer]:
    """Every file's footer (no row data), a few at a time: remote stores answer each read slowly."""
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(lambda f: _read_footer(fs, f, path), files))


def _read_footer(fs: pafs.FileSystem, fs_file: str, path: str) -> Footer:
    """One file's footer; an unreadable one (e.g. truncated by a killed writer) is named."""
    name = f"{path.rstrip('/')}/{fs_file.rsplit('/', 1)[-1]}"
    try:
        with fs.open_input_file(fs_file) as f:
            parquet = pq.ParquetFile(f)
            return Footer(name, parquet.schema_arrow, parquet.metadata.num_rows)
    except (OSError, pa.ArrowException) as exc:
        raise LatentStoreError(
            f"{name}: cannot read its Parquet footer ({exc}); a truncated or partly written file? Re-run the "
            "pipeline for its shard or move it out of the store"
        ) from exc


AGREED = (schema.META_VAE_HASH, schema.META_SCALING_FACTOR, schema.META_LATENTS_DTYPE)
"""The `t2v.*` metadata every file of a store must share with the first (views' latents_shape too)."""


def _layout(footer: Footer) -> dict[str, Any]:
    """A file's fields that must match across the store: VAE, scaling, latent dtype and shapes, tensor types."""
    meta = schema.decode_metadata(footer.schema)
    out = {k: meta.get(k) for k in AGREED}
    for view, spec in meta.get(schema.META_VIEWS, {}).items():
        out[f"{schema.META_VIEWS}[{view}].latents_shape"] = spec.get("latents_shape")
    for f in footer.schema:
        if (tensor := _tensor_type(f)) is not None:
            out[f"column {f.name!r} type"] = tensor
    return out


def _tensor_type(f: pa.Field) -> str | None:
    """A tensor column's full type (extension name, value type, shape, dim names, field metadata), else None."""
    meta = f.metadata or {}
    if not isinstance(f.type, pa.BaseExtensionType) and not any(k.startswith(b"ARROW:ext") for k in meta):
        return None
    return f"{f.type} {dict(sorted(meta.items()))}" if meta else str(f.type)


def _check_agreement(footers: list[Footer]) -> None:
    """Refuse a store whose files disagree with the first: Ray Data would mix VAEs or fail mid-run."""
    first = _layout(footers[0])
    bad = []
    for footer in footers[1:]:
        layout = _layout(footer)
        diff = [k for k in {**first, **layout} if first.get(k) != layout.get(k)]
        if diff:
            bad.append((footer, layout, diff))
    if not bad:
        return
    footer, layout, diff = bad[0]
    fields = "; ".join(f"{k} is {layout.get(k)!r} (first file: {first.get(k)!r})" for k in diff)
    more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
    raise LatentStoreError(
        f"{footer.path}{more} does not match {footers[0].path}, the store's first file: {fields}. One store "
        "holds one pipeline run's latents: move the odd files out or re-encode them"
    )


def _cond_view(
    cfg: TrainConfig, views: dict[str, Any], view: str, primary: str, path: str
) -> tuple[str | None, list[int] | None]:
    """The SR stage's low-resolution view: same frames as `view` (same count, rate and stride), size / scale."""
    c = cfg.cascade
    if c.stage != "sr":
        return None, None
    if c.cond_view not in views:
        raise LatentStoreError(
            f"cascade.cond_view={c.cond_view!r} not in the views {sorted(views)} of {path}"
        )
    if c.cond_view == view:
        raise LatentStoreError(f"cascade.cond_view={c.cond_view!r} is the training view itself")
    hi, lo = views[view], views[c.cond_view]
    timing = ("num_frames", "fps", "frame_stride")
    if any(hi.get(k) != lo.get(k) for k in timing):
        raise LatentStoreError(
            f"views {view!r} and {c.cond_view!r} of {path} do not hold the same frames: "
            f"{ {k: hi.get(k) for k in timing} } vs { {k: lo.get(k) for k in timing} }"
        )
    hi_shape, lo_shape = list(hi["latents_shape"]), list(lo["latents_shape"])
    if hi_shape[2:] != [n * c.scale for n in lo_shape[2:]] or hi_shape[1] != lo_shape[1]:
        raise LatentStoreError(
            f"view {view!r} latents {hi_shape} are not cascade.scale={c.scale} x view {c.cond_view!r} "
            f"latents {lo_shape}"
        )
    return schema.view_column(schema.LATENTS, c.cond_view, primary), lo_shape


def is_validation(key: str, fraction: float) -> bool:
    """Stable held-out membership: a hash of the key, independent of order, workers and runs."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32
    return bucket < fraction


def feed_columns(info: StoreInfo) -> list[str]:
    """The columns training reads of a store: key, caption, the view's latents (+ SR's low-resolution view,
    + prompt embeddings)."""
    columns = [schema.KEY, schema.CAPTION, info.latents_column]
    if info.cond_column is not None:
        columns.append(info.cond_column)
    if info.has_prompt_embeds:
        columns.append(schema.PROMPT_EMBEDS)
    return columns


def build_datasets(cfg: TrainConfig, images: StoreInfo | None) -> dict[str, Any]:
    """The Ray Datasets Ray Train splits among the workers: {"images": ds} of joint training's image store
    (key, caption, latents [+ prompt_embeds]; not split into train / val), else {}. The clips are read by
    each rank itself (`rows.py`), from the split `split.py` chose."""
    import ray.data

    if images is None:
        return {}
    # Reading latents is light work: small CPU slices, so data tasks fit beside the training workers.
    # Ordered execution makes each worker's shard, and so a resumed run, deterministic.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet(images.clips_path, file_extensions=["parquet"], num_cpus=0.25)
    ds = ds.select_columns(feed_columns(images))
    if _cache(cfg, images):  # every pass re-executes a lazy dataset; keep a small one
        ds = ds.materialize()
    return {"images": ds}


def _cache(cfg: TrainConfig, info: StoreInfo) -> bool:
    return cfg.data.cache == "always" or (cfg.data.cache == "auto" and info.total_bytes < CACHE_LIMIT_BYTES)


class ImageStream:
    """Endless batches of this rank's share of the image store (joint training), reshuffled every pass.

    Its position lives in the trainer state (`image_epoch`, `image_batches`), saved with every checkpoint, so a
    resumed run skips what was drawn and then draws the images an uninterrupted run would."""

    def __init__(self, shard, batch_size: int, seed: int, shuffle_buffer: int, state):
        self.shard, self.batch_size, self.seed = shard, batch_size, seed
        self.buffer, self.state = shuffle_buffer, state
        self._it = None

    def _epoch(self):
        seen = 0
        for batch in self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=self.buffer or None,
            local_shuffle_seed=self.seed * 7919 + self.state.image_epoch,
        ):
            seen += 1
            if seen > self.state.image_batches:
                self.state.image_batches = seen
                yield batch
        if seen == 0:
            raise RuntimeError(
                f"this rank's share of the image store has fewer than {self.batch_size} images "
                "(optim.batch_size x data.images_per_clip)"
            )

    def next(self) -> dict[str, np.ndarray]:
        while True:
            if self._it is None:
                self._it = self._epoch()
            batch = next(self._it, None)
            if batch is not None:
                return batch
            self._it = None
            self.state.image_epoch, self.state.image_batches = self.state.image_epoch + 1, 0


def collate(
    batch: dict[str, np.ndarray],
    info: StoreInfo,
    num_frames: int,
    frame_stride: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """(latents (B, C, F, h, w) float32, captions, prompt_embeds (B, 77, D) or None) from a numpy batch.

    Picks `num_frames` frames every `frame_stride` from the stored clip, starting at a random frame drawn
    from `generator` (frame 0 when `generator` is None).
    """
    latents, captions, embeds, _ = collate_stage(batch, info, num_frames, frame_stride, generator, device)
    return latents, captions, embeds


def collate_stage(
    batch: dict[str, np.ndarray],
    info: StoreInfo,
    num_frames: int,
    frame_stride: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, list[str], torch.Tensor | None, torch.Tensor | None]:
    """`collate` plus the SR stage's low-resolution latents (B, C, F, h', w') of the same frames (else None)."""

    def stored(column: str) -> torch.Tensor:
        return torch.from_numpy(np.array(batch[column], dtype=np.float32))  # (B, F_s, C, h, w)

    def window(latents: torch.Tensor) -> torch.Tensor:
        picked = latents[:, start : start + span : frame_stride]  # (B, F, C, h, w)
        return picked.permute(0, 2, 1, 3, 4).contiguous().to(device)  # (B, C, F, h, w)

    target = stored(info.latents_column)
    span = (num_frames - 1) * frame_stride + 1
    slack = target.shape[1] - span
    start = 0
    if generator is not None and slack:  # drawn on the generator's device (a CUDA generator on GPU)
        start = int(torch.randint(0, slack + 1, (1,), generator=generator, device=generator.device))
    latents = window(target)
    # The paired view shares the window: frame k of both is the same source frame.
    cond_latents = window(stored(info.cond_column)) if info.cond_column is not None else None
    captions = [str(c) for c in batch[schema.CAPTION]]
    embeds = None
    if schema.PROMPT_EMBEDS in batch:
        embeds = torch.from_numpy(np.array(batch[schema.PROMPT_EMBEDS], dtype=np.float32)).to(device)
    return latents, captions, embeds, cond_latents
