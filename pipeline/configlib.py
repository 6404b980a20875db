"""The one config path shared by every CLI and by Ray Tune.

Each package declares its config as nested dataclasses (defaults + a one-line docstring per field).
A YAML preset holds only the fields it changes; dotted overrides (`optim.lr=3e-4`) come last:

    dataclass defaults  <-  YAML preset  <-  dotted overrides (CLI strings or a Tune trial dict)

The merge is OmegaConf's structured-config merge, so types are checked and `Literal[...]` fields
only accept their listed values. Numeric fields are then checked against their ranges: each config
dataclass lists one `Range` per int/float field in its `RANGES` class variable (a test holds every
schema to that). Every failure is raised as `ConfigError` naming the key or field and where the bad
value came from. Text files a user hands a CLI (presets, prompt lists) are read by `read_text` / `read_lines`,
which name the file and line of bytes that are not UTF-8.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")

Overrides = Sequence[str] | Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts: lo <= x <= hi (None: unbounded; `open_lo`: lo < x).
    NaN never passes; +-inf only with `infinite` (a threshold that turns a filter off)."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    infinite: bool = False

    def accepts(self, x: float) -> bool:
        if math.isnan(x) or (math.isinf(x) and not self.infinite):
            return False
        if self.lo is not None and (x < self.lo or (self.open_lo and x == self.lo)):
            return False
        return self.hi is None or x <= self.hi

    def __str__(self) -> str:
        bounds = [f"{'>' if self.open_lo else '>='} {self.lo:g}"] if self.lo is not None else []
        bounds += [f"<= {self.hi:g}"] if self.hi is not None else []
        return " and ".join(bounds or ["a number"])


def at_least(lo: float) -> Range:
    return Range(lo)


def above(lo: float) -> Range:
    return Range(lo, open_lo=True)


def between(lo: float, hi: float) -> Range:
    return Range(lo, hi)


ANY = Range()
"""A finite number of any sign (a seed offset, a shift)."""
THRESHOLD = Range(infinite=True)
"""A score threshold: any number, -inf/inf included (-inf: keep everything)."""

RangeTable = ClassVar[dict[str, Range]]
"""The annotation of a config dataclass's `RANGES`: {field name: Range} for its int/float fields."""


def numeric_fields(schema: type) -> list[str]:
    """Names of `schema`'s int / float fields, optional ones (`int | None`) included; not bool, not containers."""
    import types
    import typing

    hints, out = typing.get_type_hints(schema), []
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = set(typing.get_args(hint)) - {type(None)} if union else {hint}
        if kinds and kinds <= {int, float}:
            out.append(f.name)
    return out


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise `ConfigError` for the first numeric field of `cfg` (a config dataclass, recursively) outside its
    `Range`, naming the dotted field, the value and the range."""
    ranges = getattr(type(cfg), "RANGES", {})
    for f in dataclasses.fields(cfg):
        value, dotted = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, dotted + ".")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    check_ranges(v, f"{dotted}.{k}.")
        elif f.name in ranges and isinstance(value, int | float) and not isinstance(value, bool):
            r = ranges[f.name]
            if not r.accepts(value):
                must = str(r) if math.isfinite(value) or r.infinite else f"finite, {r}"
                raise ConfigError(f"invalid value for config field '{dotted}': {value!r} (must be {must})")


class ConfigError(ValueError):
    """A config key that does not exist, or a value a field does not accept."""


class TextFileError(ConfigError):
    """A text file handed to a CLI (a preset, a prompt list) that cannot be read as what it should hold."""


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file a user handed a CLI (a leading BOM dropped). Bytes that are not UTF-8 raise
    `TextFileError` naming the file and the line, not a bare UnicodeDecodeError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TextFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TextFileError(
            f"{path}, line {line}: not UTF-8 text ({exc.reason}: {data[exc.start : exc.end]!r}); "
            "save the file as UTF-8"
        ) from None


def read_lines(path: str | Path, what: str = "lines") -> list[str]:
    """The items of a user's one-per-line text file (prompts, captions): each line stripped, blank and
    whitespace-only lines and `#` comments skipped; `TextFileError` when no `what` is left."""
    items = [ln for ln in (line.strip() for line in read_text(path).splitlines()) if ln and ln[0] != "#"]
    if not items:
        raise TextFileError(f"{path}: no {what} in it (every line is blank or a # comment)")
    return items


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    full_key = getattr(exc, "full_key", None) or "?"
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ConfigKeyError):
        return ConfigError(f"unknown config key '{full_key}' in {source}: {first_line}")
    if isinstance(exc, ValidationError):
        return ConfigError(f"invalid value for config field '{full_key}' in {source}: {first_line}")
    return ConfigError(f"bad config in {source} (key '{full_key}'): {first_line}")


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None


def _layers(overrides: Overrides) -> list[tuple[Any, str]]:
    """(a mergeable layer, its name for errors) per override, in order.

    CLI strings "a.b=value" are parsed as YAML (OmegaConf's dotlist); a {"a.b": value} mapping (a Ray Tune
    trial) is merged as the nested dict {"a": {"b": value}}, so values keep their Python type: the string
    "45386_00000" stays a string instead of being read as the YAML integer 4538600000."""
    if isinstance(overrides, Mapping):
        layers = []
        for key, value in overrides.items():
            tree: Any = value
            for part in reversed(str(key).split(".")):
                tree = {part: tree}
            layers.append((tree, f"override '{key}={value}'"))
        return layers
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form dotted.key=value")
    return [(OmegaConf.from_dotlist([item]), f"override '{item}'") for item in overrides]


Presets = str | Path | Sequence[str | Path] | None

EXTENDS = "extends"
"""Top-level preset key naming the preset(s) it builds on, relative to its own directory (merged first)."""


def load_config(schema: type[T], path: Presets = None, overrides: Overrides = ()) -> T:
    """Merge `schema`'s defaults, the YAML preset(s) at `path` and dotted `overrides` into a `schema`.

    `path` is one preset or a list of them, merged in order (later wins); a preset may start from others
    with `extends: other.yaml` (or a list), resolved relative to its own file and merged before it.
    `overrides` is a list of "a.b=value" strings (the CLI) or a {"a.b": value} mapping (Ray Tune).
    Raises `ConfigError` naming the unknown key or the invalid field and its allowed values.
    """
    cfg: DictConfig = OmegaConf.structured(schema)
    for preset in _presets(path):
        cfg = _merge_preset(cfg, Path(preset), ())
    return _to_validated_object(apply_overrides(cfg, overrides), "the merged config")


def _presets(path: Presets) -> list[str | Path]:
    if path is None:
        return []
    return [path] if isinstance(path, str | Path) else list(path)


def _merge_preset(cfg: DictConfig, path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """`cfg` <- the presets `path` extends (depth first) <- `path` itself."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} extends itself: {' -> '.join(map(str, (*chain, path)))}")
    try:
        preset = OmegaConf.load(io.StringIO(read_text(path)))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"config file {path}{where}: not valid YAML ({exc.problem or exc.context})"
        ) from None
    if not isinstance(preset, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(preset).__name__}")
    parents = preset.pop(EXTENDS, None)
    for parent in _presets(OmegaConf.to_container(parents) if isinstance(parents, ListConfig) else parents):
        cfg = _merge_preset(cfg, path.parent / str(parent), (*chain, path.resolve()))
    return _merge(cfg, preset, f"config file {path}")


