"""The row stream between the pipeline's stages (`pipeline/stream.py`): typed blocks, rejections, stage
plumbing (setup once, timing, chaining, actor and task wrappers). No Ray, no models."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import stream
from pipeline.config import PipelineConfig
from pipeline.configlib import load_config, to_dict
from pipeline.filters import MetadataFilter
from pipeline.schema import Reason, Stage

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "configs" / "demo.yaml"
MP4 = b"\0\0\0\x18ftypisom" + bytes(100)  # starts like an mp4: passes the metadata filter's sniffing
COLUMNS = [*stream.READ_COLUMNS, "frames__main", "latents__main", "prompt_embeds", "frame_indices__main"]


def cfg_dict() -> dict:
    return to_dict(load_config(PipelineConfig, DEMO))


def sample(key: str, **extra) -> dict:
    row = {
        "row_kind": stream.SAMPLE,
        "key": key,
        "shard": "s",
        "shard_uri": "/data/s.tar",
        "sample_index": int(key[-1]) if key[-1].isdigit() else 0,
        "shard_samples": None,
        "media": "video",
        "media_bytes": MP4,
        "caption": f"caption of {key}",
        "meta_json": "{}",
        "stage": "",
        "reason": "",
        "message": "",
        "t_read": 0.5,
    }
    return {**row, **extra}


def end_row(samples: int) -> dict:
    return {"row_kind": stream.END, "shard": "s", "shard_uri": "/data/s.tar", "shard_samples": samples}


def batch_of(rows: list[dict], names: list[str] = stream.READ_COLUMNS) -> pa.Table:
    return stream.to_table(rows, names)


# Stages defined here, with the per-row contract the pipeline's stages follow: skip rows that are not
# alive, and turn a failure on one row into that row's rejection.


class Upper(stream.RowStage):
    """Upper-cases captions; raises on a caption containing "boom" (that row is rejected)."""

    name = "upper"
    setups = 0

    def setup(self) -> None:
        Upper.setups += 1  # on this class, also when called on a subclass (actor_cls)

    def process(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            if not stream.alive(row):
                continue
            try:
                if "boom" in row["caption"]:
                    raise RuntimeError(f"cannot upper-case {row['key']}")
                row["caption"] = row["caption"].upper()
            except Exception as exc:
                stream.reject(row, self.name, Reason.SCORE_ERROR, f"{type(exc).__name__}: {exc}")
        return rows


class Exclaim(stream.RowStage):
    """Appends "!" to captions and adds a column; rejects captions longer than 20 characters."""

    name = "exclaim"
    setups = 0

    def setup(self) -> None:
        Exclaim.setups += 1

    def added_columns(self) -> list[str]:
        return ["motion_score", f"t_{self.name}"]

    def process(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            row["motion_score"] = float(len(row.get("caption") or ""))
            if not stream.alive(row):
                continue
            if len(row["caption"]) > 20:
                stream.reject(row, self.name, Reason.STATIC, "too long")
            else:
                row["caption"] += "!"
        return rows


class Sleepy(stream.RowStage):
    name = "sleepy"

    def process(self, rows: list[dict]) -> list[dict]:
        time.sleep(0.2)
        return rows


class SelfTimed(stream.RowStage):
    """Expands every alive row into two (new dicts), timing them itself, as the decode stage does."""

    name = "expand"
    self_timed = True

    def added_columns(self) -> list[str]:
        return ["clip_index", f"t_{self.name}"]

    def process(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            if not stream.alive(row):
                out.append(dict(row, clip_index=None, t_expand=0.0))
                continue
            out += [dict(row, clip_index=i, t_expand=1.25) for i in range(2)]
        return out


# ---- rows --------------------------------------------------------------------------------------------


def test_alive_means_a_sample_without_a_reason():
    assert stream.alive(sample("a"))
    assert stream.alive(sample("a", reason=None))  # a null reason (missing value) is no rejection
    assert not stream.alive(sample("a", reason=Reason.STATIC))
    assert not stream.alive(end_row(4))
    assert not stream.alive({})


def test_reject_records_why_and_empties_only_the_heavy_columns():
    row = sample(
        "a",
        frames__main=b"f" * 64,
        frames__sr=b"f" * 64,
        latents__main=b"l" * 64,
        prompt_embeds=b"p" * 64,
        frame_indices__main=b"\0" * 16,
        fps__main=4.0,
        motion_score=0.5,
    )
    before = dict(row)
    out = stream.reject(row, Stage.DECODE, Reason.DECODE_ERROR, "x" * 5000)
    assert out is row and not stream.alive(row)
    assert (row["stage"], row["reason"]) == (Stage.DECODE, Reason.DECODE_ERROR)
    assert row["message"] == "x" * 2000  # bounded: a rejected table of tracebacks stays small
    heavy = {"media_bytes", "frames__main", "frames__sr", "latents__main", "prompt_embeds"}
    for name in before:
        if name in heavy:
            assert row[name] == b"", name
        elif name not in ("stage", "reason", "message"):
            assert row[name] == before[name], name  # key, caption, scores, indices: kept for the report


# ---- typed blocks ------------------------------------------------------------------------------------


def test_to_table_has_exactly_the_declared_columns_and_types():
    names = [*stream.READ_COLUMNS, "frames__main", "fps__main", "latents__sr", "t_decode"]
    rows = [sample("a", extra_key="dropped"), end_row(1)]
    table = stream.to_table(rows, names)
    assert table.column_names == names
    for name in names:
        assert table.schema.field(name).type == stream.column_type(name)
    assert table.schema.field("frames__main").type == pa.binary()
    assert table.schema.field("t_decode").type == pa.float64()
    # Missing values are nulls, not errors.
    assert table.column("key").to_pylist() == ["a", None]
    assert table.column("shard_samples").to_pylist() == [None, 1]
    with pytest.raises(KeyError, match="undeclared"):
        stream.column_type("undeclared")


def test_blocks_of_different_content_share_one_schema():
    # A block whose rows are all rejected (empty strings, nulls) and a normal one can be concatenated:
    # Ray Data needs that of every block a stage emits.
    names = stream.with_columns(stream.READ_COLUMNS, ["motion_score", "t_motion"])
    a = stream.to_table([sample("a", motion_score=0.1, t_motion=0.2)], names)
    b = stream.to_table([end_row(3), {"row_kind": stream.SAMPLE, "reason": Reason.BAD_JSON}], names)
    assert a.schema.equals(b.schema)
    assert pa.concat_tables([a, b]).num_rows == 3


def test_with_columns_keeps_order_adds_once_and_drops_prefixes():
    names = ["key", "frames__main", "frames__sr", "caption"]
    assert stream.with_columns(names, ["caption", "latents__main"]) == [*names, "latents__main"]
    assert stream.with_columns(names, ["t_x"], dropped=("frames__",)) == ["key", "caption", "t_x"]
    assert stream.with_columns(names, []) == names


# ---- stages --------------------------------------------------------------------------------------------


def test_a_failing_row_is_rejected_and_the_others_are_kept():
    rows = [sample("a0"), sample("b1", caption="boom here"), sample("c2"), end_row(3)]
    out = Upper(cfg_dict())(batch_of(rows)).to_pylist()
    assert len(out) == len(rows)  # every sample is still seen exactly once, plus the end row
    assert [r["key"] for r in out] == ["a0", "b1", "c2", None]
    assert [r["reason"] for r in out[:3]] == ["", Reason.SCORE_ERROR, ""]
    assert out[1]["stage"] == "upper" and "RuntimeError: cannot upper-case b1" in out[1]["message"]
    assert out[1]["media_bytes"] == b"" and out[1]["caption"] == "boom here"
    assert [out[0]["caption"], out[2]["caption"]] == ["CAPTION OF A0", "CAPTION OF C2"]
    assert out[0]["media_bytes"] == MP4
    assert out[3]["row_kind"] == stream.END and out[3]["shard_samples"] == 3


def test_a_rejected_row_passes_later_stages_untouched():
    rejected = stream.reject(sample("r1"), Stage.READ, Reason.MISSING_CAPTION, "no txt")
    rows = [sample("a0"), rejected]
    out = Upper(cfg_dict())(MetadataFilter(cfg_dict())(batch_of(rows)))
    assert out.column("reason").to_pylist() == ["", Reason.MISSING_CAPTION]
    got = out.to_pylist()[1]
    for name, value in rejected.items():
        assert got[name] == value, name
    assert got["t_upper"] == 0.0  # rejected rows are not charged for work not done on them


def test_setup_runs_once_per_stage_object():
    Upper.setups = 0
    stage = Upper(cfg_dict())
    assert Upper.setups == 0  # not at construction: Ray Data builds stage objects before it needs them
    for _ in range(3):
        stage(batch_of([sample("a0")]))
    assert Upper.setups == 1


def test_stage_time_is_shared_by_the_alive_rows():
    rows = [sample("a0"), sample("b1"), stream.reject(sample("c2"), Stage.READ, Reason.BAD_JSON), end_row(3)]
    t0 = time.perf_counter()
    out = Sleepy(cfg_dict())(batch_of(rows)).to_pylist()
    elapsed = time.perf_counter() - t0
    shares = [r["t_sleepy"] for r in out]
    assert shares[2] == shares[3] == 0.0
    assert shares[0] == shares[1] and 0.2 <= shares[0] + shares[1] <= elapsed


def test_self_timed_stage_keeps_its_own_timing_and_new_rows():
    rows = [sample("a0"), stream.reject(sample("b1"), Stage.READ, Reason.BAD_JSON)]
    out = SelfTimed(cfg_dict())(batch_of(rows))
    assert out.column_names == stream.with_columns(stream.READ_COLUMNS, ["clip_index", "t_expand"])
    assert out.column("key").to_pylist() == ["a0", "a0", "b1"]
    assert out.column("clip_index").to_pylist() == [0, 1, None]
    assert out.column("t_expand").to_pylist() == [1.25, 1.25, 0.0]


def test_chained_stages_equal_the_stages_one_after_another():
    d = cfg_dict()
    rows = [
        sample("a0"),
        sample("b1", caption="boom"),  # Upper rejects it
        sample("c2", caption="a rather long caption"),  # Exclaim rejects it
        sample("d3", media_bytes=b""),  # MetadataFilter rejects it
        end_row(4),
    ]
    batch = batch_of(rows)
    one_by_one = batch
    for cls in (MetadataFilter, Upper, Exclaim):
        one_by_one = cls(d)(one_by_one)
    Upper.setups = Exclaim.setups = 0
    fused = stream.chain(MetadataFilter, Upper, Exclaim)(d)
    assert type(fused).__name__ == "MetadataFilter+Upper+Exclaim"
    got = fused(batch)
    timing = [c for c in got.column_names if c.startswith("t_") and c != "t_read"]
    assert got.column_names == one_by_one.column_names
    assert got.drop_columns(timing).equals(one_by_one.drop_columns(timing))
    assert [r["reason"] for r in got.to_pylist()] == [
        "",
        Reason.SCORE_ERROR,
        Reason.STATIC,
        Reason.EMPTY_FILE,
        None,
    ]
    assert got.column("caption").to_pylist()[0] == "CAPTION OF A0!"
    fused(batch)
    assert Upper.setups == Exclaim.setups == 1  # each chained stage sets up once


def test_actor_cls_sets_up_at_construction():
    Upper.setups = Exclaim.setups = 0
    actor = stream.actor_cls(Upper)(cfg_dict())
    assert Upper.setups == 1 and type(actor).__name__ == "Upper" and isinstance(actor, Upper)
    actor(batch_of([sample("a0")]))
    assert Upper.setups == 1
    stream.actor_cls(stream.chain(Upper, Exclaim))(cfg_dict())
    assert Upper.setups == 2 and Exclaim.setups == 1


def test_task_fn_builds_the_stage_once_per_config_and_matches_it():
    d = cfg_dict()
    Upper.setups = 0
    fn = stream.task_fn(Upper, d)
    batch = batch_of([sample("a0"), sample("b1", caption="boom")])
    first = fn(batch)
    fn(batch)
    stream.task_fn(Upper, d)(batch)  # a fresh function object (as after unpickling): same stage
    assert Upper.setups == 1 and fn.__name__ == "Upper"
    other = {**d, "metadata": {**d["metadata"], "min_side": d["metadata"]["min_side"] + 1}}
    stream.task_fn(Upper, other)(batch)
    assert Upper.setups == 2  # another config is another stage
    timing = ["t_upper"]
    assert first.drop_columns(timing).equals(Upper(d)(batch).drop_columns(timing))
    assert first.column("reason").to_pylist() == ["", Reason.SCORE_ERROR]
