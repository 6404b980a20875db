"""The row format that flows between the pipeline's Ray Data stages (internal, not the output contract).

One row per sample (after decode: per clip). A row whose `reason` is non-empty is rejected: later stages
pass it through untouched (its heavy columns emptied) so that every sample reaches the part files
(`pipeline.parts`) exactly once and can be written to the rejected table. Each read task ends its shard with
one `end` row carrying the shard's sample count, which is how the driver knows from the parts' manifests that
a shard is complete and can be committed.

Stages take and return `pyarrow.Table` batches; `to_table` builds them with fixed column types so that
blocks from different tasks always share one schema.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pyarrow as pa

SAMPLE, END = "sample", "end"

# Fixed types of the stream's columns; per-view columns are matched by prefix below.
_TYPES: dict[str, pa.DataType] = {
    "row_kind": pa.string(),
    "key": pa.string(),
    "shard": pa.string(),
    "shard_uri": pa.string(),
    "sample_index": pa.int64(),
    "shard_samples": pa.int64(),
    "media": pa.string(),
    "media_bytes": pa.binary(),
    "caption": pa.string(),
    "meta_json": pa.string(),
    "stage": pa.string(),
    "reason": pa.string(),
    "message": pa.string(),
    "clip_index": pa.int32(),
    "clips_in_sample": pa.int32(),
    "start_s": pa.float32(),
    "source_fps": pa.float32(),
    "source_height": pa.int32(),
    "source_width": pa.int32(),
    "motion_score": pa.float32(),
    "clip_score": pa.float32(),
    "aesthetic_score": pa.float32(),
    "prompt_embeds": pa.binary(),
}
_PREFIX_TYPES: dict[str, pa.DataType] = {
    "frames__": pa.binary(),  # uint8 (F, H, W, 3) bytes per view
    "frame_indices__": pa.binary(),  # int32 (F,) bytes per view
    "fps__": pa.float32(),
    "latents__": pa.binary(),  # (F, C, h, w) bytes per view, dtype from the encode config
    "t_": pa.float64(),  # seconds of stage work attributed to this row
}

NAN = float("nan")


def column_type(name: str) -> pa.DataType:
    if name in _TYPES:
        return _TYPES[name]
    for prefix, typ in _PREFIX_TYPES.items():
        if name.startswith(prefix):
            return typ
    raise KeyError(f"no stream type declared for column {name!r}")


def to_table(rows: list[dict], names: list[str]) -> pa.Table:
    """Rows -> a table with exactly the columns `names` (missing values null) and their declared types.

    Every block out of a stage must have the same columns, or Ray Data cannot concatenate them.
    """
    schema = pa.schema([(name, column_type(name)) for name in names])
    return pa.Table.from_pylist(rows, schema=schema)


READ_COLUMNS = [
    "row_kind",
    "key",
    "shard",
    "shard_uri",
    "sample_index",
    "shard_samples",
    "media",
    "media_bytes",
    "caption",
    "meta_json",
    "stage",
    "reason",
    "message",
    "t_read",
]


def with_columns(names: list[str], added: list[str], dropped: tuple[str, ...] = ()) -> list[str]:
    """A stage's output columns: its input's, plus `added`, minus those starting with `dropped`."""
    out = [n for n in names if not (dropped and n.startswith(dropped))]
    return out + [n for n in added if n not in out]


def alive(row: dict) -> bool:
    return row.get("row_kind") == SAMPLE and not row.get("reason")


def reject(row: dict, stage: str, reason: str, message: str = "") -> dict:
    """Mark `row` rejected at `stage` and drop its heavy columns (they are not needed downstream)."""
    row["stage"], row["reason"], row["message"] = stage, reason, message[:2000]
    for name in row:
        if name == "media_bytes" or name.startswith(("frames__", "latents__")) or name == "prompt_embeds":
            row[name] = b""
    return row


@contextmanager
def timed(rows: Iterable[dict], stage: str) -> Iterator[None]:
    """Attribute the wall time of the block to the alive rows that entered it, as `t_<stage>`."""
    rows = list(rows)
    live = [r for r in rows if alive(r)]
    t0 = time.perf_counter()
    yield
    share = (time.perf_counter() - t0) / max(len(live), 1)
    for row in rows:
        row[f"t_{stage}"] = 0.0
    for row in live:
        row[f"t_{stage}"] = share


class RowStage:
    """A pipeline stage: `setup()` loads what it needs once per worker, `process(rows)` does the work.

    Ray Data calls the object on `pyarrow.Table` batches. Rows that are not alive pass through
    untouched; a failure on one row becomes that row's rejection, never the batch's.
    """

    name = "stage"
    self_timed = False  # True when `process` sets `t_<name>` itself (stages that expand rows)

    def __init__(self, cfg: dict):
        from pipeline.config import from_dict

        self.cfg = from_dict(cfg)
        self._ready = False

    def setup(self) -> None:
        """Load models / start helpers (once per actor)."""

    def added_columns(self) -> list[str]:
        return [f"t_{self.name}"]

    def dropped_columns(self) -> tuple[str, ...]:
        return ()

    def process(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def ensure_ready(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.ensure_ready()
        names = with_columns(batch.column_names, self.added_columns(), self.dropped_columns())
        rows = batch.to_pylist()
        if self.self_timed:
            rows = self.process(rows)
        else:
            with timed(rows, self.name):
                rows = self.process(rows)
        return to_table(rows, names)


def chain(*stage_classes: type[RowStage]) -> type[RowStage]:
    """One stage running `stage_classes` one after another in the same worker: a cheap CPU stage rides along
    with the actor before it instead of costing its blocks a trip through the object store."""

    class Chain(RowStage):
        def __init__(self, cfg: dict):
            self.stages = [cls(cfg) for cls in stage_classes]
            self._ready = False

        def setup(self) -> None:
            for stage in self.stages:
                stage.ensure_ready()

        def __call__(self, batch: pa.Table) -> pa.Table:
            self.ensure_ready()
            for stage in self.stages:
                batch = stage(batch)
            return batch

    Chain.__name__ = Chain.__qualname__ = "+".join(cls.__name__ for cls in stage_classes)
    return Chain


def actor_cls(stage_cls: type[RowStage]) -> type[RowStage]:
    """`stage_cls` for a Ray Data actor pool: loads its models when the actor starts, not on its first batch.

    Ray Data starts every pool's actors together when the dataset starts, so all models load at once,
    overlapped with reading and decoding, instead of one stage after another as the first batch arrives.
    """

    class Actor(stage_cls):  # type: ignore[valid-type,misc]
        def __init__(self, cfg: dict):
            super().__init__(cfg)
            self.ensure_ready()

    Actor.__name__ = Actor.__qualname__ = stage_cls.__name__
    return Actor


_TASK_STAGES: dict[tuple[str, str, str], RowStage] = {}


def task_fn(stage_cls: type[RowStage], cfg: dict):
    """A plain function for Ray Data *tasks* (no actor) running a model-free stage.

    The stage is built once per worker process (building the typed config costs ~0.1 s, more than a
    small batch's work) and reused by every task that process runs.
    """
    key = (stage_cls.__module__, stage_cls.__qualname__, json.dumps(cfg, sort_keys=True, default=str))

    def fn(batch: pa.Table) -> pa.Table:
        if key not in _TASK_STAGES:  # the function is unpickled per task; this module is not
            _TASK_STAGES[key] = stage_cls(cfg)
        return _TASK_STAGES[key](batch)

    fn.__name__ = stage_cls.__name__
    return fn
