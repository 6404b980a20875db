"""`make shapes`' bookkeeping: stages run in order, a finished stage is skipped, a failed one resumes; the
evaluation prompts are held-out combinations."""

import itertools
import json

import pytest

from shapes import build as B
from shapes.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Scene, held_out


def test_eval_prompts_are_distinct_held_out_captions():
    prompts = B.eval_prompts(100)
    assert len(set(prompts)) == 100
    scenes = [
        Scene(shape, colour, bg, motion, end, False)
        for shape, colour, bg, motion, end in itertools.product(
            SHAPES, COLOURS, BACKGROUNDS, MOTIONS, COLOURS
        )
        if end != colour
    ]
    held = {s.caption for s in scenes if held_out(s)}
    assert set(prompts) <= held  # every prompt is of a combination no model of the world trained on
    assert not held & {s.caption for s in scenes if not held_out(s)}


def test_stages_resume_after_a_failure_and_skip_what_is_done(tmp_path, monkeypatch):
    ran: list[str] = []
    fail = {"video"}

    def fake(stage):
        def run(out, p, env):
            assert env["T2V_SHAPES"] == str(out)
            if stage in fail:
                raise RuntimeError(f"{stage} killed")
            ran.append(stage)
            return {"stage": stage}

        return run

    monkeypatch.setattr(B, "RUNNERS", {s: fake(s) for s in B.STAGES})
    with pytest.raises(RuntimeError, match="video killed"):
        B.build(tmp_path, "small")
    assert ran == list(B.STAGES[: B.STAGES.index("video")])
    record = json.loads((tmp_path / "build.json").read_text())
    assert list(record["stages"]) == ran  # written after each stage: the failed one is not recorded
    fail.clear()
    ran.clear()
    B.build(tmp_path, "small")
    assert ran == ["video", "eval"]  # resumed where it failed
    ran.clear()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stale").write_text("from the last run")
    B.build(tmp_path, "small", redo=("base",), until="base")
    assert ran == ["base"] and not (tmp_path / "base").exists()  # redone from nothing
    record = json.loads((tmp_path / "build.json").read_text())
    assert list(record["stages"]) == list(B.STAGES[: B.STAGES.index("base") + 1])  # what follows it is undone
    with pytest.raises(SystemExit, match="preset small"):
        B.build(tmp_path, "full")  # one directory, one preset
