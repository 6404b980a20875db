"""Curate WebVid-style shards into VAE-latent Parquet for training.

    python -m pipeline.run --config pipeline/configs/demo.yaml --input data/demo --output runs/curated
    ray job submit -- python -m pipeline.run --config pipeline/configs/webvid_sd15.yaml \\
        --input 's3://bucket/webvid/*.tar' --output s3://bucket/curated clip.min_score=0.25

Read (tasks) -> metadata filter (fused) -> decode (actors, crash-isolated decoder) -> motion filter ->
CLIP + aesthetic (actors) -> VAE encode (actors) -> part files written by the encode actors. The driver
receives only small manifests (`pipeline.parts`) and, as each shard's parts are all there, starts a task that
commits its clips and rejected Parquet files. Streams: nothing is materialised. Re-running with the same
config skips complete shards and redoes partial ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from pipeline import schema as S
from pipeline import stream
from pipeline.config import PipelineConfig, config_hash
from pipeline.configlib import ConfigError, add_config_args, config_args, load_config, to_dict

log = logging.getLogger(__name__)


def prepare_models(cfg: PipelineConfig) -> None:
    """Local model paths made absolute, and a missing one refused naming its field (before any Ray work)."""
    from pipeline.raysession import LOCAL_DIR, check_local_model  # torch-free: the driver never imports torch

    def local(field: str, spec: str, needed: bool) -> str:
        if needed:
            return check_local_model(field, spec)
        return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec  # recorded as given

    cfg.encode.model = local("encode.model", cfg.encode.model, True)
    if cfg.clip.model.startswith(LOCAL_DIR):
        path = local("clip.model", cfg.clip.model[len(LOCAL_DIR) :], cfg.clip.enabled)
        cfg.clip.model = LOCAL_DIR + path
    cfg.aesthetic.head = local("aesthetic.head", cfg.aesthetic.head, cfg.aesthetic.enabled)


def file_metadata(cfg: PipelineConfig, info: dict) -> dict:
    views = {
        name: {
            "num_frames": v.num_frames,
            "fps": v.fps,
            "frame_stride": v.frame_stride,
            "height": v.height,
            "width": v.width,
            "latents_shape": S.latents_shape(
                v.num_frames, v.height, v.width, info["latent_channels"], info["downsample"]
            ),
            "columns": {c: S.view_column(c, name, cfg.primary_view) for c in S.PER_VIEW},
        }
        for name, v in cfg.views.items()
    }
    filters = {
        "metadata": to_dict(cfg.metadata),
        "motion": {"enabled": cfg.motion.enabled, "min_score": cfg.motion.min_score, "size": cfg.motion.size},
        "clip": {
            "enabled": cfg.clip.enabled,
            "model": cfg.clip.model,
            "pretrained": cfg.clip.pretrained,
            "num_frames": cfg.clip.num_frames,
            "min_score": cfg.clip.min_score,
        },
        "aesthetic": {
            "enabled": cfg.aesthetic.enabled,
            "head": cfg.aesthetic.head,
            "min_score": cfg.aesthetic.min_score,
        },
    }
    return {
        S.META_SCHEMA_VERSION: S.SCHEMA_VERSION,
        S.META_PIPELINE_VERSION: S.PIPELINE_VERSION,
        S.META_CONFIG_HASH: config_hash(cfg),
        S.META_VAE: cfg.encode.model,
        S.META_VAE_REVISION: info["vae_revision"],
        S.META_VAE_HASH: info["vae_hash"],
        S.META_SCALING_FACTOR: info["scaling_factor"],
        S.META_LATENT_DIST: cfg.encode.latent_dist,
        S.META_LATENTS_DTYPE: cfg.encode.latents_dtype,
        S.META_VIEWS: views,
        S.META_DECODE: {
            "clips_per_video": cfg.decode.clips_per_video,
            "start": cfg.decode.start,
            "seed": cfg.decode.seed,
            "resize": "shorter side, bicubic, center crop",
            "primary_view": cfg.primary_view,
        },
        S.META_FILTERS: filters,
        S.META_TEXT_ENCODER: f"{cfg.encode.model}/text_encoder" if cfg.encode.text_embeds else None,
    }


def init_ray(cfg: PipelineConfig) -> None:
    from ray.data import DataContext

    from pipeline.raysession import init_ray as connect

    # Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local Ray of ray.num_cpus.
    connect(cfg.ray.address or None, num_cpus=cfg.ray.num_cpus or None)
    ctx = DataContext.get_current()
    ctx.target_max_block_size = int(cfg.ray.max_block_mb * 2**20)
    ctx.enable_progress_bars = cfg.ray.progress_bars


def check_fits(cfg: PipelineConfig) -> None:
    """Refuse a layout whose actor pools leave no CPU for the read tasks: Ray Data would wait forever.

    Checked against the CPUs Ray has now; on a cluster with an autoscaler more may come, so only a warning.
    """
    import ray

    pools = [("decode", cfg.decode.concurrency, cfg.decode.num_cpus)]
    if cfg.score.own_actors:
        pools.append(("score", cfg.score.concurrency, cfg.score.num_cpus))
    pools.append(("encode", cfg.encode.concurrency, cfg.encode.num_cpus))
    need = sum(n * c for _, n, c in pools) + cfg.read.num_cpus
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have + 1e-9:
        detail = " + ".join(f"{name} {n} x {c:g}" for name, n, c in pools)
        msg = (
            f"the actor pools ({detail}) plus one read task ({cfg.read.num_cpus:g}) need {need:g} CPUs; Ray has "
            f"{have:g}. Lower <stage>.concurrency or <stage>.num_cpus (fractions are fine), or add CPUs"
        )
        if _local_cluster():  # no autoscaler will add CPUs here
            raise ConfigError(msg)
        log.warning("%s; waiting for the autoscaler to add them", msg)


def _local_cluster() -> bool:
    """True when every Ray node is this machine (a local Ray: no autoscaler will add CPUs)."""
    import socket

    import ray

    here = socket.gethostname()
    return all(n.get("NodeManagerHostname") == here for n in ray.nodes() if n.get("Alive"))


def build_dataset(cfg: PipelineConfig, shards, fs):
    """The lazy Ray Data pipeline over `shards` (nothing runs until it is iterated)."""
    import ray

    from pipeline.decode import DecodeStage
    from pipeline.encode import VaeEncoder
    from pipeline.filters import ClipScorer, MetadataFilter, MotionFilter
    from pipeline.parts import PartWriter
    from pipeline.read import ShardDatasource

    # max_retries / max_restarts go through `**ray_remote_args`, deprecated for Ray 2.64 but the only way
    # to bound retries in 2.60 (the pinned minor); the warning is silenced in `run`.
    d, retries = to_dict(cfg), cfg.ray.max_retries
    task = dict(batch_format="pyarrow", max_retries=retries)
    # Actors are restarted a finite number of times: Ray Data's default would retry a crash loop forever.
    actor = dict(batch_format="pyarrow", max_restarts=retries, max_task_retries=retries)
    # One read task per shard, and no extra splitting of their output (Ray Data splits the blocks of reads
    # with fewer than `read_op_min_num_blocks` tasks, and a split read is not fused with the map after it).
    ds = ray.data.read_datasource(
        ShardDatasource(shards, fs, cfg.read),
        override_num_blocks=len(shards),
        num_cpus=cfg.read.num_cpus,
        concurrency=cfg.read.concurrency or None,
        ray_remote_args={"max_retries": retries},
    )
    ds = ds.map_batches(
        stream.task_fn(MetadataFilter, d), batch_size=None, num_cpus=cfg.read.num_cpus, **task
    )

    def actor_pool(ds, stage_cls, section, cfg_tree: dict):
        """`stage_cls` on an actor pool sized by a config section (batch_size, concurrency, num_cpus/gpus)."""
        return ds.map_batches(
            stream.actor_cls(stage_cls),
            batch_size=section.batch_size,
            concurrency=section.concurrency,
            num_cpus=section.num_cpus,
            num_gpus=getattr(section, "num_gpus", 0) or None,
            **{**actor, "fn_constructor_args": (cfg_tree,)},
        )

    # The motion filter runs in the decode actors, (by default) scoring in the encode actors, and the encode
    # actors write what they encoded: chained stages skip a trip through the object store, their models load
    # once per actor, and no latent travels to the driver.
    ds = actor_pool(ds, stream.chain(DecodeStage, MotionFilter), cfg.decode, d)
    if cfg.score.own_actors:
        ds = actor_pool(ds, ClipScorer, cfg.score, d)
        ds = actor_pool(ds, stream.chain(VaeEncoder, PartWriter), cfg.encode, d)
    else:  # scoring runs in the encode actors, on their device and threads
        e = cfg.encode
        shared = {**d, "score": {**d["score"], "num_gpus": e.num_gpus, "torch_threads": e.torch_threads}}
        ds = actor_pool(ds, stream.chain(ClipScorer, VaeEncoder, PartWriter), cfg.encode, shared)
    return ds


def run(cfg: PipelineConfig) -> dict:
    """Run the pipeline over `cfg.input` into `cfg.output`; returns the summary (also in summary.json)."""
    from pipeline.read import list_shards
    from pipeline.write import OutOfSpace, OutputLock, OutputStore, out_of_space

    t_start = time.perf_counter()
    if not cfg.input or not cfg.output:
        raise ConfigError("both --input and --output are required")
    fs, shards = list_shards(cfg.input)  # the input first: a typo should not wait for the models to load
    # The metadata and config hash record the models as the user named them (a hub id, or the path as
    # given): inside a Ray job the resolved path is the job's temporary copy, different in every job.
    given = copy.deepcopy(cfg)
    prepare_models(cfg)
    store = None
    try:
        store = OutputStore(cfg.output)
        # One run per output: the lock is held until the summary is written.
        with OutputLock(store, cfg.write.lock_stale_s):
            return _curate(cfg, given, fs, shards, store, t_start)
    except Exception as exc:
        if not out_of_space(exc):
            raise
        raise OutOfSpace(no_space_message(cfg.output, store, shards)) from exc


def no_space_message(output: str, store, shards: list) -> str:
    """One line for a run stopped by a full output disk. Nothing is lost: complete shards stay (a shard is
    complete once both its files are renamed into place), the temp files left are removed by the next run."""
    done = len(store.complete_stems() & {s.stem for s in shards}) if store is not None else 0
    return (
        f"--output {output} is out of space (no space left on device): {done} of {len(shards)} shards are "
        "complete; free space, then run the same command to resume (complete shards are kept, the rest redone)"
    )


def _curate(cfg: PipelineConfig, given: PipelineConfig, fs, shards, store, t_start: float) -> dict:
    """`run` once the output is locked: skip complete shards, stream the rest, write the summary."""
    from pipeline.encode import model_info
    from pipeline.parts import Committer, ShardTracker, commit_as_complete, delete_parts
    from pipeline.summary import summarize
    from pipeline.write import ShardWriter

    info = model_info(cfg.encode)
    meta = file_metadata(given, info)
    info_views = meta[S.META_VIEWS]

    done = store.complete_stems()
    stale = [
        s
        for s in sorted(done)
        if S.decode_metadata(store.read_schema(s)).get(S.META_CONFIG_HASH) != meta[S.META_CONFIG_HASH]
    ]
    if stale and not cfg.write.overwrite:
        raise ConfigError(
            f"{cfg.output} holds shards written with another config (e.g. {stale[0]}); "
            "use a new --output, or write.overwrite=true to redo them"
        )
    done -= set(stale)
    for s in stale:
        for kind in ("clips", "rejected"):
            store.fs.delete_file(store.path(kind, s))
    # Leftovers of a killed run: temp files, rejected files without their clips file, and part files.
    removed = len(store.remove_partials()) + delete_parts(store)
    if removed:
        log.info("removed %d partial files from an interrupted run", removed)
    todo = [s for s in shards if s.stem not in done]
    log.info("%d shards: %d complete, %d to do", len(shards), len(shards) - len(todo), len(todo))

    by_stem = {s.stem: s for s in todo}
    tracker = ShardTracker()
    written: list[str] = []
    if todo:
        init_ray(cfg)
        check_fits(cfg)
        check_shared_output(store)
        if "://" not in cfg.output:  # the workers write parts here: resolved as the driver sees it
            cfg.output = store.root
        writer = ShardWriter(
            store,
            info_views,
            cfg.primary_view,
            cfg.encode.latents_dtype,
            info["prompt_embeds_shape"],
            meta,
            cfg.write.row_group_size,
            cfg.write.compression,
        )
        committer = Committer(writer, cfg.read.num_cpus, cfg.ray.max_retries)
        heartbeat = Heartbeat(len(todo))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = build_dataset(cfg, todo, fs)
        # The driver sees manifests only (a part of a shard, or its end); the commits write the shards.
        batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
        for finished in commit_as_complete(batches, tracker, committer):
            for stem, clips, rejected in finished:
                written.append(stem)
                heartbeat.shard_written(stem, clips, rejected)
            heartbeat.tick(tracker.open)
        if tracker.open:
            raise RuntimeError(f"shards ended incomplete (a pipeline bug): {sorted(tracker.open)}")
        delete_parts(store)  # what is left: parts of batches retried after their actor died, never named
        missing = set(by_stem) - set(written)
        if missing:
            raise RuntimeError(f"shards produced no rows (a pipeline bug): {sorted(missing)}")
    wall_s = time.perf_counter() - t_start
    return summarize(store, given, [s.stem for s in shards], written, tracker.stage_t, wall_s)


def check_shared_output(store) -> None:
    """Every node's workers write part files under the output: on a cluster a local path must be shared."""
    import pyarrow.fs as pafs

    if isinstance(store.fs, pafs.LocalFileSystem) and not _local_cluster():
        log.warning(
            "--output %s is a local path and Ray has nodes on other hosts: their encode actors write part files "
            "under it, so it must be a filesystem every node mounts (NFS, a mounted bucket); otherwise use a URI "
            "(s3://, gs://)",
            store.root,
        )


