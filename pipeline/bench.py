"""Benchmark, measured in one run on generated shards with the tiny models:

(a) clips/s of the Ray Data pipeline vs. a plain single-process loop doing the same
    read -> metadata -> decode -> motion -> CLIP/aesthetic -> VAE encode with the same stage code;
(b) decord: sampling a clip vs. decoding every frame, on short and long videos of the same kind.

    python -m pipeline.bench            # 3-6 minutes on 2 CPU cores (shards cached); results also in bench.json
    python -m pipeline.bench --videos 2304 # a longer run: start-up weighs less

The videos are shaped like WebVid's (596x336, 24 fps, a keyframe every second) and the clips like the
demo's (16 frames at 8 fps, 64x64), so decoding costs what it does on real data (with the tiny models
on CPU, decode and resize are most of the plain loop's time). Both sides are timed end
to end: the plain loop from starting its process (imports, model loads), the pipeline from `ray.init`
(Ray starting, Ray Data starting the actor pools, the models loading in them, on the same cores). And
once running: the plain loop with its models loaded against the pipeline's steady state, its output rate
between the moments a quarter and three quarters of the clips were out (past start-up, before the tail).
The encode actors write their part files (`pipeline.parts`) as in a real run; the shards are not committed.
The driver's own CPU per clip, with SD-sized rows: `python -m pipeline.bench_driver`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.configlib import load_config, to_dict

DEMO = Path(__file__).parent / "configs" / "demo.yaml"
PER_SHARD = 24


def bench_config(zoo, size: int, clip_frames: int, extra: list[str], clip_fps: float = 8.0):
    from pipeline.config import PipelineConfig

    return load_config(
        PipelineConfig,
        DEMO,
        [
            f"clip.model={zoo.clip}",
            f"aesthetic.head={zoo.aesthetic}",
            f"encode.model={zoo.sd}",
            f"views.main.height={size}",
            f"views.main.width={size}",
            f"views.main.num_frames={clip_frames}",
            f"views.main.fps={clip_fps}",
            "metadata.min_side=32",
            "motion.min_score=0",
            "ray.progress_bars=false",
            *extra,
        ],
    )


def make_shards(out: Path, videos: int, workers: int, **video) -> Path:
    """`videos` videos in shards of PER_SHARD, written by `workers` processes; reused when already there."""
    from fixtures.synth import write_shards

    stamp = repr(sorted(video.items())) + f" videos={videos}"
    if (out / "params.txt").exists() and (out / "params.txt").read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)  # shards of another size would be read too
    shards = -(-videos // PER_SHARD)
    with ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(
                write_shards,
                out / f"{s:05d}",
                shards=1,
                per_shard=min(PER_SHARD, videos - s * PER_SHARD),
                first_index=s * PER_SHARD,
                **video,
            )
            for s in range(shards)
        ]
        for job in jobs:
            job.result()
    (out / "params.txt").write_text(stamp)
    return out


def plain_loop_process(cfg, shard_spec: str) -> tuple[int, float, float]:
    """`plain_loop` in a fresh process, so that neither side runs after the other in the same process:
    (clips, seconds of the loop with the models loaded, seconds from starting the process to the last clip)."""
    import multiprocessing

    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        clips, t_loop = pool.apply(_plain_loop_job, (to_dict(cfg), shard_spec))
        return clips, t_loop, time.perf_counter() - t0


def _plain_loop_job(cfg: dict, shard_spec: str) -> tuple[int, float]:
    from pipeline.config import from_dict
    from pipeline.read import list_shards

    fs, shards = list_shards(shard_spec)
    return plain_loop(from_dict(cfg), sorted(shards, key=lambda sh: sh.stem), fs)


def plain_loop(cfg, shards, fs) -> tuple[int, float]:
    """The same stages called one after another in one process; decode in-process with decord."""
    import torch

    from pipeline import stream
    from pipeline.decode import DecodeStage, decode_sample
    from pipeline.encode import VaeEncoder
    from pipeline.filters import ClipScorer, MetadataFilter, MotionFilter
    from pipeline.read import read_shard

    d = to_dict(cfg)
    meta, motion, score, encode = MetadataFilter(d), MotionFilter(d), ClipScorer(d), VaeEncoder(d)
    decode = DecodeStage(d)
    score.setup()
    encode.setup()
    torch.set_num_threads(os.cpu_count() or 1)  # a plain loop lets torch use every core

    class InProcess:  # same requests, no isolation: what a plain loop would do
        restarts = 0

        def decode(self, req):
            return decode_sample(req)

        def close(self):
            pass

    decode.decoder = InProcess()
    clips, t0 = 0, time.perf_counter()
    for shard in shards:
        for table in read_shard(shard, fs, cfg.read):
            rows = meta.process(table.to_pylist())
            rows = decode.process(rows)
            for i in range(0, len(rows), cfg.encode.batch_size):
                batch = motion.process(rows[i : i + cfg.encode.batch_size])
                batch = encode.process(score.process(batch))
                clips += sum(stream.alive(r) for r in batch)
    return clips, time.perf_counter() - t0


def cpu_times() -> list[int]:
    """The machine's CPU counters from /proc/stat (user nice system idle iowait irq softirq steal), or []."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return []


