"""Search spaces: YAML distributions over dotted config keys -> Ray Tune domains, checked before any trial.

    space:
      noise.alpha: {grid: [0.0, 1.0, 2.0]}         # every value (tune.grid_search)
      noise.prior: {choice: [mixed, progressive]}  # one of (tune.choice)
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}     # tune.loguniform
      loss.lambda_trs: {uniform: [0.0, 0.5]}       # tune.uniform; quniform/qloguniform take [lo, hi, q]
      sampler.steps: {randint: [10, 50]}           # integer in [lo, hi) (tune.randint)

Keys may also be nested (`noise: {alpha: {grid: [...]}}`); both forms flatten to "noise.alpha".
`check_space` fails on the first bad entry with a `SpaceError` naming the key: an unknown key, a
distribution Tune does not have, an empty range or list, bounds that are not numbers, or a value the
trial config refuses (each candidate value is merged into the trial config by `load_config`, the same
path the trial itself takes, so a wrong type or a value outside a field's `validate()` shows up here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.configlib import ConfigError, load_config

RANGES = ("uniform", "loguniform", "quniform", "qloguniform", "randint")
LISTS = ("choice", "grid")
DISTRIBUTIONS = RANGES + LISTS


class SpaceError(ConfigError):
    """A search-space entry that cannot be sampled or that the trial config would refuse."""


def _is_spec(node: Any) -> bool:
    return isinstance(node, Mapping) and len(node) == 1 and next(iter(node)) in DISTRIBUTIONS


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, dict]:
    """{"noise.alpha": {"grid": [...]}, ...} from a dotted or nested YAML space."""
    out: dict[str, dict] = {}
    for key, node in space.items():
        dotted = f"{prefix}{key}"
        if _is_spec(node):
            out[dotted] = dict(node)
        elif (
            isinstance(node, Mapping)
            and len(node) == 1
            and isinstance(next(iter(node.values())), list | tuple)
        ):
            raise SpaceError(
                f"search space key '{dotted}': unknown distribution '{next(iter(node))}', "
                f"expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}"
            )
        elif isinstance(node, Mapping) and node and not any(k in DISTRIBUTIONS for k in node):
            out.update(flatten_space(node, dotted + "."))
        else:
            raise SpaceError(
                f"search space key '{dotted}': expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                f"got {node!r}"
            )
    return out


def _number(key: str, dist: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise SpaceError(f"search space key '{key}': {dist} bound {value!r} is not a number")
    return value


def _check_spec(key: str, dist: str, args: Any) -> list[Any]:
    """Shape checks of one entry; returns the candidate values to try on the trial config."""
    if dist in LISTS:
        if not isinstance(args, list | tuple) or not args:
            raise SpaceError(f"search space key '{key}': {dist} needs a non-empty list, got {args!r}")
        return list(args)
    want = 3 if dist.startswith("q") else 2
    if not isinstance(args, list | tuple) or len(args) != want:
        form = "[lo, hi, q]" if want == 3 else "[lo, hi]"
        raise SpaceError(f"search space key '{key}': {dist} needs {form}, got {args!r}")
    lo, hi = (_number(key, dist, v) for v in args[:2])
    if dist == "randint":
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise SpaceError(f"search space key '{key}': randint bounds must be integers, got {args!r}")
        if hi <= lo:
            raise SpaceError(f"search space key '{key}': empty range randint [{lo}, {hi}) (hi is exclusive)")
        return [lo, hi - 1]
    if hi <= lo:
        raise SpaceError(f"search space key '{key}': empty range {dist} [{lo}, {hi}]")
    if "log" in dist and lo <= 0:
        raise SpaceError(f"search space key '{key}': {dist} needs lo > 0, got {lo}")
    if want == 3 and _number(key, dist, args[2]) <= 0:
        raise SpaceError(f"search space key '{key}': {dist} step q={args[2]} must be > 0")
    return [lo, hi]


def check_space(
    space: Mapping[str, Any], schema: type, base: str | None = None, overrides: Mapping[str, Any] = ()
) -> dict[str, dict]:
    """Validate `space` against the trial config `schema` (preset `base` + `overrides`); returns it flat.

    Every candidate value (both ends of a range, every listed value) is merged, one key at a time on top
    of the base trial config, through `load_config`: the trial config's own errors name the key."""
    flat = flatten_space(space)
    if not flat:
        raise SpaceError("search space is empty")
    overrides = dict(overrides or {})
    try:
        load_config(schema, base, overrides)
    except (ConfigError, ValueError) as exc:
        raise SpaceError(f"the sweep's base trial config is invalid before any search value: {exc}") from None
    for key, spec in flat.items():
        ((dist, args),) = spec.items()
        for value in _check_spec(key, dist, args):
            try:
                load_config(schema, base, {**overrides, key: value})
            except ConfigError as exc:
                raise SpaceError(f"search space key '{key}' ({dist}): {exc}") from None
            except ValueError as exc:  # the trial config's validate(): the value is out of its range
                raise SpaceError(f"search space key '{key}' ({dist}) value {value!r}: {exc}") from None
    return flat


def to_tune(flat: Mapping[str, dict], algorithm: str) -> dict[str, Any]:
    """Tune's param_space for `flat` (from `check_space`) under search `algorithm`."""
    from ray import tune

    if algorithm == "grid":
        bad = [k for k, spec in flat.items() if next(iter(spec)) not in LISTS]
        if bad:
            raise SpaceError(
                f"search.algorithm=grid needs grid/choice entries only; '{bad[0]}' is {next(iter(flat[bad[0]]))}"
            )
    if algorithm == "optuna":
        bad = [k for k, spec in flat.items() if next(iter(spec)) == "grid"]
        if bad:
            raise SpaceError(f"search.algorithm=optuna cannot grid-search '{bad[0]}': use choice instead")
    out: dict[str, Any] = {}
    for key, spec in flat.items():
        ((dist, args),) = spec.items()
        if dist == "grid" or (dist == "choice" and algorithm == "grid"):
            out[key] = tune.grid_search(list(args))
        elif dist == "choice":
            out[key] = tune.choice(list(args))
        else:
            out[key] = getattr(tune, dist)(*args)
    return out


def grid_size(flat: Mapping[str, dict], algorithm: str) -> int:
    """Trials one pass over the grid entries makes (1 when nothing is grid-searched)."""
    n = 1
    for spec in flat.values():
        ((dist, args),) = spec.items()
        if dist == "grid" or (dist == "choice" and algorithm == "grid"):
            n *= len(args)
    return n
