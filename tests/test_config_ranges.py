"""Every numeric field of every config schema has a range, and a value outside it is refused naming the field.

The schemas are walked, not listed by hand: a new int/float field without a `RANGES` entry fails here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest

from pipeline.config import PipelineConfig
from pipeline.configlib import ConfigError, Range, load_config, numeric_fields
from training.config import TrainConfig
from training.sampling.config import SampleConfig
from tuning.config import SweepConfig

SCHEMAS = [PipelineConfig, TrainConfig, SampleConfig, SweepConfig]


def walk(cfg, prefix: str = "") -> Iterator[tuple[str, type, str]]:
    """(dotted field, owning dataclass, field name) for every numeric field reachable from `cfg`'s defaults."""
    for name in numeric_fields(type(cfg)):
        yield f"{prefix}{name}", type(cfg), name
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk(value, f"{prefix}{f.name}.")
        elif isinstance(value, dict):
            for key, v in value.items():
                if dataclasses.is_dataclass(v):
                    yield from walk(v, f"{prefix}{f.name}.{key}.")


def bad_values(r: Range, is_float: bool) -> list[float]:
    """Values just outside `r` (and the non-finite ones it refuses)."""
    out: list[float] = []
    if r.lo is not None:
        out.append(r.lo if r.open_lo else (r.lo - 0.5 if is_float else int(r.lo) - 1))
    if r.hi is not None:
        out.append(r.hi + (0.5 if is_float else 1))
    if is_float:
        out.append(math.nan)
        if not r.infinite:
            out.append(math.inf)
    return out


def cases():
    for schema in SCHEMAS:
        for dotted, owner, name in walk(schema()):
            yield pytest.param(schema, dotted, owner, name, id=f"{schema.__name__}:{dotted}")


@pytest.mark.parametrize(("schema", "dotted", "owner", "name"), list(cases()))
def test_every_numeric_field_has_a_range_that_is_enforced(schema, dotted, owner, name):
    r = getattr(owner, "RANGES", {}).get(name)
    assert isinstance(r, Range), f"{owner.__name__}.RANGES has no entry for '{name}'"
    default = getattr(owner(), name)
    assert default is None or r.accepts(default), f"the default of '{dotted}' ({default}) is outside {r}"
    hint = owner.__dataclass_fields__[name].type
    is_float = "float" in str(hint)
    for bad in bad_values(r, is_float):
        with pytest.raises(ConfigError, match=rf"'{dotted}'"):
            load_config(schema, overrides={dotted: bad})