def busy_and_steal(before: list[int], after: list[int], clips: int = 0) -> str:
    """How busy the cores were between two `cpu_times()`, how much the hypervisor took (steal) and, given
    `clips`, the CPU seconds the whole machine spent per clip."""
    if not before or not after:
        return "n/a"
    d = [b - a for a, b in zip(before, after, strict=True)]
    total, busy = sum(d) or 1, sum(d) - d[3] - d[4] - d[7]
    out = f"busy {100 * busy / total:.0f}%, steal {100 * d[7] / total:.0f}%"
    if clips:
        out += f", {busy / os.sysconf('SC_CLK_TCK') / clips:.3f} CPU-s/clip"
    return out


def ray_pipeline(cfg, shards, fs, parts_dir: Path) -> tuple[int, float, list[tuple[float, int]]]:
    """(clips, wall seconds from starting the dataset incl. actor start-up and model loading, the output
    timeline as (seconds, clips so far)). The encode actors write their part files under `parts_dir`
    (removed after); the shards are not committed."""
    from pipeline.run import build_dataset, init_ray

    init_ray(cfg)
    cfg.output = str(parts_dir.resolve())  # the actors' working directory may not be ours
    clips, timeline, t0 = 0, [], time.perf_counter()
    for batch in build_dataset(cfg, shards, fs).iter_batches(batch_format="pyarrow", batch_size=None):
        clips += sum(n or 0 for n in batch.column("accepted").to_pylist())  # manifest rows
        timeline.append((time.perf_counter() - t0, clips))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return clips, time.perf_counter() - t0, timeline


def middle_rate(timeline: list[tuple[float, int]], lo: float = 0.25, hi: float = 0.75) -> float:
    """Clips/s between the moments `lo` and `hi` of all clips were out: past start-up, before the tail."""
    total = timeline[-1][1]
    t_lo, n_lo = next(p for p in timeline if p[1] >= lo * total)
    t_hi, n_hi = next(p for p in timeline if p[1] >= hi * total)
    return (n_hi - n_lo) / (t_hi - t_lo) if t_hi > t_lo else float("nan")


