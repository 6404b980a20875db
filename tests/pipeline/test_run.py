"""End to end on the session's local Ray with the tiny zoo: accounting, output contract, damaged input, and
resume (kill the driver part-way, re-run, and get exactly what a clean run writes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from tests.pipeline.conftest import DEMO

# What each bad demo sample must be rejected for (fixtures/synth.py BAD_KINDS).
EXPECTED_REASON = {
    "truncated": S.Reason.TRUNCATED_FILE,
    "zero_bytes": S.Reason.EMPTY_FILE,
    "not_video": S.Reason.NOT_VIDEO,
    "missing_txt": S.Reason.MISSING_CAPTION,
    "non_utf8_caption": S.Reason.CAPTION_NOT_UTF8,
    "empty_caption": S.Reason.EMPTY_CAPTION,
    "one_frame": S.Reason.TOO_SHORT,
    "too_short": S.Reason.TOO_SHORT,
    "huge_resolution": S.Reason.TOO_LARGE,
}


@pytest.fixture(scope="module")
def demo_run(demo_latents):
    return demo_latents  # the session's demo pipeline run, shared with the training tests


def test_every_bad_sample_rejected_with_its_reason(demo_run, demo_shards):
    out, summary = demo_run
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    assert set(EXPECTED_REASON) == {s["bad"] for e in manifest["shards"].values() for s in e["samples"]} - {
        None
    }
    for name, entry in manifest["shards"].items():
        stem = name[: -len(".tar")]
        clips = pq.read_table(out / "clips" / f"{stem}.parquet")
        rejected = pq.read_table(out / "rejected" / f"{stem}.parquet")
        assert clips.num_rows + rejected.num_rows == len(entry["samples"])
        got = dict(zip(rejected["key"].to_pylist(), rejected["reason"].to_pylist()))
        for sample in entry["samples"]:
            if sample["bad"] is None:
                assert sample["key"] in clips["key"].to_pylist()
            else:
                assert got.get(sample["key"]) == EXPECTED_REASON[sample["bad"]], sample
        assert all(rejected["message"].to_pylist())  # every rejection says why
    assert summary["samples_in"] == 26 and summary["clips_out"] == 8 and summary["rejected"] == 18
    assert summary["unaccounted_samples"] == {}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rejected_by_reason"][S.Reason.TOO_SHORT] == 4
    assert {"decode", "score", "encode"} <= set(on_disk["stages"])
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_output_opens_with_plain_pyarrow(demo_run):
    out, _ = demo_run
    # A fresh interpreter that imports nothing from this project.
    code = (
        "import sys, json, pyarrow.parquet as pq\n"
        "t = pq.read_table(sys.argv[1])\n"
        "z = t.column('latents').combine_chunks().to_numpy_ndarray()\n"
        "e = t.column('prompt_embeds').combine_chunks().to_numpy_ndarray()\n"
        "m = {k.decode(): json.loads(v) for k, v in t.schema.metadata.items() if k.startswith(b't2v.')}\n"
        "print(json.dumps({'latents': list(z.shape), 'dtype': str(z.dtype), 'embeds': list(e.shape),"
        " 'rows': t.num_rows, 'meta': m}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out / "clips" / "00000.parquet")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(proc.stdout)
    assert got["latents"] == [4, 8, 4, 8, 8] and got["dtype"] == "float16"  # (N, F, C, H/8, W/8)
    assert got["embeds"] == [4, 77, 32]
    meta = got["meta"]
    assert set(S.META_KEYS) <= set(meta)
    assert meta[S.META_SCALING_FACTOR] == pytest.approx(0.18215) and len(meta[S.META_VAE_HASH]) == 64
    assert meta[S.META_VIEWS]["main"]["latents_shape"] == [8, 4, 8, 8] and meta[S.META_SHARD_SAMPLES] == 13
    assert meta[S.META_PIPELINE_VERSION] == S.PIPELINE_VERSION


def test_scores_never_computed_are_null_not_nan(demo_run):
    """SQL engines and pandas read a missing score as missing: a rejection before scoring leaves it null."""
    import pyarrow.compute as pc

    out, _ = demo_run
    for kind in ("clips", "rejected"):
        t = pq.read_table(out / kind)
        for col in S.SCORES:
            assert pc.sum(pc.is_nan(t[col]).fill_null(False)).as_py() in (0, None), f"{kind}.{col} has NaN"
    rejected = pq.read_table(out / "rejected")
    early = pc.equal(rejected[S.STAGE], "metadata")  # rejected before decoding: nothing was scored
    assert pc.any(early).as_py() and rejected.filter(early)[S.CLIP_SCORE].null_count == pc.sum(early).as_py()


def test_latents_are_the_vae_encoding_of_the_sampled_frames(demo_run, demo_shards, tiny_zoo):
    """Decode the stored frame indices independently and re-encode: the stored latents must match."""
    import io
    import tarfile

    import decord
    import torch
    from diffusers import AutoencoderKL

    out, _ = demo_run
    t = pq.read_table(out / "clips" / "00000.parquet")
    row = t.slice(0, 1).to_pylist()[0]
    with tarfile.open(demo_shards / "00000.tar") as tar:
        mp4 = tar.extractfile(f"{row['key']}.mp4").read()
    frames = decord.VideoReader(io.BytesIO(mp4)).get_batch(row["frame_indices"]).asnumpy()  # (F, 64, 64, 3)
    vae = AutoencoderKL.from_pretrained(tiny_zoo.sd, subfolder="vae").eval()
    with torch.no_grad():
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # (F, 4, 8, 8)
    got = S.latents_array(t)[0].astype(np.float32)
    assert got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), atol=2e-2, rtol=1e-2)


def test_damaged_inputs_do_not_fail_the_job(run_pipeline, crash_shard_dir, image_shards, tmp_path):
    """A decoder-killing video, a cut shard and an image shard in one run: good samples all come out.

    (Run with scoring in its own actor pool; the other tests use the default, scoring in the encode actors.)"""
    from fixtures.synth import write_shards

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(crash_shard_dir / "crash.tar", src / "crash.tar")
    shutil.copy(image_shards / "00000.tar", src / "images.tar")
    manifest = write_shards(tmp_path / "cut", shards=1, per_shard=6, frames=24, fps=8, cut_last=True)
    shutil.copy(tmp_path / "cut" / "00000.tar", src / "cut.tar")
    out = tmp_path / "out"
    summary = run_pipeline(src, out, "decode.timeout_s=120", "score.own_actors=true", "score.num_cpus=0.25")

    rej = pq.read_table(out / "rejected" / "crash.parquet").to_pylist()
    assert [(r["key"].endswith("_decoder_killer"), r["reason"]) for r in rej] == [
        (True, S.Reason.DECODER_CRASH)
    ]
    assert "SIGSEGV" in rej[0]["message"]
    assert pq.read_table(out / "clips" / "crash.parquet").num_rows == 3

    entry = manifest["shards"]["00000.tar"]
    clips = pq.read_table(out / "clips" / "cut.parquet")
    cut_rej = pq.read_table(out / "rejected" / "cut.parquet")
    assert clips["key"].to_pylist() == [
        s["key"] for s in entry["samples"] if s["key"] not in entry["cut_keys"]
    ]
    assert set(cut_rej["reason"].to_pylist()) <= {S.Reason.SHARD_TRUNCATED}
    assert summary["shards_truncated"] == ["cut"]

    images = pq.read_table(out / "clips" / "images.parquet")
    assert images.num_rows == 6 and set(images["media"].to_pylist()) == {"image"}
    assert S.latents_array(images).shape == (6, 1, 4, 8, 8)
    assert summary["unaccounted_samples"] == {}


def test_a_layout_that_leaves_no_cpu_for_reading_is_refused(run_pipeline, demo_shards, tmp_path):
    from pipeline.configlib import ConfigError

    # 2 CPUs here: decode 0.5 + scoring 1.0 + encode 0.5 leaves nothing for a read task; Ray Data would hang.
    with pytest.raises(ConfigError, match=r"need 2.25 CPUs; Ray has 2"):
        run_pipeline(demo_shards, tmp_path / "out", "score.own_actors=true", "score.num_cpus=1.0")


def test_rerun_with_another_config_is_refused(run_pipeline, demo_run, demo_shards):
    from pipeline.configlib import ConfigError

    out, _ = demo_run
    with pytest.raises(ConfigError, match="another config"):
        run_pipeline(demo_shards, out, "clip.min_score=0.5")


def test_read_and_metadata_filter_run_as_one_task(ray_local, tiny_zoo, demo_shards, capsys):
    """One read task per shard, not split, so Ray Data fuses the metadata filter into it (no extra hop)."""
    from pipeline.config import PipelineConfig
    from pipeline.configlib import load_config
    from pipeline.read import list_shards
    from pipeline.run import build_dataset
    from tests.conftest import DEMO_PIPELINE, zoo_overrides

    cfg = load_config(PipelineConfig, DEMO_PIPELINE, zoo_overrides(tiny_zoo))
    fs, shards = list_shards(str(demo_shards))
    build_dataset(cfg, shards, fs).explain()  # plans only; nothing runs
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[ReadShard->MapBatches(MetadataFilter)]" in optimized


# ---- resume ----------------------------------------------------------------------------------------

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
    from fixtures.synth import write_shards

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
    # And part files of the killed run's encode actors (one half written): never read, removed.
    (out / "parts" / partial).mkdir(parents=True, exist_ok=True)
    (out / "parts" / partial / "deadhost.1.abc.0.parquet").write_bytes(b"half written")
    kept = {s: (out / "clips" / f"{s}.parquet").stat().st_mtime_ns for s in done}

    # 2. Re-run: complete shards are skipped (files untouched), the rest written once.
    rerun = subprocess.run(cli(src, out), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {s: (out / "clips" / f"{s}.parquet").stat().st_mtime_ns for s in done} == kept
    assert stems(out) == stems(out, "rejected") == ["00000", "00001", "00002", "00003"]
    assert not list(out.rglob("*.tmp"))
    assert not [p for p in (out / "parts").rglob("*") if p.is_file()]

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
