"""The run summary counts what is on disk: each output file once, and a duplicate key as its own sample."""

from __future__ import annotations

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import PipelineConfig
from pipeline.summary import summarize
from pipeline.write import OutputStore


def write_shard(
    store: OutputStore, stem: str, clip_keys: list[str], rejected: list[tuple[str, str]], n_in: int
):
    """Real clips and rejected files of one shard (only the columns the summary reads) with its sample count."""
    nulls = pa.array([None] * len(clip_keys), pa.float32())
    meta = S.encode_metadata({S.META_SHARD_SAMPLES: n_in})
    clips = pa.table({S.KEY: clip_keys, **{s: nulls for s in S.SCORES}}).replace_schema_metadata(meta)
    cols = {
        S.KEY: [k for k, _ in rejected],
        S.SHARD: [stem] * len(rejected),
        S.CLIP_INDEX: [-1] * len(rejected),
    }
    cols |= {S.STAGE: ["read"] * len(rejected), S.REASON: [r for _, r in rejected]}
    cols |= {S.MESSAGE: ["why"] * len(rejected), **{s: [None] * len(rejected) for s in S.SCORES}}
    store.write_atomic(pa.table(cols, schema=S.REJECTED_SCHEMA), "rejected", stem, 64, "zstd")
    store.write_atomic(clips, "clips", stem, 64, "zstd")


def run_summary(store: OutputStore, stems: list[str]) -> dict:
    cfg = PipelineConfig()
    cfg.write.plot = False
    return summarize(store, cfg, stems, stems, {}, 1.0)


def test_a_stem_named_twice_is_counted_once(tmp_path):
    store = OutputStore(str(tmp_path))
    write_shard(store, "a", ["k0", "k1"], [("k2", S.Reason.NOT_VIDEO)], n_in=3)
    summary = run_summary(store, ["a", "a"])
    assert (summary["shards"], summary["samples_in"], summary["clips_out"], summary["rejected"]) == (
        1,
        3,
        2,
        1,
    )
    assert summary["clips_written_this_run"] == 2 and summary["unaccounted_samples"] == {}


def test_duplicate_keys_are_accounted_samples(tmp_path):
    store = OutputStore(str(tmp_path))
    dup = S.Reason.DUPLICATE_KEY
    write_shard(store, "a", ["k0", "k1"], [("k0", dup), ("k0", dup), ("", S.Reason.SHARD_TRUNCATED)], n_in=5)
    summary = run_summary(store, ["a"])
    assert summary["samples_in"] == 5 and summary["unaccounted_samples"] == {}
    assert summary["rejected_by_reason"] == {dup: 2, S.Reason.SHARD_TRUNCATED: 1}
