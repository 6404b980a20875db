"""The data path in the workers: part files, manifests, commits. A shard committed from parts (any batching, any
writers, retried batches) is byte for byte what a single writer writes from the same rows; a part that is not
what its manifest says fails the commit; and in a real run the driver writes only a sliver of the clips' bytes,
and a rerun writes the same bytes."""

from __future__ import annotations

import copy
import logging
import os
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline import stream
from pipeline.bench_driver import SD15, SdRows, sd_writer
from pipeline.config import PipelineConfig
from pipeline.configlib import load_config
from pipeline.parts import PARTS_DIR, PartCorrupt, PartWriter, ShardTracker, commit_shard, delete_parts

FRAMES, LATENT_HW = 2, 4  # latents (2, 4, 4, 4): small rows, the SD preset's writer otherwise
STEM, URI = "00000", "bench://00000.tar"
NAMES = SdRows(FRAMES, LATENT_HW, 1, 1, None).names  # the stream's columns as the encode actors hand them on


def small_config() -> PipelineConfig:
    size = LATENT_HW * 8
    views = [f"views.main.num_frames={FRAMES}", f"views.main.height={size}", f"views.main.width={size}"]
    return load_config(PipelineConfig, SD15, views)


def shard_rows(samples: int) -> list[dict]:
    """Stream rows of one shard: most samples one clip, every 4th rejected before decode (one row, no clip
    count), every 4th two clips; the `end` row last."""
    make = SdRows(FRAMES, LATENT_HW, batch=1, per_shard=samples, output=None)
    rows = []
    for i in range(samples):
        row = make.row(0, i)
        if i % 4 == 1:
            row |= {"clip_index": None, "clips_in_sample": None, "t_encode": 0.0}
            rows.append(stream.reject(row, S.Stage.DECODE, S.Reason.TOO_SHORT, "2 frames"))
        elif i % 4 == 2:
            rows += [row | {"clips_in_sample": 2}, make.row(0, i) | {"clip_index": 1, "clips_in_sample": 2}]
        else:
            rows.append(row)
    end = {"row_kind": stream.END, "key": "", "shard": STEM, "shard_uri": URI, "shard_samples": samples}
    return [*rows, end]


def single_writer_files(rows: list[dict], out: Path) -> dict[str, bytes]:
    """What the driver used to write: the whole shard's rows to `ShardWriter` in one process."""
    samples = [r for r in rows if r["row_kind"] == stream.SAMPLE]
    sd_writer(small_config(), out).write(STEM, copy.deepcopy(samples), URI, rows[-1]["shard_samples"])
    return shard_files(out)


def shard_files(out: Path) -> dict[str, bytes]:
    return {kind: (out / kind / f"{STEM}.parquet").read_bytes() for kind in ("clips", "rejected")}


def write_parts(rows: list[dict], writers: list[PartWriter], seed: int) -> list:
    """`rows` shuffled into batches of 1-5 rows, each through one of `writers` in turn: the manifest tables."""
    rng = random.Random(seed)
    rows = rows[:]
    rng.shuffle(rows)
    manifests, i = [], 0
    while i < len(rows):
        n = rng.randint(1, 5)
        manifests.append(writers[len(manifests) % len(writers)](stream.to_table(rows[i : i + n], NAMES)))
        i += n
    return manifests


def one_part(rows: list[dict], out: Path):
    """The whole shard as one batch through one writer: its manifest table."""
    return PartWriter({"output": str(out)})(stream.to_table(rows, NAMES))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_shard_committed_from_parts_is_the_single_writers_bytes(tmp_path, seed):
    rows = shard_rows(samples=12)
    want = single_writer_files(rows, tmp_path / "single")

    out = tmp_path / "parts"
    writers = [PartWriter({"output": str(out)}) for _ in range(2)]  # two encode actors
    manifests = write_parts(rows, writers, seed)
    tracker = ShardTracker()
    completed = [tracker.add(m) for m in manifests]
    assert [len(c) for c in completed] == [0] * (len(manifests) - 1) + [1]  # complete with the last part only
    ((stem, parts),) = completed[-1]
    counts = commit_shard(sd_writer(small_config(), out), stem, parts.shard_uri, parts.expected, parts.parts)

    assert shard_files(out) == want
    assert counts == (pq.read_metadata(out / "clips" / f"{STEM}.parquet").num_rows, 3)
    assert not (out / PARTS_DIR / STEM).exists()
    assert tracker.stage_t["encode"][0] == counts[0] and tracker.stage_t["write"][0] == counts[0]


