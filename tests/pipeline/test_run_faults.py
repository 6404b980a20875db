"""End to end: one run over good shards and shards with every kind of in-shard fault goes on to the end, writes
every shard under its own name, and accounts for every input sample (in clips, or rejected with a reason); a run
whose output disk fills up stops with one line, and the same command resumes it."""

from __future__ import annotations

import errno
import gzip
import json
import tarfile

import pyarrow.parquet as pq

from pipeline import schema as S
from tests.pipeline.conftest import DEMO, zoo_overrides
from tests.pipeline.test_read_faults import tar_bytes

R = S.Reason


def video(index: int, **meta) -> tuple[str, list[tuple[str, bytes]]]:
    """(key, members) of a good synthetic video sample; `meta` replaces fields of its json."""
    from fixtures.synth import make_video_sample

    key, members = make_video_sample(index, 0, 24, 8, 64, 64)
    if meta:
        members["json"] = json.dumps({**json.loads(members["json"]), **meta}).encode()
    return key, [(f"{key}.{ext}", data) for ext, data in members.items()]


def garbage_header() -> bytes:
    """A 512-byte block that is no tar header (its checksum field is not octal)."""
    block = bytearray(tarfile.TarInfo("x.mp4").tobuf(format=tarfile.USTAR_FORMAT))
    block[148:156] = b"zz\0zzzz\0"
    return bytes(block)


def huge_header() -> bytes:
    """A valid GNU header claiming a 1 TiB member."""
    info = tarfile.TarInfo("huge.mp4")
    info.size = 2**40
    return info.tobuf(format=tarfile.GNU_FORMAT)


def build_inputs(src) -> dict[str, dict[str, list[str]]]:
    """Write the shards; returns {output stem: {key: [reasons of its records]}} ('' = a clip)."""
    (src / "a").mkdir(parents=True)
    k = [video(300 + i) for i in range(12)]
    odd = [video(320, video_metadata=[1, 2]), video(321, video_metadata={"format": {"size": "nan"}})]
    shards = {
        "good.tar": ([k[0], k[1]], b""),
        "a/b.tar": ([k[2]], b""),
        "a__b.tar": ([k[3]], b""),
        "sub.tar.gz": ([k[4], k[5]], b""),
        "gzipped.tar": ([k[11]], b""),  # gzipped without being renamed (as some crawlers do)
        "garbage.tar": ([k[6]], garbage_header() + b"\1" * 2048),
        "huge.tar": ([k[7]], huge_header() + b"\1" * 4096),
        "oddjson.tar": ([*odd, k[8]], b""),
        "dups.tar": ([k[9], k[9], k[10], k[9]], b""),
    }
    expected = {}
    for name, (samples, tail) in shards.items():
        members = [m for _, ms in samples for m in ms]
        data = tar_bytes(members, end=not tail) + tail
        (src / name).write_bytes(gzip.compress(data) if name in ("sub.tar.gz", "gzipped.tar") else data)
        keys = [key for key, _ in samples]
        expected[name] = {key: [""] for key in keys}
    (src / "junk.tar").write_bytes(b"<html>503 Service Unavailable</html>\n" * 64)
    (src / "README.txt").write_text("not a shard")
    k9 = k[9][0]
    expected["garbage.tar"][""] = [R.SHARD_TRUNCATED]
    expected["huge.tar"]["huge"] = [R.SHARD_TRUNCATED]
    expected["oddjson.tar"] = {odd[0][0]: [R.BAD_JSON], odd[1][0]: [R.BAD_JSON], k[8][0]: [""]}
    expected["dups.tar"] = {k9: ["", R.DUPLICATE_KEY, R.DUPLICATE_KEY], k[10][0]: [""]}
    expected["junk.tar"] = {"": [R.SHARD_UNREADABLE]}
    stems = {"good.tar": "good", "a/b.tar": "a__b", "a__b.tar": "a_%5Fb", "sub.tar.gz": "sub.tar.gz"}
    return {stems.get(name, name.removesuffix(".tar")): want for name, want in expected.items()}


def test_a_run_with_faulty_shards_writes_every_shard_and_accounts_for_every_sample(run_pipeline, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = build_inputs(src)
    summary = run_pipeline(src, out)  # returns: the job went on to the end (the CLI exits 0)

    assert sorted(p.name for p in (out / "clips").glob("*.parquet")) == sorted(
        f"{s}.parquet" for s in expected
    )
    for stem, want in expected.items():
        clips = pq.read_table(out / "clips" / f"{stem}.parquet").to_pylist()
        rejected = pq.read_table(out / "rejected" / f"{stem}.parquet").to_pylist()
        got: dict[str, list[str]] = {}
        for r in [*clips, *rejected]:
            got.setdefault(r["key"], []).append(r.get("reason") or "")
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}, stem
        assert all(r["message"] for r in rejected), stem
    assert summary["samples_in"] == sum(len(v) for want in expected.values() for v in want.values()) == 19
    assert summary["unaccounted_samples"] == {}
    assert summary["clips_out"] == 12 and summary["rejected"] == 7
    assert sorted(summary["shards_truncated"]) == ["garbage", "huge"]


def test_a_full_output_disk_is_one_line_and_the_same_command_resumes(
    ray_local, tiny_zoo, tmp_path, monkeypatch, capsys
):
    from fixtures.synth import write_shards
    from pipeline import parts
    from pipeline.run import main

    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, shards=3, per_shard=3, frames=24, fps=8, seed=5)
    args = ["--config", str(DEMO), "--input", str(src), "--output", str(out), *zoo_overrides(tiny_zoo)]
    args.append("ray.progress_bars=false")
    commit = parts.commit_shard

    def commit_on_a_full_disk(writer, stem, *rest):
        """The real commit task (it runs in a Ray worker), except that shard 00001's first file meets a full disk
        a few bytes into its temp file, as `pq.write_table` would."""
        if stem == "00001":
            store = writer.store

            def write_atomic(table, kind, name, *args, **kwargs):
                with store.fs.open_output_stream(store.path(kind, name, f".{store.token}.tmp")) as f:
                    f.write(b"PAR1")
                raise OSError(errno.ENOSPC, "No space left on device")

            store.write_atomic = write_atomic
        return commit(writer, stem, *rest)

    monkeypatch.setattr(parts, "commit_shard", commit_on_a_full_disk)  # Committer submits this one
    assert main(args) == 1
    err = capsys.readouterr().err
    complete = sorted(p.stem for p in (out / "clips").glob("*.parquet"))
    assert "00001" not in complete and list(out.rglob("*.tmp"))  # the cut temp file: left for the next run
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line == (
        f"error: --output {out} is out of space (no space left on device): {len(complete)} of 3 shards are "
        "complete; free space, then run the same command to resume (complete shards are kept, the rest redone)"
    )
    kept = {s: (out / "clips" / f"{s}.parquet").stat().st_mtime_ns for s in complete}

    monkeypatch.undo()  # space freed: the same command again
    assert main(args) == 0
    assert sorted(p.stem for p in (out / "clips").glob("*.parquet")) == ["00000", "00001", "00002"]
    assert {s: (out / "clips" / f"{s}.parquet").stat().st_mtime_ns for s in complete} == kept
    assert not list(out.rglob("*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_in"] == 9 and summary["unaccounted_samples"] == {}
