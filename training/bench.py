"""Training benchmark: where a step's time goes, and what ZeRO saves. Ratios measured side by side in one run.

    python -m training.bench [--steps 20] [--unet tiny|small|sd15] [--zero-steps 6] [--skip-zero]
    python -m training.bench --device cuda|cpu [...]     one step part by part, MFU (training/bench_step.py)
    python -m training.bench --sampling                  sampling seconds per video by sampler.batch_size
    python -m training.bench --data-reads                what a validation and a mid-epoch resume read

Part 1, one process, the same model, objective and batch size, three ways to feed it:
  in-memory  latents already in tensors (the floor: pure compute)
  parquet    the pipeline's Parquet store read by row group with pyarrow (what each training.run worker does)
  on-the-fly decode the mp4s with decord and VAE-encode them every step (AnimateDiff-style trainers)
Part 2, peak memory per worker for ZeRO stages 0 / 2 / 3 (Ray Train, 2 workers, same model).

Everything is generated first (demo shards, tiny zoo, the pipeline's latents). `--unet small|sd15` swaps in
a random-init UNet of that size on the tiny zoo's VAE and text encoder (sd15 = SD 1.5's UNet layout;
meant for a GPU machine).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

UNET_SIZES = {
    "small": dict(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
}


def build_base(zoo_sd: Path, size: str, out: Path) -> Path:
    """The tiny zoo's SD dir with its UNet replaced by a random-init one of `size` (same VAE/text encoder)."""
    from diffusers import UNet2DConditionModel

    if size == "tiny":
        return zoo_sd
    shutil.copytree(zoo_sd, out, dirs_exist_ok=True)
    torch.manual_seed(0)
    cross = UNet2DConditionModel.load_config(zoo_sd, subfolder="unet")["cross_attention_dim"]
    if size == "shapes":  # the shapes world's base UNet layout
        from shapes.base import UNET_CONFIG

        layout = {
            k: v for k, v in UNET_CONFIG.items() if k not in ("sample_size", "in_channels", "out_channels")
        }
    else:
        layout = UNET_SIZES[size]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=cross, **layout
    )
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet")
    return out


def _prepare(work: Path):
    """Demo shards, the tiny zoo and the pipeline's latents for them."""
    from fixtures.synth import write_shards
    from fixtures.zoo import ensure_tiny_zoo
    from pipeline.config import PipelineConfig
    from pipeline.configlib import load_config
    from pipeline.run import run as run_pipeline

    zoo = ensure_tiny_zoo(work / "zoo")
    shards = work / "shards"
    write_shards(shards, shards=2, per_shard=16, frames=24, fps=8, height=64, width=64, seed=0)
    preset = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "demo.yaml"
    cfg = load_config(
        PipelineConfig,
        preset,
        [
            f"clip.model={zoo.clip}",
            f"aesthetic.head={zoo.aesthetic}",
            f"encode.model={zoo.sd}",
            "ray.progress_bars=false",
            "motion.min_score=0",
        ],
    )
    cfg.input, cfg.output = str(shards), str(work / "latents")
    run_pipeline(cfg)
    return zoo, shards, work / "latents"


def _train_cfg(base: Path, store: Path, steps: int):
    from pipeline.configlib import load_config
    from training.config import TrainConfig

    preset = Path(__file__).resolve().parent / "configs" / "demo.yaml"
    return load_config(
        TrainConfig,
        preset,
        [f"model.pretrained={base}", f"data.path={store}", f"optim.max_steps={steps}", "data.val_fraction=0"],
    )


class _Stepper:
    """One single-process training step of the real model and objective (plain AdamW, no DeepSpeed)."""

    def __init__(self, cfg):
        from training.diffusion.objective import HarivoObjective
        from training.model.unet import VideoUNet

        torch.manual_seed(0)
        self.model = VideoUNet.from_pretrained(cfg.model, cfg.harivo).train()
        self.objective = HarivoObjective.for_model(cfg, self.model)
        self.opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-4)
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, latents: torch.Tensor, text: torch.Tensor) -> None:
        terms = self.objective(self.model, latents, text, generator=self.gen)
        terms.total.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _timed_interleaved(feeds: dict, stepper: _Stepper, steps: int) -> dict[str, tuple[float, float]]:
    """{feed: (seconds per step, fraction waiting for data)}, the feeds taking turns step by step so a
    machine whose load changes during the run slows them all alike; one warm-up step each first."""
    iters = {name: iter(batches) for name, batches in feeds.items()}
    for it in iters.values():
        stepper(*next(it))  # warm-up: first-call allocations are not part of the steady state
    wait = dict.fromkeys(feeds, 0.0)
    compute = dict.fromkeys(feeds, 0.0)
    for _ in range(steps):
        for name, it in iters.items():
            t0 = time.perf_counter()
            latents, text = next(it)
            t1 = time.perf_counter()
            stepper(latents, text)
            t2 = time.perf_counter()
            wait[name] += t1 - t0
            compute[name] += t2 - t1
    return {n: ((wait[n] + compute[n]) / steps, wait[n] / (wait[n] + compute[n])) for n in feeds}


