"""Resume: kill the driver part-way, re-run, and get exactly what a clean run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from tests.pipeline.conftest import DEMO

# One shard at a time and one-sample blocks, so shards complete one after another (~0.4 s apart here)
# instead of together, and a kill can land between them.
SLOW_OVERRIDES = [
    "read.concurrency=1",
    "read.samples_per_block=1",
    "ray.max_block_mb=0.01",
    "decode.batch_size=1",
    "score.batch_size=1",
    "encode.batch_size=1",
]


def cli(src, out):
    return [
        sys.executable,
        "-m",
        "pipeline.run",
        "--config",
        str(DEMO),
        "--input",
        str(src),
        "--output",
        str(out),
        "ray.num_cpus=2",
        "ray.progress_bars=false",
        *SLOW_OVERRIDES,
    ]


def stems(out, kind="clips"):
    return sorted(p.name[: -len(".parquet")] for p in (out / kind).glob("*.parquet"))


@pytest.mark.slow
def test_kill_then_resume_matches_a_clean_run(run_pipeline, tiny_zoo, tmp_path):
    from pipeline.synth import write_shards

    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, shards=4, per_shard=10, frames=24, fps=8, seed=3)
    env = dict(
        os.environ, T2V_TINY_ZOO=str(tiny_zoo.root), HF_HUB_OFFLINE="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0"
    )

    # 1. Start the CLI and SIGKILL its whole process group (driver + the local Ray it started) as soon as
    #    the first shard is complete.
    proc = subprocess.Popen(
        cli(src, out), env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    try:
        while not (out / "clips").is_dir() or not stems(out):
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "no shard completed within 300 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = stems(out)
    assert 1 <= len(done) < 4, f"kill landed after {done}: nothing left to resume"
    # Leftovers of a shard that was being written when the driver died: a rejected file without its
    # clips file, and a temp file. Both must be redone, not trusted.
    partial = next(s for s in ["00000", "00001", "00002", "00003"] if s not in done)
    (out / "rejected" / f"{partial}.parquet").write_bytes(b"half written")
    (out / "clips" / f"{partial}.parquet.tmp").write_bytes(b"half written")
    kept = {s: (out / "clips" / f"{s}.parquet").stat().st_mtime_ns for s in done}

    # 2. Re-run: complete shards are skipped (files untouched), the rest written once.
    rerun = subprocess.run(cli(src, out), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {s: (out / "clips" / f"{s}.parquet").stat().st_mtime_ns for s in done} == kept
    assert stems(out) == stems(out, "rejected") == ["00000", "00001", "00002", "00003"]
    assert not list(out.rglob("*.tmp"))

    # 3. A clean run with the same config writes the same rows.
    clean = tmp_path / "clean"
    run_pipeline(src, clean, *SLOW_OVERRIDES)
    for stem in stems(clean):
        for kind in ("clips", "rejected"):
            a, b = (
                pq.read_table(out / kind / f"{stem}.parquet"),
                pq.read_table(clean / kind / f"{stem}.parquet"),
            )
            assert a[S.KEY].to_pylist() == b[S.KEY].to_pylist(), f"{kind}/{stem} differs from the clean run"
        a, b = (
            pq.read_table(out / "clips" / f"{stem}.parquet"),
            pq.read_table(clean / "clips" / f"{stem}.parquet"),
        )
        rejected = pq.read_table(out / "rejected" / f"{stem}.parquet")
        keys = a[S.KEY].to_pylist() + rejected[S.KEY].to_pylist()
        assert len(keys) == len(set(keys)) == 10, f"{stem}: duplicated or missing samples {keys}"
        cols = [S.KEY, S.CLIP_INDEX, S.CAPTION, S.FRAME_INDICES]
        assert a.select(cols).to_pylist() == b.select(cols).to_pylist()
        np.testing.assert_allclose(
            S.latents_array(a).astype(np.float32), S.latents_array(b).astype(np.float32), atol=1e-2
        )
