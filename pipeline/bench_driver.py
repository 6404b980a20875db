"""The driver's CPU per clip for SD-sized rows: the driver writing every shard (before) against the driver
receiving manifests only (after, `pipeline.parts`), and the ceiling on clips/s each puts on a whole cluster.

    python -m pipeline.bench_driver                       # ~2 minutes on 2 CPU cores
    python -m pipeline.bench_driver --clips 2048 --per-shard 256

`SdRows` stands in for the encode actors: batches of `--batch` stream rows shaped like SD 1.5 curation's
(`configs/webvid_sd15.yaml`: 24 x 4 x 32 x 32 fp16 latents, 77 x 768 fp16 prompt embeddings, seeded per
sample), `--per-shard` clips a shard. Two drivers consume them:

- before: every row comes to the driver, which writes each shard's Parquet files as the shard completes (the
  loop `pipeline.run` had: `ShardWriter` on the driver);
- after: the rows go through `PartWriter`, as in the encode actors; the driver runs `pipeline.parts`'
  `commit_as_complete` (the loop `pipeline.run` runs) and commit tasks on a local Ray write the shards.

Measured twice, as `time.process_time` of the driver process (every thread) from the first batch until the
last shard is written; the ceiling is its inverse. (a) The data path: the batches are made beforehand
(untimed) and handed to the loop, so the number is what the driver spends on what it receives, on starting
the commits and on waiting for them (Ray's own threads in the driver run meanwhile). (b) Through Ray Data:
`SdRows` runs in an actor and the driver iterates the dataset, so Ray Data's streaming executor, which runs
in the driver, counts too; it costs per block and per second of run whatever the blocks hold, the same before
and after, and so depends on how fast this machine's actor makes rows (the main thread alone is printed
beside it). Per run, not per clip, and untimed: `Committer` putting the writer in the object store. All
drivers write the same rows with the same writer, so the bench also checks that their files are
byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import stream
from pipeline.configlib import load_config

SD15 = Path(__file__).parent / "configs" / "webvid_sd15.yaml"
PROMPT_EMBEDS_SHAPE = [77, 768]  # CLIP ViT-L/14 text encoder: tokens x width
LATENT_CHANNELS, DOWNSAMPLE = 4, 8  # SD 1.5's VAE


class SdRows:
    """Stands in for the encode actors: batch numbers in, a batch of SD-sized stream rows out, the shard's
    `end` row after its last clip; through `PartWriter` when `output` is given, as the encode actors do."""

    def __init__(self, frames: int, latent_hw: int, batch: int, per_shard: int, output: str | None):
        from pipeline.parts import PartWriter

        self.frames, self.hw, self.batch, self.per_shard = frames, latent_hw, batch, per_shard
        self.parts = PartWriter({"output": output}) if output else None
        self.names = list(self.row(0, 0))  # the stream's columns that reach the encode actors' output

    def row(self, shard: int, index: int) -> dict:
        """Clip 0 of sample `index` of shard `shard`, alive; its tensors seeded by both."""
        rng = np.random.default_rng([shard, index])
        latents = rng.standard_normal((self.frames, LATENT_CHANNELS, self.hw, self.hw), np.float32)
        embeds = rng.standard_normal(PROMPT_EMBEDS_SHAPE, np.float32)
        return {
            "row_kind": stream.SAMPLE,
            "key": f"{shard:05d}{index:04d}",
            "shard": f"{shard:05d}",
            "shard_uri": f"bench://{shard:05d}.tar",
            "sample_index": index,
            "shard_samples": None,  # on `end` rows only
            "media": "video",
            "caption": f"a synthetic clip {shard}/{index}",
            "stage": "",
            "reason": "",
            "message": "",
            "clip_index": 0,
            "clips_in_sample": 1,
            "start_s": 0.0,
            "source_fps": 24.0,
            "source_height": 336,
            "source_width": 596,
            "clip_score": 0.3,
            "aesthetic_score": 5.0,
            "motion_score": 0.01,
            "frame_indices__main": np.arange(0, 4 * self.frames, 4, dtype=np.int32).tobytes(),
            "fps__main": 6.0,
            "latents__main": latents.astype(np.float16).tobytes(),
            "prompt_embeds": embeds.astype(np.float16).tobytes(),
            "t_encode": 0.01,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for b in batch.column("id").to_pylist():
            first = b * self.batch
            shard = first // self.per_shard
            rows += [self.row(shard, i % self.per_shard) for i in range(first, first + self.batch)]
            if (first + self.batch) % self.per_shard == 0:
                end = {"row_kind": stream.END, "key": "", "shard": f"{shard:05d}"}
                rows.append(end | {"shard_uri": f"bench://{shard:05d}.tar", "shard_samples": self.per_shard})
        table = stream.to_table(rows, self.names)
        return self.parts(table) if self.parts else table


def sd_config():
    """The SD 1.5 preset's `PipelineConfig`."""
    from pipeline.config import PipelineConfig

    return load_config(PipelineConfig, SD15, [])


