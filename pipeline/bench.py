"""Benchmark, measured in one run on generated shards with the tiny models:

(a) clips/s of the Ray Data pipeline vs. a plain single-process loop doing the same
    read -> metadata -> decode -> motion -> CLIP/aesthetic -> VAE encode with the same stage code;
(b) decord frames/s when sampling a clip vs. decoding every frame of the same videos.

    python -m pipeline.bench                 # ~2-3 minutes on 2 CPU cores
    python -m pipeline.bench --videos 48 --size 128 --frames 64
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_config, to_dict

DEMO = Path(__file__).parent / "configs" / "demo.yaml"


def bench_config(zoo, size: int, clip_frames: int, extra: list[str]):
    from pipeline.settings import PipelineConfig

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
            "views.main.fps=8.0",
            "metadata.min_side=32",
            "motion.min_score=0",
            "ray.progress_bars=false",
            *extra,
        ],
    )


def plain_loop(cfg, shards, fs) -> tuple[int, float]:
    """The same stages called one after another in this process; decode in-process with decord."""
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


def ray_pipeline(cfg, shards, fs) -> tuple[int, float, float]:
    """(clips, wall seconds incl. actor start-up, steady-state seconds from the first output)."""
    from pipeline import stream
    from pipeline.run import build_dataset, init_ray

    init_ray(cfg)
    clips, first = 0, None
    t0 = time.perf_counter()
    for batch in build_dataset(cfg, shards, fs).iter_batches(batch_format="pyarrow", batch_size=None):
        n = sum(stream.alive(r) for r in batch.select(["row_kind", "reason"]).to_pylist())
        if n and first is None:
            first, first_n = time.perf_counter(), n
        clips += n
    end = time.perf_counter()
    return clips, end - t0, (clips - first_n) / (end - first) if first and clips > first_n else float("nan")


def decord_rates(mp4s: list[bytes], clip_frames: int) -> tuple[float, float, float, float]:
    """(sampled frames/s, all frames/s, s/video sampled, s/video all)."""
    import decord

    def run(sample: bool):
        frames, t0 = 0, time.perf_counter()
        for data in mp4s:
            vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
            n = len(vr)
            idx = (
                np.linspace(n // 4, n // 4 + (clip_frames - 1) * 2, clip_frames).astype(int).clip(0, n - 1)
                if sample
                else np.arange(n)
            )
            vr.get_batch(idx.tolist()).asnumpy()
            frames += len(idx)
            del vr
        return frames, time.perf_counter() - t0

    fs_, ts = run(True)
    fa, ta = run(False)
    return fs_ / ts, fa / ta, ts / len(mp4s), ta / len(mp4s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=96, help="videos in total (4 shards)")
    p.add_argument("--size", type=int, default=128, help="video and clip resolution (pixels)")
    p.add_argument("--frames", type=int, default=48, help="frames per video (8 fps)")
    p.add_argument("--clip-frames", type=int, default=16, help="frames per clip")
    p.add_argument("--workdir", default=None, help="where to write shards (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="pipeline config overrides for the Ray run")
    a = p.parse_args(argv)

    import ray

    from pipeline.read import list_shards
    from pipeline.synth import write_shards
    from pipeline.zoo import DEFAULT_ZOO_DIR, ensure_tiny_zoo

    zoo = ensure_tiny_zoo(DEFAULT_ZOO_DIR)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="t2v-bench-"))
    write_shards(
        work / "shards",
        shards=4,
        per_shard=a.videos // 4,
        frames=a.frames,
        fps=8,
        height=a.size,
        width=a.size,
        seed=5,
    )
    fs, shards = list_shards(str(work / "shards"))
    cpus = os.cpu_count() or 1
    ray_overrides = [
        "decode.concurrency=1",
        "score.concurrency=1",
        f"encode.concurrency={max(1, cpus - 1)}",
        "read.num_cpus=0.25",
        "decode.num_cpus=0.5",
        "score.num_cpus=0.25",
        "encode.num_cpus=0.5",
        *a.overrides,
    ]
    cfg_ray = bench_config(zoo, a.size, a.clip_frames, ray_overrides)
    cfg_plain = bench_config(zoo, a.size, a.clip_frames, [])

    n_plain, t_plain = plain_loop(cfg_plain, shards, fs)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    n_ray, t_ray, steady = ray_pipeline(cfg_ray, shards, fs)
    ray.shutdown()

    import decord

    mp4s = []
    import tarfile

    with tarfile.open(work / "shards" / "00000.tar") as tar:
        mp4s = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]
    sampled_fps, all_fps, t_sampled, t_all = decord_rates(mp4s, a.clip_frames)

    plain_rate, ray_rate = n_plain / t_plain, n_ray / t_ray
    print(
        f"\nT2V-Ray pipeline benchmark: {a.videos} videos {a.size}x{a.size}, {a.frames} frames @ 8 fps -> "
        f"clips of {a.clip_frames} frames; tiny models; {cpus} CPU cores; decord {decord.__version__}"
    )
    print(f"{'':38s}{'clips':>7s}{'seconds':>10s}{'clips/s':>10s}{'ratio':>8s}")
    print(
        f"{'plain loop (1 process, torch ' + str(cpus) + ' thr)':38s}{n_plain:7d}{t_plain:10.1f}"
        f"{plain_rate:10.2f}{1.0:8.2f}"
    )
    print(
        f"{'Ray Data pipeline, end to end':38s}{n_ray:7d}{t_ray:10.1f}{ray_rate:10.2f}{ray_rate / plain_rate:8.2f}"
    )
    print(f"{'Ray Data pipeline, steady state':38s}{'':7s}{'':10s}{steady:10.2f}{steady / plain_rate:8.2f}")
    print(
        f"  (end to end includes Ray Data starting {len(cfg_ray.views)} view(s) x 3 actor pools and loading the "
        "models in them; steady state counts from the first clip out)"
    )
    print(f"\n{'decord, same ' + str(len(mp4s)) + ' videos':38s}{'frames/s':>10s}{'s/video':>10s}")
    print(f"{'sample a ' + str(a.clip_frames) + '-frame clip':38s}{sampled_fps:10.0f}{t_sampled:10.4f}")
    print(f"{'decode all ' + str(a.frames) + ' frames':38s}{all_fps:10.0f}{t_all:10.4f}")
    print(
        f"  per video, clip sampling costs {t_sampled / t_all:.2f}x of decoding every frame "
        f"({a.clip_frames}/{a.frames} = {a.clip_frames / a.frames:.2f} of the frames)"
    )
    print(
        f"\nratio pipeline / plain loop: {ray_rate / plain_rate:.2f}x end to end, {steady / plain_rate:.2f}x steady"
    )


if __name__ == "__main__":
    main()
