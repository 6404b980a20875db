"""`make shapes`' bookkeeping: stages run in order, a finished stage is skipped, a failed one resumes; the
evaluation prompts are held-out combinations; the training runs are sized from the base's VAE (8x or 4x)."""

import itertools
import json
from pathlib import Path

import pytest

from shapes import build as B
from shapes.heldout import eval_prompts
from shapes.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Scene, held_out


def test_eval_prompts_are_distinct_held_out_captions():
    prompts = eval_prompts(100)
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
    assert ran == ["video", "harivo", "eval"]  # resumed where it failed
    ran.clear()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stale").write_text("from the last run")
    B.build(tmp_path, "small", redo=("base",), until="base")
    assert ran == ["base"] and not (tmp_path / "base").exists()  # redone from nothing
    record = json.loads((tmp_path / "build.json").read_text())
    assert list(record["stages"]) == list(B.STAGES[: B.STAGES.index("base") + 1])  # what follows it is undone
    with pytest.raises(SystemExit, match="preset small"):
        B.build(tmp_path, "full")  # one directory, one preset


def test_training_runs_take_the_latent_size_from_the_bases_vae(tmp_path, monkeypatch):
    base, run_dir = tmp_path / "base", tmp_path / "run"
    (base / "vae").mkdir(parents=True)
    (base / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [16, 32, 64]}))  # 4x
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"metrics": {"loss": 0.1}}))
    calls: list[list[str]] = []
    monkeypatch.setattr(B, "_run", lambda args, env: calls.append(args))
    B._train("shapes_video.yaml", tmp_path / "data", run_dir, base, 5, {})
    assert "model.latent_size=16" in calls[0]  # 64 px through a 4x VAE, whatever the YAML says


def test_the_vae_downsampling_is_kept_per_world(tmp_path, monkeypatch):
    seen: list[int] = []

    def base_stage(out, p, env):
        seen.append(p.vae_down)
        return {}

    monkeypatch.setattr(B, "RUNNERS", {s: (lambda out, p, env: {}) for s in B.STAGES} | {"base": base_stage})
    record = B.build(tmp_path, "small", until="base", vae_down=4)
    assert seen == [4] and record["settings"]["vae_down"] == 4
    B.build(tmp_path, "small", until="stills")  # resumed without the flag: the world's own 4
    assert json.loads((tmp_path / "build.json").read_text())["settings"]["vae_down"] == 4
    with pytest.raises(SystemExit, match="--vae-down 4, not 8"):
        B.build(tmp_path, "small", vae_down=8)  # its base and what follows were made with a 4x VAE
    B.build(tmp_path, "small", redo=("base",), until="base", vae_down=8)
    assert seen == [4, 8]


def test_the_evaluator_trains_through_the_bases_vae_after_the_base_and_is_redone_alone(tmp_path, monkeypatch):
    from shapes import evaluator

    assert B.STAGES.index("base") < B.STAGES.index("evaluator") < B.STAGES.index("eval")
    assert B.STAGES.index("evaluator") > B.STAGES.index(
        "base_train"
    )  # --redo evaluator keeps the base's training
    with pytest.raises(SystemExit, match="base has none"):
        B.stage_evaluator(tmp_path, B.PRESETS["small"], {})
    (tmp_path / "base" / "vae").mkdir(parents=True)
    seen = {}
    monkeypatch.setattr(evaluator, "vae_round_trip", lambda d: ("codec of", d))
    monkeypatch.setattr(evaluator, "save", lambda model, out, record: seen.update(out=out))

    def train(clips, steps, codec):
        seen.update(clips=clips, codec=codec)
        return None, dict(heldout_accuracy={}, heldout_accuracy_decoded={}, seconds=1.0, codec_s=0.5)

    monkeypatch.setattr(evaluator, "train", train)
    result = B.stage_evaluator(tmp_path, B.PRESETS["small"], {})
    assert seen == dict(clips=2000, codec=("codec of", tmp_path / "base" / "vae"), out=tmp_path / "evaluator")
    assert set(result) == {"heldout_accuracy", "heldout_accuracy_decoded", "seconds", "codec_s"}


def test_the_eval_scores_both_video_models_and_the_baseline_alike_and_judges_the_worlds(
    tmp_path, monkeypatch
):
    import shapes.pixels
    import shapes.strip

    calls: list[list[str]] = []
    motion = {"video": 0.75, "harivo": 0.1, "frames": 0.2}

    def run(args, env):
        calls.append(args)
        out = Path(args[args.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)  # as training.evaluate
        m = dict(motion_accuracy=motion[out.name], colour_accuracy=0.9, shape_accuracy=0.9)
        (out / "report.json").write_text(
            json.dumps({"metrics": m | {"domain_fvd": 100.0 * (out.name != "video")}})
        )

    monkeypatch.setattr(B, "_run", run)
    monkeypatch.setattr(shapes.strip, "write_strip", lambda *a: None)
    monkeypatch.setattr(B, "sample_overrides", lambda *a: ["sampler.steps=3"])
    monkeypatch.setattr(B, "real_set", lambda d, n: d)  # (writes 512 real videos otherwise)
    pixel = {"video": 0.8, "harivo": 0.1, "frames": 0.1}  # the pixel judge's reading of each dir's mp4s
    monkeypatch.setattr(
        shapes.pixels,
        "judge_dir",
        lambda d: {
            f"pixel_{k}_accuracy": pixel[d.name] if k == "motion" else 0.9
            for k in ("motion", "colour", "shape")
        },
    )
    report = B.stage_eval(tmp_path, B.PRESETS["small"], {})
    checkpoint = {
        Path(c[c.index("--output") + 1]).name: Path(c[c.index("--checkpoint") + 1]).name for c in calls
    }
    assert checkpoint == {
        "video": "video",
        "harivo": "harivo",
        "frames": "video",
    }  # the baseline: the same base
    assert all(c[-1] == "sampler.steps=3" for c in calls)  # one sampler for all three
    assert ["--baseline" in c for c in calls] == [False, False, True]
    assert report["harivo"]["motion_accuracy"] == 0.1 and all(report["targets"].values())  # judged on video/
    assert report["frame_baseline"]["pixel_motion_accuracy"] == 0.1
    assert len(report["targets"]) == 7  # three by each judge, and the FVD's
    (tmp_path / "eval" / "harivo" / "report.json").unlink()  # as if killed while it evaluated harivo/
    calls.clear()
    assert B.stage_eval(tmp_path, B.PRESETS["small"], {}) == report  # resumed: video/ and frames/ kept
    assert [Path(c[c.index("--output") + 1]).name for c in calls] == ["harivo"]
    motion["video"] = 0.65
    targets = B.stage_eval(tmp_path / "again", B.PRESETS["small"], {})["targets"]
    assert (
        not targets["evaluator: motion_accuracy >= 0.70"] and targets["pixel judge: motion_accuracy >= 0.70"]
    )
    pixel["video"] = 0.6
    targets = B.stage_eval(tmp_path / "again2", B.PRESETS["small"], {})["targets"]
    assert not targets["pixel judge: motion_accuracy >= 0.70"]