def test_a_part_no_manifest_names_is_never_read(tmp_path):
    """A batch whose actor died after writing its part: Ray Data retries it on the restarted actor (a new writer
    token), and only the retry's manifest reaches the driver. The orphan goes with the shard's parts."""
    rows = shard_rows(samples=8)
    want = single_writer_files(rows, tmp_path / "single")
    out = tmp_path / "parts"
    dead, restarted = PartWriter({"output": str(out)}), PartWriter({"output": str(out)})
    dead(stream.to_table(rows[:4], NAMES))  # its manifest is lost with the actor
    tracker = ShardTracker()
    tracker.add(restarted(stream.to_table(rows[:4], NAMES)))
    ((stem, parts),) = tracker.add(restarted(stream.to_table(rows[4:], NAMES)))
    assert len(list((out / PARTS_DIR / STEM).iterdir())) == 3

    commit_shard(sd_writer(small_config(), out), stem, parts.shard_uri, parts.expected, parts.parts)
    assert shard_files(out) == want
    assert not any((out / PARTS_DIR).iterdir())


def test_a_part_that_is_not_what_its_manifest_says_fails_the_commit(tmp_path):
    rows = shard_rows(samples=4)
    out = tmp_path / "parts"
    ((stem, parts),) = ShardTracker().add(one_part(rows, out))
    path = out / parts.parts[0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    writer = sd_writer(small_config(), out)
    with pytest.raises(PartCorrupt, match="its manifest says"):
        commit_shard(writer, stem, parts.shard_uri, parts.expected, parts.parts)
    assert not list((out / "clips").iterdir()) and not list((out / "rejected").iterdir())


def test_a_commit_retried_after_its_renames_returns_the_same_counts(tmp_path):
    rows = shard_rows(samples=4)
    out = tmp_path / "parts"
    ((stem, parts),) = ShardTracker().add(one_part(rows, out))
    writer = sd_writer(small_config(), out)
    first = commit_shard(writer, stem, parts.shard_uri, parts.expected, parts.parts)
    files = shard_files(out)
    assert (
        commit_shard(writer, stem, parts.shard_uri, parts.expected, parts.parts) == first
    )  # parts gone by now
    assert shard_files(out) == files
    assert delete_parts(writer.store) == 0


# ---- a real run ------------------------------------------------------------------------------------------

# Clips of 16 x 4 x 32 x 32 latents (the demo's 64x64 videos at 256x256): ~0.1 MB a clip, so the clips outweigh
# what a driver writes anyway (summary.json, the lock's heartbeats, log lines).
BIG_CLIPS = ["views.main.num_frames=16", "views.main.fps=8", "views.main.height=256", "views.main.width=256"]


def written_by_this_process() -> int:
    """Bytes this process has handed to write() (/proc/self/io `wchar`), less the log files Ray writes from it
    (its core worker's logs and Ray Data's, which grow with the run's length, not with its output)."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    pid, logs = os.getpid(), set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = Path(os.readlink(fd))
        except OSError:
            continue
        if target.name.startswith("python-core-driver-") and target.name.endswith(f"_{pid}.log"):
            logs.add(target.parent)
    assert len(logs) == 1, f"expected the log directory of one Ray session, found {logs}"
    (logs,) = logs
    ray_logs = [*logs.rglob(f"*_{pid}.log"), *(logs / "ray-data").glob("*.log")]
    return int(io["wchar"]) - sum(f.stat().st_size for f in ray_logs if f.is_file())


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_the_driver_writes_a_small_fraction_of_the_clips_bytes(run_pipeline, demo_shards, tmp_path):
    from pipeline.write import OutputStore

    out = tmp_path / "out"
    # Log lines are output too: an earlier test of the session may have left Ray's loggers at DEBUG, whose
    # lines to stderr would count here. The run is measured at WARNING, as a user's driver logs by default.
    loggers = [logging.getLogger(name) for name in ("", "ray", "ray.data", "ray.train")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        before = written_by_this_process()
        summary = run_pipeline(demo_shards, out, "write.plot=false", *BIG_CLIPS)
        by_driver = written_by_this_process() - before
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    clips = sum(p.stat().st_size for p in (out / "clips").glob("*.parquet"))
    assert summary["clips_out"] == 8 and clips > 500_000
    assert by_driver < 0.05 * clips, f"the driver wrote {by_driver} bytes; the clips files hold {clips}"

    # The measure sees a driver that writes Parquet: the clips files once more, from this process.
    before = written_by_this_process()
    store = OutputStore(str(tmp_path / "again"))
    for path in (out / "clips").glob("*.parquet"):
        store.write_atomic(pq.read_table(path), "clips", path.stem, row_group_size=256, compression="zstd")
    assert written_by_this_process() - before > 0.9 * clips


def test_a_rerun_writes_the_same_bytes(run_pipeline, demo_latents, demo_shards, tmp_path):
    """The demo again into a new output: byte-identical files (encoding is deterministic on the CPU, and the
    commits sort the rows, whichever batches and actors they came through)."""
    first, _ = demo_latents
    run_pipeline(demo_shards, tmp_path / "again")
    for kind in ("clips", "rejected"):
        names = sorted(p.name for p in (first / kind).glob("*.parquet"))
        assert names == sorted(p.name for p in (tmp_path / "again" / kind).glob("*.parquet"))
        for name in names:
            assert (first / kind / name).read_bytes() == (tmp_path / "again" / kind / name).read_bytes(), name
