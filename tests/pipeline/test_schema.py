"""The Parquet contract between curation and training (`pipeline/schema.py`), on its own and on a real store."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S

META = {
    S.META_SCHEMA_VERSION: S.SCHEMA_VERSION,
    S.META_PIPELINE_VERSION: S.PIPELINE_VERSION,
    S.META_VAE: "/models/sd",
    S.META_SCALING_FACTOR: 0.18215,
    S.META_LATENTS_DTYPE: "float16",
    S.META_VIEWS: {"main": {"num_frames": 4, "latents_shape": [4, 4, 2, 2]}, "sr": {"num_frames": 4}},
    S.META_TEXT_ENCODER: None,
    S.META_SHARD_SAMPLES: 17,
}
VIEWS = {"main": {"latents_shape": [4, 4, 2, 2]}, "sr": {"latents_shape": [4, 4, 4, 4]}}


def clips_table(n: int, seed: int = 0, embeds: bool = True) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """A clips table of `n` rows with the schema of `VIEWS` (primary `main`), and its raw tensors."""
    rng = np.random.default_rng(seed)
    sch = S.clips_schema(VIEWS, "main", "float16", [77, 8] if embeds else None, META)
    raw = {
        "latents": rng.standard_normal((n, 4, 4, 2, 2)).astype(np.float16),
        "latents_sr": rng.standard_normal((n, 4, 4, 4, 4)).astype(np.float16),
        "prompt_embeds": rng.standard_normal((n, 77, 8)).astype(np.float16),
    }
    columns = {}
    for field in sch:
        if field.name in raw:
            columns[field.name] = pa.FixedShapeTensorArray.from_numpy_ndarray(raw[field.name])
        elif field.name == S.KEY:
            columns[field.name] = pa.array([f"{seed}-{i:04d}" for i in range(n)], field.type)
        elif pa.types.is_list(field.type):
            columns[field.name] = pa.array([list(range(4))] * n, field.type)
        elif pa.types.is_string(field.type):
            columns[field.name] = pa.array(["x"] * n, field.type)
        else:
            columns[field.name] = pa.array(np.arange(n), pa.int64()).cast(field.type)
    return pa.Table.from_pydict(columns, schema=sch), raw


# ---- metadata ----------------------------------------------------------------------------------------


def test_metadata_round_trips_through_a_parquet_file(tmp_path):
    table, _ = clips_table(3)
    pq.write_table(table, tmp_path / "a.parquet")
    assert S.decode_metadata(pq.read_schema(tmp_path / "a.parquet")) == META
    # Values are JSON text, so any JSON reader sees the same values.
    raw = pq.read_schema(tmp_path / "a.parquet").metadata
    assert json.loads(raw[S.META_VIEWS.encode()]) == META[S.META_VIEWS]


def test_decode_metadata_keeps_only_t2v_keys():
    encoded = S.encode_metadata(META)
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in encoded.items())
    sch = pa.schema([("a", pa.int32())], metadata={**encoded, b"pandas": b'{"x": 1}', b"ARROW:x": b"1"})
    assert S.decode_metadata(sch) == META
    assert S.decode_metadata(pa.schema([("a", pa.int32())])) == {}


def test_every_metadata_key_survives_decoding():
    # decode_metadata keeps the `t2v.` prefix only: a key outside it would be written and never read.
    assert len(set(S.META_KEYS)) == len(S.META_KEYS)
    meta = {k: i for i, k in enumerate(S.META_KEYS)}
    assert S.decode_metadata(pa.schema([], metadata=S.encode_metadata(meta))) == meta


def test_encoding_is_canonical():
    # The same metadata in another key order encodes to the same bytes (stable config hashes / diffs).
    a = {"t2v.views": {"b": 1, "a": {"y": 2, "x": 3}}}
    b = {"t2v.views": {"a": {"x": 3, "y": 2}, "b": 1}}
    assert S.encode_metadata(a) == S.encode_metadata(b)


# ---- column names and shapes -------------------------------------------------------------------------


def test_view_column_naming():
    assert S.view_column(S.LATENTS, "main", "main") == "latents"
    assert S.view_column(S.LATENTS, "sr", "main") == "latents_sr"
    assert S.view_column(S.FRAME_INDICES, "main", primary="sr") == "frame_indices_main"
    # Distinct views never share a column.
    names = {S.view_column(n, v, "main") for n in S.PER_VIEW for v in ("main", "sr", "low")}
    assert len(names) == len(S.PER_VIEW) * 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((8, 64, 64), [8, 4, 8, 8]),
        ((16, 256, 448), [16, 4, 32, 56]),
        ((1, 512, 512, 16, 16), [1, 16, 32, 32]),
        ((4, 70, 66), [4, 4, 8, 8]),  # the VAE floors a size that is not a multiple of 8
    ],
)
def test_latents_shape(args, expected):
    assert S.latents_shape(*args) == expected


def test_clips_schema_columns_per_view():
    sch = S.clips_schema(VIEWS, "main", "float32", None)
    for view, spec in VIEWS.items():
        for name in S.PER_VIEW:
            assert S.view_column(name, view, "main") in sch.names
        latents = sch.field(S.view_column(S.LATENTS, view, "main")).type
        assert isinstance(latents, pa.FixedShapeTensorType)
        assert latents.shape == spec["latents_shape"] and latents.value_type == pa.float32()
    assert S.PROMPT_EMBEDS not in sch.names and S.decode_metadata(sch) == {}
    with_embeds = S.clips_schema(VIEWS, "main", "float16", [77, 768])
    pe = with_embeds.field(S.PROMPT_EMBEDS).type
    assert pe.shape == [77, 768] and pe.value_type == pa.float16()
    assert len(sch.names) == len(set(sch.names))


# ---- reading latents -----------------------------------------------------------------------------------


def test_latents_array_reads_back_what_was_written(tmp_path):
    a, raw_a = clips_table(5, seed=0)
    b, raw_b = clips_table(3, seed=1)
    # Small row groups and two appended tables: the column comes back in several chunks.
    pq.write_table(pa.concat_tables([a, b]), tmp_path / "c.parquet", row_group_size=2)
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.column(S.LATENTS).num_chunks > 1
    got = S.latents_array(table)
    assert got.shape == (8, 4, 4, 2, 2) and got.dtype == np.float16
    np.testing.assert_array_equal(got, np.concatenate([raw_a["latents"], raw_b["latents"]]))
    sr = S.latents_array(table, S.view_column(S.LATENTS, "sr", "main"))
    np.testing.assert_array_equal(sr, np.concatenate([raw_a["latents_sr"], raw_b["latents_sr"]]))
    embeds = S.latents_array(table, S.PROMPT_EMBEDS)
    np.testing.assert_array_equal(embeds, np.concatenate([raw_a["prompt_embeds"], raw_b["prompt_embeds"]]))


def test_the_demo_store_keeps_the_contract(demo_latents):
    """What the pipeline writes is what the schema module describes: metadata, names, shapes, dtypes."""
    out, _ = demo_latents
    files = sorted((out / "clips").glob("*.parquet"))
    assert files
    for path in files:
        table = pq.read_table(path)
        meta = S.decode_metadata(table.schema)
        assert set(S.META_KEYS) <= set(meta)
        assert meta[S.META_SCHEMA_VERSION] == S.SCHEMA_VERSION
        views, primary = meta[S.META_VIEWS], meta[S.META_DECODE]["primary_view"]
        embeds = (
            table.schema.field(S.PROMPT_EMBEDS).type.shape if S.PROMPT_EMBEDS in table.schema.names else None
        )
        expected = S.clips_schema(views, primary, meta[S.META_LATENTS_DTYPE], embeds)
        assert table.schema.remove_metadata().equals(expected.remove_metadata())
        for view, spec in views.items():
            assert spec["columns"] == {n: S.view_column(n, view, primary) for n in S.PER_VIEW}
            assert spec["latents_shape"] == S.latents_shape(spec["num_frames"], spec["height"], spec["width"])
            latents = S.latents_array(table, spec["columns"][S.LATENTS])
            assert latents.shape == (table.num_rows, *spec["latents_shape"])
            assert latents.dtype == np.dtype(meta[S.META_LATENTS_DTYPE]) and np.isfinite(latents).all()
            assert (
                table.column(spec["columns"][S.NUM_FRAMES]).to_pylist()
                == [spec["num_frames"]] * table.num_rows
            )
        # The demo shards hold bad samples, so every shard has a rejected file too.
        assert pq.read_schema(out / "rejected" / path.name).remove_metadata().equals(S.REJECTED_SCHEMA)
