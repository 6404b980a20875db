"""An eval dir's videos judged again by other evaluators, without sampling them again: each evaluator's accuracy
per label and its shape confusion (rows stated, columns called), all on the same mp4s (so both evaluators see the
same H.264 frames; `training.evaluate` judged the tensors before encoding).

    python docs/shapes/diag/rejudge.py EVAL_DIR EVALUATOR [EVALUATOR ...]
"""

import json
import sys
from pathlib import Path

import decord
import torch

from training.evaluation.domain import (
    accuracy_scores,
    evaluator_outputs,
    load_evaluator,
    parse_prompt,
    prompt_grammar,
)

eval_dir, judges = Path(sys.argv[1]), sys.argv[2:]
videos, prompts = [], []
for mp4 in sorted((eval_dir / "videos").glob("*.mp4")):
    r = decord.VideoReader(str(mp4))
    videos.append(torch.from_numpy(r.get_batch(list(range(len(r)))).asnumpy()).permute(0, 3, 1, 2))
    prompts.append(json.loads(mp4.with_suffix(".json").read_text())["prompt"])
videos = torch.stack(videos)  # (N, F, 3, H, W) uint8
for path in judges:
    ev = load_evaluator(path)
    grammar = prompt_grammar(ev.vocabulary)
    scores = accuracy_scores(
        evaluator_outputs(ev, videos),
        [parse_prompt(p, ev.vocabulary, grammar) for p in prompts],
        ev.vocabulary,
    )
    acc = {k: round(v["accuracy"], 4) for k, v in scores["labels"].items() if v["accuracy"] is not None}
    print(
        json.dumps(
            dict(
                eval=str(eval_dir),
                evaluator=path,
                n=len(videos),
                accuracy=acc,
                shape_confusion=scores["labels"]["shape"]["confusion"],
            )
        )
    )