def from_dict(schema: type[T], tree: Mapping[str, Any], overrides: Overrides = ()) -> T:
    """Rebuild a config from `to_dict`'s nested dict (e.g. after crossing a Ray boundary), re-validated,
    with dotted `overrides` on top (a Tune trial's sampled values)."""
    cfg = _merge(OmegaConf.structured(schema), tree, "a config dict")
    return _to_validated_object(apply_overrides(cfg, overrides), "a config dict")


def apply_overrides(cfg: DictConfig, overrides: Overrides) -> DictConfig:
    """Merge dotted overrides one at a time, so an error names the override that failed."""
    for layer, source in _layers(overrides):
        cfg = _merge(cfg, layer, source)
    return cfg


def _to_validated_object(cfg: DictConfig, source: str) -> Any:
    """The dataclass instance of a merged config, range-checked, after its `validate()` hook (if any)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        # e.g. a required field (MISSING) that neither the preset nor an override set.
        raise _explain(exc, source) from None
    check_ranges(obj)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (for JSON, checkpoints and Ray boundaries)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML; `load_config(schema, that_file)` reproduces it."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def json_safe(value: Any) -> Any:
    """`value` with its non-finite floats made valid JSON: inf -> "inf", -inf -> "-inf" (both read back by
    `float()` and OmegaConf), NaN -> null (a score never computed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any, **kwargs) -> str:
    """Strict JSON (no NaN / Infinity tokens, which most JSON readers refuse) of `json_safe(value)`."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of a config dataclass or nested dict."""
    tree = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def add_config_args(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    """The `--config PRESET [PRESET ...] [a.b=value ...]` part every CLI shares (see `config_args`)."""
    parser.add_argument(
        "--config",
        nargs="+",
        default=[default_preset] if default_preset else None,
        metavar="PRESET",
        help="YAML preset(s) holding only the fields they change, merged in order (later wins)"
        + (f"; default {default_preset}" if default_preset else ""),
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4"
    )


def config_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(presets, overrides) of a parsed `add_config_args` command line.

    `--config a.yaml b.yaml optim.lr=3e-4` hands argparse every word after --config; the KEY=VALUE words
    among them are overrides (a preset path never holds '=')."""
    words = list(args.config or [])
    presets = [w for w in words if "=" not in w]
    return presets, [w for w in words if "=" in w] + list(args.overrides)
