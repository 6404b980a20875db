"""Filters on their own (no Ray): guards before decoding, motion, CLIP + aesthetic thresholds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import PipelineConfig
from pipeline.configlib import load_config, to_dict
from pipeline.filters import ClipScorer, MetadataFilter, MotionFilter, declared, iso_seconds, motion_score
from pipeline.schema import Reason
from tests.pipeline.conftest import DEMO, zoo_overrides


def cfg_dict(*overrides, zoo=None):
    return to_dict(load_config(PipelineConfig, DEMO, [*(zoo_overrides(zoo) if zoo else []), *overrides]))


def clip_row(key: str, frames: np.ndarray, caption: str = "a red circle moves up") -> dict:
    return {
        "row_kind": "sample",
        "key": key,
        "caption": caption,
        "reason": "",
        "stage": "",
        "message": "",
        "frames__main": frames.tobytes(),
    }


def test_webvid_json_fields():
    assert iso_seconds("PT00H01M03S") == 63.0 and iso_seconds("nonsense") is None
    meta = {
        "duration": "PT00H00M03S",
        "video_metadata": {"streams": [{"width": 640, "height": 360}], "format": {"size": "123"}},
    }
    assert declared(meta) == {"duration": 3.0, "width": 640.0, "height": 360.0, "size": 123.0}


def test_metadata_guards_run_even_when_the_filter_is_off():
    stage = MetadataFilter(cfg_dict("metadata.enabled=false"))
    meta = json.dumps({"video_metadata": {"streams": [{"width": 9000, "height": 9000}], "format": {}}})
    row = {
        "row_kind": "sample",
        "key": "k",
        "media": "video",
        "media_bytes": b"\0\0\0\x18ftypisom",
        "caption": "",
        "meta_json": meta,
        "reason": "",
        "stage": "",
        "message": "",
    }
    assert stage.check(row)[0] == Reason.TOO_LARGE
    row["meta_json"] = "{}"
    assert stage.check(row) is None  # the empty caption is a filter, which is off


ODD_JSON = {
    "video_metadata a list": '{"video_metadata": [1, 2]}',
    "streams a string": '{"video_metadata": {"streams": "h264"}}',
    "a stream not an object": '{"video_metadata": {"streams": [7]}}',
    "format a list": '{"video_metadata": {"format": ["mp4"]}}',
    "size nan": '{"video_metadata": {"format": {"size": "nan"}}}',
    "size 1e400": '{"video_metadata": {"format": {"size": "1e400"}}}',
    "width inf": '{"video_metadata": {"streams": [{"width": "inf", "height": 360}]}}',
    "width NaN literal": '{"width": NaN, "height": 360}',
    "duration Infinity": '{"video_metadata": {"format": {"duration": Infinity}}}',
    "height 10**400": '{"height": 1' + "0" * 400 + "}",
    "width a dict": '{"width": {"px": 640}}',
    "top level a list": "[1, 2, 3]",
    "deep nesting": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("meta_json", list(ODD_JSON.values()), ids=list(ODD_JSON))
def test_an_odd_json_shape_is_a_bad_json_rejection_not_an_exception(meta_json):
    stage = MetadataFilter(cfg_dict())
    row = {
        "row_kind": "sample",
        "key": "k",
        "media": "video",
        "media_bytes": b"\0\0\0\x18ftypisom",
        "caption": "a caption",
        "meta_json": meta_json,
        "reason": "",
        "stage": "",
        "message": "",
    }
    [out] = stage.process([row])
    assert out["reason"] == Reason.BAD_JSON and out["stage"] == "metadata" and out["message"]


def test_static_clip_is_rejected_by_motion():
    stage = MotionFilter(cfg_dict())
    still = np.full((8, 64, 64, 3), 90, np.uint8)
    moving = still.copy()
    for i in range(8):
        moving[i, :, 8 * i : 8 * i + 8] = 250
    assert motion_score(still, 32) == 0.0 and motion_score(moving, 32) > 0.01
    rows = stage.process([clip_row("still", still), clip_row("moving", moving)])
    assert [r["reason"] for r in rows] == [Reason.STATIC, ""]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["clip.min_score=1.01"], Reason.LOW_CLIP_SCORE),
        (["aesthetic.min_score=1e9"], Reason.LOW_AESTHETIC),
        ([], ""),
    ],
)
def test_scores_under_threshold_are_rejections(tiny_zoo, overrides, reason):
    stage = ClipScorer(cfg_dict(*overrides, zoo=tiny_zoo))
    rng = np.random.default_rng(0)
    rows = [clip_row(f"k{i}", rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)) for i in range(3)]
    batch = pa.Table.from_pylist(rows)
    out = stage(batch).to_pylist()
    assert [r["reason"] for r in out] == [reason] * 3
    for r in out:  # scores are kept on rejected rows too, for picking thresholds
        assert -1 <= r["clip_score"] <= 1 and np.isfinite(r["aesthetic_score"]) and r["t_score"] > 0


def test_chained_stages_equal_the_stages_one_after_another(tiny_zoo):
    from pipeline.encode import VaeEncoder
    from pipeline.stream import actor_cls, chain

    d = cfg_dict(zoo=tiny_zoo)
    rng = np.random.default_rng(1)
    rows = [
        dict(clip_row(f"k{i}", rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)), clip_index=0)
        for i in range(3)
    ]
    rows[1]["frames__main"] = np.full((8, 64, 64, 3), 90, np.uint8).tobytes()  # static: motion rejects it
    batch = pa.Table.from_pylist(rows)
    one_by_one = batch
    for stage in (MotionFilter(d), ClipScorer(d), VaeEncoder(d)):
        one_by_one = stage(one_by_one)
    fused = actor_cls(chain(MotionFilter, ClipScorer, VaeEncoder))(d)  # as Ray Data builds the actor
    assert fused._ready and type(fused).__name__ == "MotionFilter+ClipScorer+VaeEncoder"
    got = fused(batch)
    timing = [c for c in got.column_names if c.startswith("t_")]

    def values(table):  # NaN scores (on the rejected row) compare equal here
        return [
            {k: (None if v != v else v) for k, v in r.items()} for r in table.drop_columns(timing).to_pylist()
        ]

    assert got.column_names == one_by_one.column_names and values(got) == values(one_by_one)
    assert got["reason"].to_pylist() == ["", Reason.STATIC, ""]
    assert all(len(r["latents__main"]) > 0 for i, r in enumerate(got.to_pylist()) if i != 1)
