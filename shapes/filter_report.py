"""How well curation's model filters caught the bad samples a labelled run held: precision and recall.

    python -m shapes.filter_report --output runs/filters/latents --manifest runs/filters/shards/manifest.json

Reads a `pipeline.run` output with plain pyarrow (`OUTPUT/rejected/*.parquet`: key, reason, scores;
`OUTPUT/clips/*.parquet`: the accepted clips' scores) and the shards' `manifest.json` (each sample's `bad`
kind, `fixtures.synth`). A filter's positives are the samples it rejected (reason `low_clip_score` /
`low_aesthetic`); its targets are the samples of the kinds it exists for (`TARGETS`): mis-captioned ones for the
CLIP score, degraded ones for the aesthetic head. Only good samples and those kinds count; the crawl failures
the earlier stages reject never reach the scorer. The pipeline applies the CLIP threshold first, so a degraded
clip the CLIP score also rejects counts against the CLIP filter's precision and the aesthetic filter's recall;
`caught` says how many bad samples either filter rejected.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import schema as S
from shapes.degrade import DEGRADATIONS

TARGETS = {S.Reason.LOW_CLIP_SCORE: ("miscaptioned",), S.Reason.LOW_AESTHETIC: DEGRADATIONS}
"""Filter (its rejection reason) -> the bad kinds it should reject."""
GOOD = "good"


def _rows(output: Path, kind: str, columns: list[str]) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in columns}
    for path in sorted((output / kind).glob("*.parquet")):
        table = pq.read_table(path, columns=columns)
        for c in columns:
            out[c] += table[c].to_pylist()
    return out


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def filter_report(output: str | Path, manifest: str | Path) -> dict:
    """{filter reason: precision, recall, counts}, per kind the rejections and mean scores, and `caught`."""
    output = Path(output)
    kinds_of = {
        s["key"]: s["bad"] or GOOD
        for entry in json.loads(Path(manifest).read_text())["shards"].values()
        for s in entry["samples"]
    }
    wanted = {GOOD, *(k for ks in TARGETS.values() for k in ks)}
    cols = [S.KEY, S.CLIP_SCORE, S.AESTHETIC_SCORE]
    rejected = _rows(output, "rejected", [*cols, S.REASON])
    kept = _rows(output, "clips", cols)
    reasons: dict[str, set[str]] = {}  # key -> its rejection reasons (a sample may have several clips)
    scores: dict[str, dict[str, list[float]]] = {}  # kind -> score column -> values
    seen: set[str] = set()
    for table, is_rejected in ((rejected, True), (kept, False)):
        for i, key in enumerate(table[S.KEY]):
            kind = kinds_of.get(key)
            if kind not in wanted:
                continue
            seen.add(key)
            if is_rejected:
                reasons.setdefault(key, set()).add(table[S.REASON][i])
            for c in (S.CLIP_SCORE, S.AESTHETIC_SCORE):
                v = table[c][i]
                if v is not None and v == v:  # NaN: not scored
                    scores.setdefault(kind, {}).setdefault(c, []).append(v)
    report: dict = {}
    for reason, targets in TARGETS.items():
        positive = {k for k in seen if reason in reasons.get(k, ())}
        target = {k for k in seen if kinds_of[k] in targets}
        hit = len(positive & target)
        report[reason] = dict(
            targets=list(targets),
            precision=_ratio(hit, len(positive)),
            recall=_ratio(hit, len(target)),
            rejected=len(positive),
            target_samples=len(target),
            true_positives=hit,
        )
    by_kind: dict = {}
    for kind in sorted({kinds_of[k] for k in seen}):
        keys = [k for k in seen if kinds_of[k] == kind]
        by_kind[kind] = dict(
            samples=len(keys),
            kept=sum(not reasons.get(k) for k in keys),
            **{r: sum(r in reasons.get(k, ()) for k in keys) for r in TARGETS},
            **{f"mean_{c}": round(float(np.mean(v)), 4) for c, v in scores.get(kind, {}).items()},
        )
    bad = [k for k in seen if kinds_of[k] != GOOD]
    model_reasons = set(TARGETS)
    report["by_kind"] = by_kind
    report["caught"] = dict(
        bad_samples=len(bad),
        rejected_by_a_model_filter=sum(bool(reasons.get(k, set()) & model_reasons) for k in bad),
        good_rejected_by_a_model_filter=sum(
            bool(reasons.get(k, set()) & model_reasons) for k in seen if kinds_of[k] == GOOD
        ),
    )
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m shapes.filter_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="a pipeline.run output directory (clips/, rejected/)")
    p.add_argument("--manifest", required=True, help="the shards' manifest.json (fixtures.synth)")
    a = p.parse_args(argv)
    report = filter_report(a.output, a.manifest)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
