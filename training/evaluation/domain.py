"""A domain evaluator's scores (issue 18): does a generated video show its prompt, and how far its features are
from real clips'. The shapes world's evaluator is its I3D; this room never imports `shapes`, so everything here
works from the saved evaluator and its card alone.

The evaluator is a directory `evaluator.pt` (TorchScript: videos `(B, F, 3, H, W)` in [0, 1] -> {label: logits,
'features': (B, D) video features, 'frame_features': (B, FRAMES, d)}) + `evaluator.json` (its SHA-256, the
label vocabulary `attributes` = {shape, colour, background, motion: [class names in index order]}, the input
protocol). `load_evaluator` refuses a file whose checksum differs from its card's or from a pinned one.

- `parse_prompt`: the labels a prompt states, read with the world's caption grammar
  "a {colour} {shape} {motion} on a {background} background" ("... changes colour to {colour} on ..."); any part
  but the shape may be left out, and a prompt outside the grammar (another world's) states no label;
- `accuracy_scores`: per label, the fraction of videos whose evaluator argmax is the prompt's label, over the
  videos whose prompt states it, with its confusion counts (rows: prompt label, columns: predicted). 'colour'
  is the colour at the first frame, as the evaluator was trained: a "changes colour" prompt's first colour;
- `feature_frechet`: domain FVD (the video `features`) and domain FID (the `frame_features`, each frame one
  sample) through the same `gaussian_stats` / `frechet_distance` / `FVDResult` as the I3D FVD;
- `domain_report`: all of it for generated videos against `real_clips` windows of the reference set.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.evaluation import metrics
from training.evaluation.metrics import FVDResult, file_sha256
from training.evaluation.reference import real_clips

log = logging.getLogger(__name__)

MODEL_FILE, CARD_FILE = "evaluator.pt", "evaluator.json"
LABELS = ("shape", "colour", "background", "motion")
"""The labels a card's vocabulary must hold (the caption grammar's slots)."""
APPEARANCE = ("shape", "colour", "background")
"""What `attribute_accuracy` averages: what a frame shows, as opposed to the motion."""
CHANGE = "changes colour"
"""The one motion whose caption names a second colour: "changes colour to {colour}"."""
VIDEO_FEATURES, FRAME_FEATURES = "features", "frame_features"


@dataclass
class DomainEvaluator:
    """A loaded evaluator, its card and its identity (recorded beside every score)."""

    model: torch.jit.ScriptModule
    card: dict
    path: str
    sha256: str

    @property
    def vocabulary(self) -> dict[str, list[str]]:
        return self.card["attributes"]


def load_evaluator(path: str | Path, sha256: str | None = None, device: str = "cpu") -> DomainEvaluator:
    """The evaluator saved in directory `path`; refused if its file's SHA-256 differs from the card's or from
    `sha256` (eval.domain_sha256, the checksum a user pins as for a downloaded I3D)."""
    path = Path(path)
    model_file, card_file = path / MODEL_FILE, path / CARD_FILE
    for f in (model_file, card_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"eval.domain_evaluator={path}: no {f.name} (a directory `python -m shapes.evaluator --out` writes)"
            )
    card = json.loads(card_file.read_text())
    if not card.get("sha256"):
        raise ValueError(f"{card_file}: the card records no sha256 for {MODEL_FILE}: refused")
    actual = file_sha256(model_file)
    for expected, what in ((card["sha256"], "its card"), (sha256, "the pinned eval.domain_sha256")):
        if expected is not None and actual != expected:
            raise ValueError(f"{model_file}: SHA-256 {actual} differs from {what} ({expected}): refused")
    vocab = card.get("attributes")
    if not isinstance(vocab, dict) or any(not isinstance(vocab.get(k), list) or not vocab[k] for k in LABELS):
        raise ValueError(
            f"{card_file}: 'attributes' must list the classes of each of {LABELS}, got {vocab!r}"
        )
    model = torch.jit.load(str(model_file), map_location=device).eval()
    return DomainEvaluator(model, card, str(path), actual)


# ---- prompts -> labels ---------------------------------------------------------------------------------


def _alternatives(words: list[str]) -> str:
    """A regex alternation of `words`, longest first (so "dark blue" is tried before "blue")."""
    return "|".join(re.escape(w.lower()) for w in sorted(words, key=len, reverse=True))


def prompt_grammar(vocabulary: dict[str, list[str]]) -> re.Pattern:
    """The caption grammar over the card's vocabulary: "a[n] [colour] shape [motion] [on a[n] background
    background]", the motion "changes colour" followed by "to {colour}"."""
    colours = _alternatives(vocabulary["colour"])
    motions = [m for m in vocabulary["motion"] if m != CHANGE]
    alternatives = [_alternatives(motions)] if motions else []
    if CHANGE in vocabulary["motion"]:
        alternatives.append(f"{re.escape(CHANGE)} to (?:{colours})")
    motion = "|".join(alternatives)
    return re.compile(
        rf"an? (?:(?P<colour>{colours}) )?(?P<shape>{_alternatives(vocabulary['shape'])})"
        rf"(?: (?P<motion>{motion}))?"
        rf"(?: on an? (?P<background>{_alternatives(vocabulary['background'])}) background)?"
    )