def sd_writer(cfg, output: Path):
    """`ShardWriter` as `pipeline.run` builds it for `cfg` (the VAE's facts given, not loaded)."""
    from pipeline import schema as S
    from pipeline.run import file_metadata
    from pipeline.write import OutputStore, ShardWriter

    info = {
        "latent_channels": LATENT_CHANNELS,
        "downsample": DOWNSAMPLE,
        "vae_revision": "bench",
        "vae_hash": "0" * 64,
        "scaling_factor": 1.0,  # recorded only
    }
    meta = file_metadata(cfg, info)
    w = cfg.write
    return ShardWriter(
        OutputStore(str(output)),
        meta[S.META_VIEWS],
        cfg.primary_view,
        cfg.encode.latents_dtype,
        PROMPT_EMBEDS_SHAPE,
        meta,
        w.row_group_size,
        w.compression,
    )


def driver_writes(batches, writer) -> int:
    """Before: every row to the driver, which writes each shard once all its rows are in; returns clips."""
    from pipeline.parts import ShardParts

    open_shards: dict[str, tuple[ShardParts, list[dict]]] = {}
    stage_t: dict[str, list[float]] = {}
    clips = 0
    for batch in batches:
        for row in batch.to_pylist():
            for k, v in row.items():
                if k.startswith("t_") and v:
                    acc = stage_t.setdefault(k[2:], [0, 0.0])
                    acc[0], acc[1] = acc[0] + 1, acc[1] + v
            p, rows = open_shards.setdefault(row["shard"], (ShardParts(), []))
            p.shard_uri = row["shard_uri"]
            if row["row_kind"] == stream.END:
                p.expected = row["shard_samples"]
            else:
                rows.append(row)
                p.count([row["sample_index"]], [row["clips_in_sample"] or 1])
            if p.complete:
                clips += writer.write(row["shard"], rows, p.shard_uri, p.expected)[0]
                del open_shards[row["shard"]]
    return clips


def driver_commits(batches, committer) -> int:
    """After: manifests to the driver, commit tasks write the shards (`pipeline.run`'s loop); returns clips once
    every commit is done."""
    from pipeline.parts import ShardTracker, commit_as_complete

    return sum(c for done in commit_as_complete(batches, ShardTracker(), committer) for _, c, _ in done)