def _cycle(make):
    while True:
        yield from make()


def feed_benchmark(cfg, zoo, shards: Path, store: Path, steps: int) -> list[tuple[str, float, float]]:
    import decord
    from diffusers import AutoencoderKL

    from pipeline.models import TextEncoder
    from training.distributed.data import collate, feed_columns, inspect_store
    from training.distributed.rows import RowReader
    from training.distributed.split import choose_split, validation_clips
    from training.model.frames import unfold_frames

    info = inspect_store(cfg)
    b, f = cfg.optim.batch_size, cfg.model.num_frames
    text_encoder = TextEncoder.from_pretrained(str(zoo.sd), torch.device("cpu"))
    stepper = _Stepper(cfg)

    val_clips = validation_clips(cfg.data.val_batches, b, 1)
    split = choose_split(info, cfg.data.val_fraction, str(store.parent / "feed-run"), val_clips)
    train = RowReader(split.train, feed_columns(info))  # as each training.run worker reads its share

    def parquet_batches():  # one epoch of one worker
        for batch in train.epoch(0, 0, 1, b, cfg.data.shuffle_buffer, cfg.run.seed):
            latents, captions, embeds = collate(batch, info, f, 1, None, torch.device("cpu"))
            yield latents, embeds if embeds is not None else text_encoder(captions)

    memory = []
    for batch in parquet_batches():
        memory.append(batch)
        if len(memory) == 8:
            break

    vae = AutoencoderKL.from_pretrained(zoo.sd, subfolder="vae").eval()

    def on_the_fly_batches():
        # What trainers without a latent store do each step: read the tar, decode frames, run the VAE.
        for tar_path in sorted(shards.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                members = {m.name: m for m in tar}
                keys = sorted({n.rsplit(".", 1)[0] for n in members})
                for i in range(0, len(keys) - b + 1, b):
                    clips, captions = [], []
                    for key in keys[i : i + b]:
                        mp4 = tar.extractfile(members[f"{key}.mp4"]).read()
                        reader = decord.VideoReader(io.BytesIO(mp4))
                        idx = np.linspace(0, len(reader) - 1, f).round().astype(int).tolist()
                        clips.append(reader.get_batch(idx).asnumpy())  # (F, H, W, 3) uint8
                        captions.append(tar.extractfile(members[f"{key}.txt"]).read().decode())
                        del reader
                    pixels = torch.from_numpy(np.stack(clips)).float().div(127.5).sub(1)  # (B, F, H, W, 3)
                    pixels = pixels.permute(0, 1, 4, 2, 3).flatten(0, 1)  # (B*F, 3, H, W)
                    with torch.no_grad():
                        lat = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
                    lat = unfold_frames(lat, f)  # (B, C, F, h, w)
                    yield lat, text_encoder(captions)

    feeds = {
        "in-memory tensors": _cycle(lambda: iter(memory)),
        "parquet store (pyarrow)": _cycle(parquet_batches),
        "on-the-fly decode + VAE": _cycle(on_the_fly_batches),
    }
    return [(name, *timing) for name, timing in _timed_interleaved(feeds, stepper, steps).items()]


def zero_benchmark(cfg, steps: int) -> list[tuple[int, float, float]]:
    from training.run import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 2, 3):
            cfg.deepspeed.zero_stage = stage
            cfg.optim.max_steps = steps
            cfg.run.storage_path, cfg.run.name = tmp, f"zero{stage}"
            cfg.run.checkpoint_every, cfg.run.log_every, cfg.run.val_every = steps, steps, 0
            t = time.perf_counter()
            metrics = train(cfg)["metrics"]
            rows.append((stage, metrics["peak_mem_mb"], time.perf_counter() - t))
    return rows