def parse_prompt(
    prompt: str, vocabulary: dict[str, list[str]], grammar: re.Pattern | None = None
) -> dict[str, int | None]:
    """{label: class index, or None where the prompt does not state it}; every label None for a prompt outside
    the grammar (case, spacing and a final full stop aside), so another world's prompt states nothing."""
    grammar = grammar or prompt_grammar(vocabulary)
    text = " ".join(prompt.lower().split()).rstrip(".").strip()
    match = grammar.fullmatch(text)
    out: dict[str, int | None] = {k: None for k in vocabulary}
    if match is None:
        return out
    for name in LABELS:
        said = match.group(name)
        if said is None:
            continue
        if name == "motion" and said.startswith(CHANGE + " to "):
            said = CHANGE  # the end colour is not a label: 'colour' is the first frame's
        out[name] = [c.lower() for c in vocabulary[name]].index(said)
    return out


# ---- scores ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluator_outputs(
    ev: DomainEvaluator, videos: torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """{label: predicted class (N,), 'features': (N, D), 'frame_features': (N, FRAMES, d)} of videos
    (N, F, 3, H, W): uint8, or float in [0, 1]; on the CPU."""
    device = next(ev.model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*ev.vocabulary, VIDEO_FEATURES, FRAME_FEATURES)}
    for chunk in videos.split(batch_size):
        x = chunk.float() / 255 if chunk.dtype == torch.uint8 else chunk.float()
        out = ev.model(x.to(device))
        for k in ev.vocabulary:
            parts[k].append(out[k].argmax(1).cpu())
        for k in (VIDEO_FEATURES, FRAME_FEATURES):
            parts[k].append(out[k].float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def accuracy_scores(
    predicted: dict[str, torch.Tensor], stated: list[dict[str, int | None]], vocabulary: dict[str, list[str]]
) -> dict:
    """Per label {accuracy (None if no prompt states it), stated, chance, labels, confusion}, and
    'attribute_accuracy': the mean of the APPEARANCE labels' accuracies (each label weighs the same)."""
    per: dict[str, dict] = {}
    for name, classes in vocabulary.items():
        counts = np.zeros((len(classes), len(classes)), dtype=np.int64)  # (prompt label, predicted)
        for i, labels in enumerate(stated):
            if labels.get(name) is not None:
                counts[labels[name], int(predicted[name][i])] += 1
        n = int(counts.sum())
        per[name] = {
            "accuracy": float(np.trace(counts) / n) if n else None,
            "stated": n,
            "chance": 1 / len(classes),
            "labels": list(classes),
            "confusion": counts.tolist(),
        }
    known = [per[k]["accuracy"] for k in APPEARANCE if per[k]["accuracy"] is not None]
    return {"labels": per, "attribute_accuracy": float(np.mean(known)) if known else None}


def check_size(num_real: int, num_fake: int, min_videos: int, allow_few: bool, what: str) -> bool:
    """True if below `min_videos` (allowed, warned about); raises when not allowed."""
    few = min(num_real, num_fake) < min_videos
    if few and not allow_few:
        raise ValueError(
            f"{what} on {num_real} real and {num_fake} generated videos: needs eval.domain_min_videos={min_videos} "
            "of each (the evaluator's 256-d features need N > 256 for a non-singular covariance); set "
            "eval.allow_few_videos=true to compute it anyway (recorded as below_min_videos)"
        )
    if few:
        log.warning("%s on %d real / %d generated videos, below %d", what, num_real, num_fake, min_videos)
    return few


def feature_frechet(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    ev: DomainEvaluator,
    num_real: int,
    num_fake: int,
    frames: int,
    height: int,
    width: int,
    fps: float | None,
    min_videos: int,
    allow_few: bool,
    what: str = "domain FVD",
) -> FVDResult:
    """Frechet distance of `(N, D)` feature samples (biased covariance), the I3D FVD's own functions and record;
    `num_real` / `num_fake` count videos (a domain FID has several frame samples per video)."""
    few = check_size(num_real, num_fake, min_videos, allow_few, what)
    score = metrics.frechet_distance(*metrics.gaussian_stats(real), *metrics.gaussian_stats(fake))
    name = f"domain evaluator {Path(ev.path).name}/{MODEL_FILE}"
    return FVDResult(
        score,
        num_real,
        num_fake,
        frames,
        height,
        width,
        fps,
        name,
        ev.sha256,
        min_videos=min_videos,
        below_min_videos=few,
    )


def domain_report(
    ev: DomainEvaluator,
    videos: torch.Tensor,
    prompts: list[str],
    reference: str | None,
    fps: float,
    max_reference: int = 2048,
    real_fps: float | None = None,
    real_stride: int | None = None,
    real_seed: int = 0,
    min_videos: int = 512,
    allow_few: bool = False,
) -> dict:
    """Accuracy of generated `videos` (N, F, 3, H, W) in [0, 1] against their `prompts`, and (with a
    `reference` set) domain FVD / FID against as many real windows of F frames at H x W, taken at `real_fps`
    (None: `fps`, the generated rate) or every `real_stride`-th frame. Both sides are uint8 pixels."""
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts for {len(videos)} videos")
    n, f, _, h, w = videos.shape
    fake = (videos.clamp(0, 1) * 255).round().to(torch.uint8)  # as the real clips: uint8 frames
    out = evaluator_outputs(ev, fake)
    grammar = prompt_grammar(ev.vocabulary)
    stated = [parse_prompt(p, ev.vocabulary, grammar) for p in prompts]
    if not any(v is not None for labels in stated for v in labels.values()):
        log.warning("domain evaluator: no prompt states a label of its world (%s ...)", prompts[0])
    report: dict = {
        "evaluator": ev.path,
        "sha256": ev.sha256,
        "protocol": ev.card.get("protocol"),
        **accuracy_scores(out, stated, ev.vocabulary),
        "fvd": None,
        "fid": None,
    }
    if reference is None:
        return report
    if not allow_few:  # before decoding a real set for nothing
        check_size(max_reference, n, min_videos, allow_few, "domain FVD")
    window_fps = None if real_stride is not None else (real_fps or fps)
    real, protocol = real_clips(
        reference, max_reference, f, h, w, fps=window_fps, stride=real_stride, seed=real_seed
    )
    real_out = evaluator_outputs(ev, real)
    common = dict(ev=ev, num_real=len(real), num_fake=n, frames=f, height=h, width=w, fps=fps)
    limits = dict(min_videos=min_videos, allow_few=allow_few)
    fvd = feature_frechet(real_out[VIDEO_FEATURES], out[VIDEO_FEATURES], **common, **limits)
    # FID on frames: every evaluated frame of every video is one sample of the frame features.
    fid = feature_frechet(
        real_out[FRAME_FEATURES].flatten(0, 1),
        out[FRAME_FEATURES].flatten(0, 1),
        **common,
        **limits,
        what="domain FID",
    )
    frames_per_video = out[FRAME_FEATURES].shape[1]
    report["fvd"] = {**fvd.to_dict(), "features": f"{VIDEO_FEATURES} ({out[VIDEO_FEATURES].shape[1]}-d)"}
    report["fid"] = {
        "fid": fid.fvd,  # FVDResult's record; its score is a frame FID here
        **{k: v for k, v in fid.to_dict().items() if k != "fvd"},
        "features": f"{FRAME_FEATURES} ({out[FRAME_FEATURES].shape[2]}-d), {frames_per_video} frames per video",
        "samples_real": len(real) * frames_per_video,
        "samples_fake": n * frames_per_video,
    }
    report["real"] = protocol.to_dict()
    return report
