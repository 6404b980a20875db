"""Write stage: one run per output (the lock), temp names no other writer shares, a full disk found in whatever
Ray wraps it in."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import main
from pipeline.write import OutOfSpace, OutputLock, OutputLocked, OutputStore, find_error, out_of_space
from tests.pipeline.conftest import DEMO, zoo_overrides


def _plant(store: OutputStore, host: str, pid: int, age_s: float) -> None:
    lock = {"host": host, "pid": pid, "token": "other", "heartbeat": time.time() - age_s, "since": 0.0}
    (open(os.path.join(store.root, OutputLock.NAME), "w")).write(json.dumps(lock))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_on_one_output_is_refused_naming_the_owner(tmp_path):
    first, second = OutputStore(str(tmp_path)), OutputStore(str(tmp_path))
    with OutputLock(first, stale_s=60):
        with pytest.raises(OutputLocked, match=rf"host {socket.gethostname()}, pid {os.getpid()}"):
            OutputLock(second, stale_s=60).acquire()
    assert not (tmp_path / OutputLock.NAME).exists()  # released
    with OutputLock(second, stale_s=60):  # and free again
        pass


@pytest.mark.parametrize(
    ("host", "age_s", "taken"),
    [
        ("this", 0.0, True),  # this host, dead pid: stale at once
        ("elsewhere", 0.0, False),  # another host, fresh heartbeat: may be running
        ("elsewhere", 120.0, True),  # another host, heartbeat older than stale_s
    ],
)
def test_stale_locks_are_detected_and_reported(tmp_path, caplog, host, age_s, taken):
    store = OutputStore(str(tmp_path))
    _plant(store, socket.gethostname() if host == "this" else "elsewhere.example", _dead_pid(), age_s)
    lock = OutputLock(store, stale_s=60)
    if not taken:
        with pytest.raises(OutputLocked, match="elsewhere.example"):
            lock.acquire()
        return
    with caplog.at_level("WARNING"), lock:
        assert json.loads((tmp_path / OutputLock.NAME).read_text())["token"] == store.token
    assert "stale lock" in caplog.text


def test_the_heartbeat_keeps_a_long_run_lock_fresh(tmp_path):
    store = OutputStore(str(tmp_path))
    with OutputLock(store, stale_s=2.0):  # refreshed every 0.4 s
        first = json.loads((tmp_path / OutputLock.NAME).read_text())["heartbeat"]
        time.sleep(2.5)  # longer than stale_s: without refreshes the lock would be stale now
        now = json.loads((tmp_path / OutputLock.NAME).read_text())
        assert now["heartbeat"] > first and time.time() - now["heartbeat"] < 2.0
        with pytest.raises(OutputLocked):
            OutputLock(OutputStore(str(tmp_path)), stale_s=2.0).acquire()


def test_pipeline_run_refuses_an_output_another_run_holds(tmp_path, demo_shards, tiny_zoo, capsys):
    store = OutputStore(str(tmp_path / "out"))
    with OutputLock(store, stale_s=60):
        args = ["--config", str(DEMO), "--input", str(demo_shards), "--output", str(tmp_path / "out")]
        assert main([*args, *zoo_overrides(tiny_zoo)]) == 2
    assert "is being written by another run" in capsys.readouterr().err
    assert not list((tmp_path / "out" / "clips").iterdir())  # nothing was written or removed


def test_two_writers_of_one_shard_never_share_a_temp_file(tmp_path):
    """Two stores on one root writing the same shard at once: every rename succeeds and every read of the
    final file is a whole file (one shared `.tmp` name lost renames and let readers see torn files)."""
    table = pa.table({"x": list(range(20_000))})
    stores = [OutputStore(str(tmp_path)) for _ in range(2)]
    errors: list[BaseException] = []

    def write(store):
        try:
            for _ in range(15):
                store.write_atomic(table, "clips", "s", row_group_size=1000, compression="zstd")
        except BaseException as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        path = tmp_path / "clips" / "s.parquet"
        if path.exists():
            assert pq.read_table(path).num_rows == 20_000
            reads += 1
    for t in threads:
        t.join()
    assert not errors, errors
    assert stores[0].token != stores[1].token
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == ["s.parquet"]


def test_tensor_columns_are_written_without_a_dictionary(demo_latents):
    # A dictionary over fp16 latents is most of a clip's write time and saves nothing; the other columns
    # (keys, captions, metadata) keep it.
    out, _ = demo_latents
    files = sorted((out / "clips").glob("*.parquet"))
    assert files
    meta = pq.ParquetFile(files[0]).metadata
    encodings = {}
    for i in range(meta.num_columns):
        column = meta.row_group(0).column(i)
        encodings[column.path_in_schema.split(".")[0]] = column.encodings
    tensors = [n for n in encodings if n.startswith("latents") or n == "prompt_embeds"]
    assert tensors
    for name in tensors:
        assert not any("DICTIONARY" in e for e in encodings[name]), (name, encodings[name])
    assert any("DICTIONARY" in e for e in encodings["caption"])


def test_a_full_disk_is_found_in_whatever_ray_wraps_it_in():
    import ray.exceptions
    import ray.train

    full = OSError(errno.ENOSPC, "No space left on device")
    task = ray.exceptions.RayTaskError("commit_shard", "Traceback ...\nOSError: [Errno 28] ...", full)
    assert task.as_instanceof_cause().errno is None  # Ray's OSError twin drops the errno: its cause has it
    assert out_of_space(full) and out_of_space(task) and out_of_space(task.as_instanceof_cause())
    group = ray.train.WorkerGroupError(
        "rank 1 failed", {0: RuntimeError("peer gone"), 1: OutOfSpace("step 6")}
    )
    assert out_of_space(group) and str(find_error(group, lambda e: isinstance(e, OutOfSpace))) == "step 6"
    try:
        raise RuntimeError("upload failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
    except RuntimeError as exc:
        assert out_of_space(exc)
    assert out_of_space(
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    assert not out_of_space(OSError(errno.EACCES, "Permission denied")) and not out_of_space(ValueError("x"))