def sampling_benchmark(work: Path, videos: int, batch_sizes: list[int], reps: int) -> dict[int, float]:
    """{batch size: seconds per video} sampling `videos` videos with `training/configs/sample_shapes.yaml`
    (DDIM 25, CFG, MG, 8 frames of 64 px) on a random-init video model of the shapes world's UNet layout;
    the batch sizes take turns, `reps` rounds."""
    from fixtures.checkpoints import tiny_checkpoint
    from fixtures.zoo import ensure_tiny_zoo
    from pipeline.configlib import load_config
    from training.sampling.config import SampleConfig
    from training.sampling.loading import load_pipeline

    zoo = ensure_tiny_zoo(work / "zoo")
    base = build_base(zoo.sd, "shapes", work / "base-shapes")
    run = tiny_checkpoint(base, work / "sample-run", **{"model.num_frames": 8, "model.latent_size": 8})
    preset = Path(__file__).resolve().parent / "configs" / "sample_shapes.yaml"
    pipes = {
        b: load_pipeline(
            run, load_config(SampleConfig, preset, {"sampler.batch_size": b, "output.device": "cpu"})
        )
        for b in batch_sizes
    }
    prompts = [f"a red circle moves {d}" for d in ("left", "right", "up", "down")] * (videos // 4 + 1)
    seconds = dict.fromkeys(batch_sizes, 0.0)
    for b, pipe in pipes.items():  # warm-up
        pipe.sample_batch(prompts[:b], list(range(b)))
    for _ in range(reps):
        for b, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.sample_batch(prompts[:videos], list(range(videos)))
            seconds[b] += (time.perf_counter() - t0) / (videos * reps)
    return seconds


def data_reads_benchmark(work: Path, clips: int, world: int, batch_size: int, val_fraction: float) -> list:
    """[(what, before, after)]: bytes a validation reads, rows / bytes a mid-epoch resume reads before its first
    batch, and bytes choosing the split reads, counted by a filesystem that records every read; on a synthetic
    store (8 files, row groups of 64, 16 KiB of latents per clip). "Before" repeats the old reads: a validation
    read every file's feed columns (Ray Data's projected read, then a filter by key), a resume re-read every row
    it had trained on, choosing the split copied every held-out clip (so read each row group holding one)."""
    import pyarrow.parquet as pq

    from fixtures.latent_store import CountingFileSystem, write_latent_store
    from training.distributed.data import StoreInfo, feed_columns
    from training.distributed.rows import RowReader
    from training.distributed.split import choose_split, validation_clips

    store = write_latent_store(
        work / "store", clips, files=8, row_group_size=64, latents_shape=(8, 4, 16, 16)
    )
    info = StoreInfo(str(store / "clips"), "latents", [8, 4, 16, 16], False, {})
    columns, mib, val_batches = feed_columns(info), 2**-20, 4
    # The old choice copied every held-out clip; the new one the first val_clips, what a validation reads.
    old_chooser, chooser = CountingFileSystem(), CountingFileSystem()
    old_split = choose_split(info, val_fraction, str(work / "run-all"), clips, store_fs=old_chooser)
    val_clips = validation_clips(val_batches, batch_size, world)
    split = choose_split(info, val_fraction, str(work / "run"), val_clips, store_fs=chooser)
    old_val = CountingFileSystem()
    for path in sorted((store / "clips").glob("*.parquet")):
        pq.read_table(str(path), columns=columns, filesystem=old_val)
    val = CountingFileSystem()
    for rank in range(world):
        for _ in RowReader(split.val, columns, val).first(rank, world, batch_size, val_batches):
            pass
    opened = {path for path, _, _ in val.reads}
    train = RowReader(split.train, columns)
    at = train.num_batches(world, batch_size) // 2  # mid-epoch
    # The old loop re-read every row before its position, in stored order (Ray Data's split deals blocks in order).
    old_resume, rows_left = CountingFileSystem(), at * world * batch_size
    for path in sorted((store / "clips").glob("*.parquet")):
        with old_resume.open_input_file(str(path)) as f:
            parquet = pq.ParquetFile(f)
            for g in range(parquet.num_row_groups):
                if rows_left > 0:
                    rows_left -= parquet.read_row_group(g, columns=columns).num_rows
    resumed, rows = CountingFileSystem(), 0
    for rank in range(world):
        reader = RowReader(split.train, columns, resumed)
        batches = reader.epoch(0, rank, world, batch_size, 64, 0, start=at)
        next(batches)
        batches.close()  # waits for the window read ahead: counted too
        rows += reader.stats.rows
    return [
        (
            f"one validation ({val_batches} batches x {world} ranks)",
            f"{old_val.bytes_read() * mib:.1f} MiB, {clips} clips, 8 files",
            f"{val.bytes_read() * mib:.2f} MiB, {len(opened)} file(s) under data_split/",
        ),
        (
            f"resume at micro-batch {at} of {train.num_batches(world, batch_size)}",
            f"{at * world * batch_size} rows, {old_resume.bytes_read() * mib:.1f} MiB",
            f"{rows} rows, {resumed.bytes_read() * mib:.2f} MiB (the window in progress + the next, read ahead)",
        ),
        (
            f"choosing the split, once per run ({old_split.val.num_rows} clips held out in {_groups(old_chooser)} "
            f"of {sum(pq.ParquetFile(p).num_row_groups for p in (store / 'clips').glob('*.parquet'))} row groups; "
            f"a validation reads {val_clips})",
            f"{old_chooser.bytes_read() * mib:.1f} MiB, {_groups(old_chooser)} row groups' latents (every held-out "
            "clip copied)",
            f"{chooser.bytes_read() * mib:.1f} MiB, {_groups(chooser)} row groups' latents (the key column, then the "
            f"first {split.val.num_rows} held-out clips)",
        ),
    ]


def _groups(fs) -> int:
    """Row groups whose latents `fs` read, over every store file it opened."""
    paths = {path for path, _, _ in fs.reads if path.endswith(".parquet")}
    return sum(len(fs.groups_read(path, "latents")) for path in paths)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--device" or a.startswith("--device=") for a in argv):  # the step / GPU check
        from training.bench_step import main as step_main

        return step_main(argv)
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per feed")
    p.add_argument("--unet", choices=("tiny", "small", "sd15"), default="tiny")
    p.add_argument("--zero-steps", type=int, default=6)
    p.add_argument("--skip-zero", action="store_true")
    p.add_argument("--work", help="keep generated data here (default: a temp dir)")
    p.add_argument("--sampling", action="store_true", help="only: sampling seconds per video by batch size")
    p.add_argument("--data-reads", action="store_true", help="only: bytes a validation / a resume reads")
    a = p.parse_args(argv)
    if a.data_reads:
        clips, world, batch, fraction = 8000, 2, 2, 0.005
        rows = data_reads_benchmark(
            Path(a.work or tempfile.mkdtemp(prefix="t2v-bench-")), clips, world, batch, fraction
        )
        print(f"\nData reads: {clips} clips, data.val_fraction={fraction}, {world} ranks x batch {batch}")
        for what, before, after in rows:
            print(f"{what}\n    before: {before}\n    after:  {after}")
        return
    if a.sampling:
        work = Path(a.work or tempfile.mkdtemp(prefix="t2v-bench-"))
        sizes = [1, 4, 8]
        per_video = sampling_benchmark(work, 8, sizes, 2)
        print(
            f"\nSampling (sample_shapes.yaml, shapes-world UNet layout, random init, CPU, {torch.get_num_threads()} threads)"
        )
        print(f"{'sampler.batch_size':20s}{'s/video':>10s}{'speed-up':>10s}")
        for b in sizes:
            print(f"{b:<20d}{per_video[b]:10.3f}{per_video[1] / per_video[b]:9.2f}x")
        return

    import ray

    work = Path(a.work or tempfile.mkdtemp(prefix="t2v-bench-"))
    ray.init(
        num_cpus=2 if not torch.cuda.is_available() else None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    zoo, shards, store = _prepare(work)
    base = build_base(zoo.sd, a.unet, work / f"base-{a.unet}")
    cfg = _train_cfg(base, store, a.steps)
    n_params = sum(
        p.numel()
        for p in __import__("diffusers")
        .UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        .parameters()
    )
    print(
        f"\nT2V-Ray training benchmark: UNet '{a.unet}' ({n_params / 1e6:.1f}M params, frozen), "
        f"{cfg.model.num_frames} frames, 64 px -> 8x8 latents, batch {cfg.optim.batch_size}, "
        f"{torch.get_num_threads()} torch threads, {'GPU' if torch.cuda.is_available() else 'CPU'}"
    )
    rows = feed_benchmark(cfg, zoo, shards, store, a.steps)
    base_step = rows[0][1]
    print(f"{'feed':28s}{'s/step':>10s}{'data wait':>12s}{'vs in-memory':>14s}")
    for name, step_s, wait in rows:
        print(f"{name:28s}{step_s:10.3f}{wait:11.1%}{step_s / base_step:13.2f}x")
    print(f"precomputed latents speed-up over on-the-fly: {rows[2][1] / rows[1][1]:.2f}x per step")
    if not a.skip_zero:
        zero = zero_benchmark(cfg, a.zero_steps)
        print(
            f"\n{'ZeRO stage':12s}{'peak MiB/worker':>18s}{'wall s':>10s}   (2 Ray Train workers, {a.zero_steps} steps)"
        )
        for stage, mem, wall in zero:
            print(f"{stage:<12d}{mem:18.0f}{wall:10.1f}")
    (work / "bench.json").write_text(json.dumps({"feeds": rows, "unet": a.unet}, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