def measure(args, work: Path, mode: str, through_ray_data: bool) -> dict:
    """One driver (`mode` 'before' or 'after') over `args.clips` SD-sized clips, given its batches made beforehand
    or through Ray Data: CPU seconds of the driver process and of its main thread, wall seconds, clips written."""
    import ray

    from pipeline.parts import Committer

    out = work / f"{mode}-{'ray' if through_ray_data else 'path'}"
    cfg = sd_config()
    writer = sd_writer(cfg, out)
    view = cfg.views[cfg.primary_view]
    parts = str(out) if mode == "after" else None  # after: the rows go through `PartWriter`
    source = (view.num_frames, view.height // DOWNSAMPLE, args.batch, args.per_shard, parts)
    n = args.clips // args.batch
    if through_ray_data:
        ds = ray.data.range(n, override_num_blocks=n).map_batches(
            SdRows,
            fn_constructor_args=source,
            batch_size=1,
            batch_format="pyarrow",
            concurrency=1,
            num_cpus=1,
        )
        batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    else:
        make = SdRows(*source)
        batches = [make(pa.table({"id": [b]})) for b in range(n)]
    if mode == "after":  # once a run, not per clip: the writer goes to the object store, the task is defined
        committer = Committer(writer, cfg.read.num_cpus, cfg.ray.max_retries)
    cpu, main, wall = time.process_time(), time.thread_time(), time.perf_counter()
    clips = driver_writes(batches, writer) if mode == "before" else driver_commits(batches, committer)
    cpu, main, wall = time.process_time() - cpu, time.thread_time() - main, time.perf_counter() - wall
    return {"clips": clips, "cpu_s": cpu, "main_s": main, "wall_s": wall, "out": out}


def same_files(dirs: list[Path]) -> tuple[bool, int]:
    """(whether the Parquet files under every dir of `dirs` have the same names and bytes, how many in each)."""
    names = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*.parquet"))
    for d in dirs[1:]:
        if names != sorted(p.relative_to(d) for p in d.rglob("*.parquet")):
            return False, len(names)
        if not all(filecmp.cmp(dirs[0] / n, d / n, shallow=False) for n in names):
            return False, len(names)
    return True, len(names)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench_driver", description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=1024, help="clips per driver")
    p.add_argument(
        "--batch", type=int, default=None, help="clips per batch (default: the SD preset's encode.batch_size)"
    )
    p.add_argument("--per-shard", type=int, default=64, help="clips per shard")
    p.add_argument(
        "--workdir", default=None, help="where the shards are written (removed after); default: /tmp"
    )
    a = p.parse_args(argv)
    a.batch = a.batch or sd_config().encode.batch_size
    if a.per_shard % a.batch or a.clips % a.per_shard:
        p.error(f"--per-shard {a.per_shard} must be a multiple of --batch {a.batch}, --clips {a.clips} of it")

    import os

    import ray
    from ray.data import DataContext

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="bench-driver-", dir=a.workdir))
    try:
        results = {
            (ray_data, mode): measure(a, work, mode, ray_data)
            for ray_data in (False, True)
            for mode in ("before", "after")
        }
        identical, files = same_files([r["out"] for r in results.values()])
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    cfg = sd_config()
    v = cfg.views[cfg.primary_view]
    latents = [v.num_frames, LATENT_CHANNELS, v.height // DOWNSAMPLE, v.width // DOWNSAMPLE]
    raw = 2 * (np.prod(latents) + np.prod(PROMPT_EMBEDS_SHAPE))
    print(
        f"\nDriver CPU per clip on {cpus} CPU cores: {a.clips} clips of {' x '.join(map(str, latents))} fp16 latents "
        f"+ {' x '.join(map(str, PROMPT_EMBEDS_SHAPE))} fp16 prompt embeddings ({raw / 1e3:.0f} kB raw), "
        f"{a.clips // a.per_shard} shards of {a.per_shard}, batches of {a.batch}"
    )
    head = f"{'clips':>7s}{'CPU s':>8s}{'main s':>8s}{'ms/clip':>9s}{'ceiling clips/s':>17s}{'wall s':>8s}"
    labels = {
        "before": "before: the driver writes every shard",
        "after": "after: manifests; commit tasks write",
    }
    for ray_data, title in (
        (False, "(a) the data path"),
        (True, "(b) through Ray Data (its executor included)"),
    ):
        print(f"\n{title:48s}{head}")
        for mode in ("before", "after"):
            r = results[ray_data, mode]
            per_clip = r["cpu_s"] / r["clips"]
            print(
                f"    {labels[mode]:44s}{r['clips']:7d}{r['cpu_s']:8.2f}{r['main_s']:8.2f}{1e3 * per_clip:9.3f}"
                f"{1 / per_clip:17,.0f}{r['wall_s']:8.1f}"
            )
    print(
        "\nCPU s: the driver process (all threads) over the loop; main s: its main thread. Ceiling: 1 / (CPU s per "
        f"clip), the clips/s one driver keeps up with.\nThe four drivers' files ({files} each): "
        + ("byte-identical." if identical else "NOT byte-identical.")
    )


if __name__ == "__main__":
    main()