class Heartbeat:
    """Progress on the log while the stream runs (Ray Data's bars are off, or not a terminal): a line per
    written shard, and every `every_s` seconds the samples done so far."""

    def __init__(self, shards: int, every_s: float = 10.0):
        self.shards, self.every_s = shards, every_s
        self.started = self.last = time.perf_counter()
        self.written = 0
        log.info("streaming %d shards (the first rows come once the actors have loaded their models)", shards)

    def shard_written(self, stem: str, clips: int, rejected: int) -> None:
        self.written += 1
        log.info(
            "shard %s written: %d clips, %d rejected [%d/%d shards, %.0f s]",
            stem,
            clips,
            rejected,
            self.written,
            self.shards,
            time.perf_counter() - self.started,
        )

    def tick(self, open_shards: dict) -> None:
        """`open_shards`: stem -> `pipeline.parts.ShardParts` of the shards not yet complete."""
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        pending = sum(p.samples_done for p in open_shards.values())
        log.info(
            "%d/%d shards written, %d samples of %d open shards done [%.0f s]",
            self.written,
            self.shards,
            pending,
            len(open_shards),
            now - self.started,
        )


def parse_args(argv: list[str] | None = None) -> PipelineConfig:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    add_config_args(p, default_preset=None)
    p.add_argument("--input", help="shards: a directory, a glob or a URI (s3://, gs://)")
    p.add_argument("--output", help="output directory or URI: clips/, rejected/, summary.json")
    a = p.parse_args(argv)
    cfg = load_config(PipelineConfig, *config_args(a))
    # Set directly, not as overrides: a glob or URI is not always a valid YAML scalar.
    cfg.input, cfg.output = a.input or cfg.input, a.output or cfg.output
    return cfg


def main(argv: list[str] | None = None) -> int:
    from pipeline.write import OutOfSpace

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_args(argv)
        summary = run(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OutOfSpace as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "samples_in",
                    "clips_out",
                    "rejected",
                    "rejected_by_reason",
                    "shards_skipped",  # complete from an earlier run: not redone, not in clips_per_s
                    "clips_written_this_run",
                    "clips_per_s",
                    "output",
                )
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
