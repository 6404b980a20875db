"""Run summary: samples in, clips out, rejections per reason, clips/s per stage -> summary.json (+ PNG).

Counts come from the output files on disk (every shard of the input, including those an earlier run
wrote, each file once), timings from this run. The PNG shows the
CLIP, aesthetic and motion score distributions of every scored clip (accepted and rejected) with the
thresholds marked: how to pick thresholds for a new dataset.
"""

from __future__ import annotations

import io
import logging
from collections import Counter

import numpy as np

from pipeline import schema as S
from pipeline.config import config_hash
from pipeline.configlib import to_dict, to_json

log = logging.getLogger(__name__)


def _accounted(clips, rej) -> int:
    """Samples a shard's files account for: its distinct keys, plus each later copy of a key (a
    `duplicate_key` rejection shares its key with the first copy)."""
    keys = set(clips.column(S.KEY).to_pylist()) | set(rej.column(S.KEY).to_pylist())
    return len(keys) + rej.column(S.REASON).to_pylist().count(S.Reason.DUPLICATE_KEY)


def summarize(
    store, cfg, stems: list[str], written: list[str], stage_t: dict[str, list[float]], wall_s: float
) -> dict:
    """Write summary.json (+ summary.png) over the output files of `stems` as they are on disk."""
    stems, written = list(dict.fromkeys(stems)), list(dict.fromkeys(written))  # each file counted once
    reasons, stages = Counter(), Counter()
    samples_in = clips_out = rejected = 0
    unaccounted: dict[str, int] = {}
    truncated = []
    scores: dict[str, list[np.ndarray]] = {s: [] for s in S.SCORES}
    clips_of: dict[str, int] = {}
    for stem in stems:
        clips = store.read("clips", stem, [S.KEY, *S.SCORES])
        rej = store.read("rejected", stem, [S.KEY, S.STAGE, S.REASON, *S.SCORES])
        n_in = S.decode_metadata(store.read_schema(stem)).get(S.META_SHARD_SAMPLES, 0)
        samples_in += n_in
        clips_of[stem] = clips.num_rows
        clips_out += clips.num_rows
        rejected += rej.num_rows
        reasons.update(rej.column(S.REASON).to_pylist())
        stages.update(rej.column(S.STAGE).to_pylist())
        if S.Reason.SHARD_TRUNCATED in rej.column(S.REASON).to_pylist():
            truncated.append(stem)
        if (n := _accounted(clips, rej)) != n_in:
            unaccounted[stem] = n_in - n
        for s in S.SCORES:
            for t in (clips, rej):
                scores[s].append(t.column(s).to_numpy(zero_copy_only=False))
    per_stage = {
        stage: {
            "rows": int(n),
            "busy_s": round(sec, 3),
            "rows_per_busy_s": round(n / sec, 2) if sec else None,
        }
        for stage, (n, sec) in stage_t.items()
    }
    written_clips = sum(clips_of[s] for s in written)
    summary = {
        "output": store.root,
        "input": cfg.input,
        "config_hash": None,
        "shards": len(stems),
        "shards_written": len(written),
        "shards_skipped": len(stems) - len(written),
        "shards_truncated": truncated,
        "samples_in": samples_in,
        "clips_out": clips_out,
        "rejected": rejected,
        "rejected_by_reason": dict(reasons.most_common()),
        "rejected_by_stage": dict(stages.most_common()),
        "unaccounted_samples": unaccounted,
        "wall_s": round(wall_s, 2),
        "clips_written_this_run": written_clips,
        "clips_per_s": round(written_clips / wall_s, 3) if wall_s else None,
        "stages": per_stage,
        "thresholds": {
            "motion": cfg.motion.min_score if cfg.motion.enabled else None,
            "clip": cfg.clip.min_score if cfg.clip.enabled else None,
            "aesthetic": cfg.aesthetic.min_score if cfg.aesthetic.enabled else None,
        },
        "config": to_dict(cfg),
    }
    summary["config_hash"] = config_hash(cfg)
    store.write_text("summary.json", to_json(summary, indent=1))
    if cfg.write.plot:
        try:
            store.write_text(
                "summary.png",
                plot_scores(
                    {k: np.concatenate(v) if v else np.zeros(0) for k, v in scores.items()},
                    summary["thresholds"],
                ),
            )
        except Exception as exc:  # a missing plot must not fail a finished run
            log.warning("summary.png not written: %s", exc)
    if unaccounted:
        log.error("samples not accounted for: %s", unaccounted)
    return summary


def plot_scores(scores: dict[str, np.ndarray], thresholds: dict[str, float | None]) -> bytes:
    """PNG bytes: one histogram per score (x: the score, y: clips) with its threshold as a red line.

    A threshold below every score (the demo's -1 / -1e9: keep everything) is written in the title, not
    drawn: on the axis it would squeeze the histogram into one pixel. A filter that is off says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        ("clip_score", "clip", "CLIP image-text cosine"),
        ("aesthetic_score", "aesthetic", "LAION aesthetic score"),
        ("motion_score", "motion", "mean |frame difference|"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (col, key, label) in zip(axes, names):
        x = scores[col][np.isfinite(scores[col])]
        t = thresholds[key]
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
        if not len(x):
            ax.text(0.5, 0.5, "filter off" if t is None else "no scores", ha="center", transform=ax.transAxes)
            ax.set_title(f"{col}: not computed")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.hist(x, bins=40, color="#4a7bd0")
        ax.locator_params(axis="x", nbins=5)  # few ticks: scores of a narrow spread print long labels
        ax.yaxis.get_major_locator().set_params(integer=True)  # clip counts
        kept = len(x) if t is None else int((x >= t).sum())
        span = max(float(x.max() - x.min()), 1e-6)
        if t is not None and t >= x.min() - 0.5 * span:
            ax.axvline(t, color="red", lw=2, label=f"min {t:g}")
            ax.legend()
            rule = ""
        else:
            rule = " (no threshold)" if t is None else f" (min {t:g}: keeps all)"
        ax.set_title(f"{col}: {kept}/{len(x)} pass{rule}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