def decord_seconds(mp4s: list[bytes], clip_frames: int, stride: int) -> tuple[float, float, int]:
    """(s/video to sample a centred `clip_frames` clip every `stride` frames, s/video to decode all, frames)."""
    import decord

    def run(sample: bool, videos: list[bytes] = mp4s) -> float:
        t0 = time.perf_counter()
        for data in videos:
            vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
            n = len(vr)
            first = max(0, (n - (clip_frames - 1) * stride) // 2)
            idx = first + stride * np.arange(clip_frames) if sample else np.arange(n)
            vr.get_batch(idx.clip(0, n - 1).tolist()).asnumpy()
            del vr
        return (time.perf_counter() - t0) / len(videos)

    run(True, mp4s[:1])  # warm-up: first use of the decoder
    n = len(decord.VideoReader(io.BytesIO(mp4s[0]), num_threads=1))
    return run(True), run(False), n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=768, help="videos for (a), one clip each")
    p.add_argument("--seconds", type=float, default=3.0, help="video length for (a)")
    p.add_argument("--long-seconds", type=float, default=10.0, help="the long videos of (b)")
    p.add_argument("--height", type=int, default=336, help="source video height")
    p.add_argument("--width", type=int, default=596, help="source video width")
    p.add_argument("--fps", type=int, default=24, help="source frame rate; also the keyframe interval (1 s)")
    p.add_argument("--size", type=int, default=64, help="clip resolution (square)")
    p.add_argument("--clip-frames", type=int, default=16, help="frames per clip")
    p.add_argument("--clip-fps", type=float, default=8.0, help="clip frame rate")
    p.add_argument("--workdir", default="runs/bench-pipeline", help="shards are written (and reused) here")
    p.add_argument("overrides", nargs="*", help="pipeline config overrides for the Ray runs")
    a = p.parse_args(argv)

    import ray

    from fixtures.zoo import DEFAULT_ZOO_DIR, ensure_tiny_zoo
    from pipeline.read import list_shards

    cpus = os.cpu_count() or 1
    zoo = ensure_tiny_zoo(DEFAULT_ZOO_DIR)
    work = Path(a.workdir)
    video = dict(fps=a.fps, height=a.height, width=a.width, gop=a.fps, seed=5)
    t_synth = time.perf_counter()
    shard_dir = make_shards(work / "shards", a.videos, cpus, frames=round(a.seconds * a.fps), **video)
    long_dir = make_shards(work / "long", 2 * PER_SHARD, cpus, frames=round(a.long_seconds * a.fps), **video)
    t_synth = time.perf_counter() - t_synth
    fs, shards = list_shards(str(shard_dir))
    shards = sorted(shards, key=lambda sh: sh.stem)

    # Place the stages on the cores: a decoder per core, one model actor (CLIP + aesthetic + VAE, 1 torch
    # thread) per 4 cores, CPU shares small enough that they and the read tasks all fit; blocks of a few
    # samples so the decoders share a shard and the model actor starts on its first clips.
    ray_overrides = [
        f"decode.concurrency={cpus}",
        "decode.num_cpus=0.5",
        f"encode.concurrency={max(1, cpus // 4)}",
        "encode.num_cpus=0.5",
        "read.num_cpus=0.25",
        "ray.max_block_mb=0.25",
        *a.overrides,
    ]
    clip = dict(clip_fps=a.clip_fps)
    cfg_ray = bench_config(zoo, a.size, a.clip_frames, ray_overrides, **clip)
    cfg_plain = bench_config(zoo, a.size, a.clip_frames, [], **clip)

    c0 = cpu_times()
    n_plain, t_plain, t_plain_all = plain_loop_process(cfg_plain, str(shard_dir))
    c1 = cpu_times()
    t_init = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t_init
    n_ray, t_ray, timeline = ray_pipeline(cfg_ray, shards, fs, work / "parts")
    c3 = cpu_times()
    ray.shutdown()

    import tarfile

    import decord

    def mp4s_of(d: Path) -> list[bytes]:
        with tarfile.open(sorted(d.rglob("*.tar"))[0]) as tar:
            return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]

    stride = max(1, round(a.fps / a.clip_fps))
    dec = {
        name: decord_seconds(mp4s_of(d), a.clip_frames, stride)
        for name, d in (("short", shard_dir), ("long", long_dir))
    }

    cpu_plain, cpu_ray = busy_and_steal(c0, c1, n_plain), busy_and_steal(c1, c3, n_ray)
    plain_rate, steady = n_plain / t_plain, middle_rate(timeline)
    plain_all, ray_all = n_plain / t_plain_all, n_ray / (t_init + t_ray)  # both from the start
    first_out = t_init + timeline[0][0]
    print(
        f"\nT2V-Ray pipeline benchmark on {cpus} CPU cores (decord {decord.__version__}; shards written in "
        f"{t_synth:.0f} s, not timed)\n"
        f"videos {a.width}x{a.height}, {a.fps} fps, keyframe every {a.fps} frames, {a.seconds:g} s -> clips of "
        f"{a.clip_frames} frames at {a.clip_fps:g} fps, {a.size}x{a.size}; tiny models; text embeddings on"
    )
    print(f"\n(a) {'':45s}{'clips':>7s}{'seconds':>10s}{'clips/s':>10s}{'ratio':>8s}")
    rows = [
        (
            "plain loop (1 process), end to end",
            n_plain,
            t_plain_all,
            plain_all,
            1.0,
            cpu_plain,
        ),
        (
            "Ray Data pipeline, end to end",
            n_ray,
            t_init + t_ray,
            ray_all,
            ray_all / plain_all,
            cpu_ray,
        ),
        ("plain loop, models loaded", n_plain, t_plain, plain_rate, 1.0, ""),
        ("Ray Data pipeline, steady state", None, None, steady, steady / plain_rate, ""),
    ]
    for name, n, t, rate, ratio, cpu in rows:
        cols = f"{n:7d}{t:10.1f}" if n is not None else " " * 17
        print(f"    {name:45s}{cols}{rate:10.2f}{ratio:8.2f}" + (f"   CPU {cpu}" if cpu else ""))
    print(
        f"    end to end: from starting the process (plain loop: imports, model loads) or Ray (pipeline: "
        f"ray.init {t_init:.1f} s, actor pools, model loads) to the last clip; first pipeline clip out after "
        f"{first_out:.1f} s. Steady state: the pipeline's rate from 25% to 75% of the clips out, against the "
        "plain loop's once its models are loaded"
    )
    result = {
        "args": vars(a),
        "cpus": cpus,
        "plain": {
            "clips": n_plain,
            "seconds_models_loaded": t_plain,
            "seconds_end_to_end": t_plain_all,
            "cpu": cpu_plain,
        },
        "ray": {
            "clips": n_ray,
            "seconds_ray_init": t_init,
            "seconds_dataset": t_ray,
            "steady_clips_per_s": steady,
            "cpu": cpu_ray,
            "timeline": timeline,
        },
        "decord_s_per_video": {k: {"clip": v[0], "all": v[1], "frames": v[2]} for k, v in dec.items()},
    }
    (work / "bench.json").write_text(json.dumps(result, indent=1))
    print(f"\n(b) decord, {2 * PER_SHARD} videos per length{'':12s}{'s/video':>10s}{'frames':>8s}")
    for name, (t_clip, t_all, n) in dec.items():
        print(
            f"    {name + ' videos: sample a ' + str(a.clip_frames) + '-frame clip':41s}{t_clip:10.4f}{a.clip_frames:8d}"
        )
        print(f"    {name + ' videos: decode every frame':41s}{t_all:10.4f}{n:8d}")
    (cs, as_, ns), (cl, al, nl) = dec["short"], dec["long"]
    print(
        f"    {nl / ns:.1f}x longer videos: decoding all frames costs {al / as_:.2f}x, sampling the clip "
        f"{cl / cs:.2f}x; on the long videos the clip costs {cl / al:.2f}x of decoding all "
        f"({a.clip_frames}/{nl} = {a.clip_frames / nl:.2f} of the frames)"
    )
    print(
        f"\nratio pipeline / plain loop: {steady / plain_rate:.2f}x steady state, "
        f"{ray_all / plain_all:.2f}x end to end on {a.videos} videos"
    )


if __name__ == "__main__":
    main()
