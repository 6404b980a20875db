"""What a finished sweep leaves in OUTPUT: best.yaml, trials.csv / trials.json, objective.png.

best.yaml is the full trial config (`to_yaml` of TrainConfig / SampleConfig) of the best trial, built
from the base preset + `fixed` + the best parameters; the sweep's `budget` overrides (short training,
few sampler steps) are left out, so `python -m training.run --config OUTPUT/best.yaml --data ... --output
...` trains the winner at full length and `python -m training.sample --config OUTPUT/best.yaml ...`
samples with it.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Any

from pipeline.configlib import to_json, to_yaml
from tuning.config import SAMPLING_METRICS, SweepConfig
from tuning.objectives import trial_config

log = logging.getLogger(__name__)


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _trial_id_from_dir(path: str) -> str:
    # Tune names trial dirs "<trainable>_<experiment id>_<index>_<params>_<date>"; the id is the middle pair.
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name)
    return found.group(1) if found else Path(path).name


def trial_rows(grid, sweep: SweepConfig, params: list[str], max_steps: int | None = None) -> list[dict]:
    """One row per trial: id, status, the searched parameters, last / best metric, where it lives.

    A training trial ASHA stopped before `max_steps` (or its searched optim.max_steps) is `stopped_early`."""
    metric, sign = sweep.metric, (1 if sweep.mode == "min" else -1)
    rows = []
    for result in grid:
        m = result.metrics or {}
        history = []
        df = result.metrics_dataframe
        if df is not None and metric in df:
            history = [v for v in (_finite(x) for x in df[metric]) if v is not None]
        row: dict[str, Any] = {
            "trial_id": m.get("trial_id") or _trial_id_from_dir(result.path),
            "status": "ERROR" if result.error else ("TERMINATED" if metric in m else "NO_RESULT"),
        }
        row.update({p: (result.config or {}).get(p) for p in params})
        row[metric] = _finite(m.get(metric))
        row[f"{metric}_best"] = min(history, key=lambda v: sign * v) if history else None
        # Every score of the generated videos a trial reported (sampling trials, evaluated training trials).
        scores = {k: _finite(m[k]) for k in SAMPLING_METRICS if k in m}
        if sweep.kind == "train":
            last = (result.config or {}).get("optim.max_steps", max_steps)
            row["step"] = m.get("step")
            row["stopped_early"] = row["step"] is not None and last is not None and row["step"] < last
            row["val_loss"] = _finite(m.get("val_loss"))
            if sweep.evaluation.prompts is not None:
                row.update(scores, num_videos=m.get("num_videos"), eval_seconds=m.get("eval_seconds"))
        else:
            row.update(
                {k: _finite(m.get(k)) for k in ("clipsim", "frame_consistency", "latent_flicker", "fvd")}
            )
            row.update(scores)
            row["seconds"] = m.get("seconds")  # inside evaluate()
        row["time_total_s"] = _finite(m.get("time_total_s"))  # the whole trial, as Tune timed it
        row["error"] = str(result.error).strip().splitlines()[-1][:300] if result.error else None
        row["trial_dir"] = result.path
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def write_table(rows: list[dict], out: Path) -> None:
    """trials.csv and trials.json."""
    (out / "trials.json").write_text(to_json(rows, indent=1, default=str))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def log_scale_params(space: dict[str, Any]) -> set[str]:
    """The searched parameters drawn from a log distribution (loguniform, qloguniform, ...)."""
    return {p for p, spec in space.items() if isinstance(spec, dict) and any("log" in str(k) for k in spec)}


def plot_objective(
    rows: list[dict],
    params: list[str],
    metric: str,
    path: Path,
    best_dir: str | None = None,
    log_params: set[str] = frozenset(),
) -> Path | None:
    """The metric against each searched parameter (one panel each; categories on an index axis); the best
    trial (its trial dir `best_dir`) as a red star; `log_params` (searched on a log scale) on log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r[metric] is not None]
    if not done:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.4), squeeze=False)
    best = [r for r in done if best_dir is not None and r["trial_dir"] == best_dir]
    for ax, p in zip(axes[0], params):
        numeric = all(isinstance(r[p], int | float) and not isinstance(r[p], bool) for r in done)
        labels = list(dict.fromkeys(str(r[p]) for r in done))

        def x_of(r: dict, p=p, numeric=numeric, labels=labels) -> float:
            return r[p] if numeric else labels.index(str(r[p]))

        ax.scatter([x_of(r) for r in done], [r[metric] for r in done], label="trial")
        for r in best:
            ax.scatter([x_of(r)], [r[metric]], marker="*", s=220, color="red", zorder=3, label="best")
        if numeric and p in log_params and all(r[p] > 0 for r in done):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(p + (" (log)" if p in log_params else ""))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric} per trial ({len(done)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_best(
    best_params: dict, best_value: float, sweep: SweepConfig, plan: dict, schema: type, path: Path
) -> None:
    """best.yaml: the base preset + fixed + best parameters as a full preset of the trial config."""
    cfg = trial_config(schema, plan["preset_tree"], best_params)
    header = [
        f"# Best trial of sweep '{sweep.output.name}' ({sweep.kind}): {sweep.metric} = {best_value:.6g} ({sweep.mode})",
        "# searched: " + ", ".join(f"{k}={v!r}" for k, v in best_params.items()),
        f"# base preset: {sweep.base}; the sweep's budget overrides are not applied here.",
    ]
    if sweep.kind == "train":
        header.append("#   python -m training.run --config THIS.yaml --data LATENTS --output RUN_DIR")
    else:
        header.append(
            "#   python -m training.sample --config THIS.yaml --checkpoint RUN --prompt '...' --output OUT"
        )
    path.write_text("\n".join(header) + "\n" + to_yaml(cfg))


def write_results(grid, sweep: SweepConfig, plan: dict, schema: type, out: Path, expected: int) -> dict:
    """Write every result file of the sweep and return its summary."""
    params = list(plan["space"])
    max_steps = plan["trial_tree"].get("optim", {}).get("max_steps")
    rows = trial_rows(grid, sweep, params, max_steps)
    write_table(rows, out)
    summary: dict[str, Any] = {
        "output": str(out),
        "experiment": grid.experiment_path,
        "expected_trials": expected,
        "trials": len(rows),
        "errored": sum(r["status"] == "ERROR" for r in rows),
        "completed": sum(r["status"] == "TERMINATED" for r in rows),
        "trials_csv": str(out / "trials.csv"),
        "best": None,
    }
    try:
        best = grid.get_best_result(metric=sweep.metric, mode=sweep.mode, scope=sweep.search.scope)
    except RuntimeError as exc:  # no trial reported the metric
        best = None
        log.error("no best trial: %s", exc)
    if sweep.output.plot:
        plot = plot_objective(
            rows,
            params,
            sweep.metric,
            out / "objective.png",
            best_dir=best.path if best is not None else None,
            log_params=log_scale_params(plan["space"]),
        )
        summary["plot"] = str(plot)
    if best is None:
        return summary
    best_params = {p: best.config[p] for p in params}
    scores = best.metrics_dataframe[sweep.metric] if sweep.search.scope == "all" else None
    value = best.metrics[sweep.metric]
    if scores is not None:
        value = float(scores.min() if sweep.mode == "min" else scores.max())
    write_best(best_params, value, sweep, plan, schema, out / "best.yaml")
    summary["best"] = {"params": best_params, sweep.metric: value, "trial_dir": best.path}
    summary["best_yaml"] = str(out / "best.yaml")
    return summary


def print_summary(summary: dict) -> None:
    """The sweep's outcome on stdout."""
    print("\n=== tuning.run finished")
    print(
        f"  trials:      {summary['trials']} of {summary['expected_trials']} "
        f"({summary['completed']} completed, {summary['errored']} errored)"
    )
    best = summary.get("best")
    if best:
        metric = next(k for k in best if k not in ("params", "trial_dir"))
        print(f"  best:        {metric} = {best[metric]:.6g}")
        for k, v in best["params"].items():
            print(f"    {k} = {v!r}")
        print(f"  best preset: {summary['best_yaml']}")
    else:
        print("  best:        none (no trial reported the metric; see trials.csv)")
    print(f"  trials:      {summary['trials_csv']} (+ trials.json)")
    if summary.get("plot"):
        print(f"  plot:        {summary['plot']}")
    print(f"  experiment:  {summary['experiment']}")
    print(f"  tensorboard: tensorboard --logdir {Path(summary['experiment']).parent}")
