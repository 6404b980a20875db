"""shapes.pilot refuses a world that has not been built up to its stills, before it copies or trains anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from shapes.pilot import main


def test_a_world_without_base_or_stills_is_refused(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--world", str(tmp_path), "--name", "v"])
    assert exit_.value.code == 2
    assert "has no latents/stills: build it first" in capsys.readouterr().err
    assert not (tmp_path / "pilots").exists()


def test_a_video_pilot_needs_the_evaluator_videos_and_a_finished_base_pilot(tmp_path, capsys):
    for d in ("base", "latents/stills", "evaluator"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main(["--world", str(tmp_path), "--name", "x", "--video", "b"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    missing = err.split("has no")[1].split(":")[0]
    assert "latents/videos" in missing and "pilots/b/base" in missing and "evaluator" not in missing
    assert "--until evaluator" in err
    assert not (tmp_path / "pilots" / "x").exists()


def test_continuing_needs_a_finished_pilot(tmp_path, capsys):
    for d in ("base", "latents/stills", "pilots/a/base"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main(["--world", str(tmp_path), "--name", "b", "--from", "a"])
    assert exit_.value.code == 2
    assert "pilots/a is not a finished pilot" in capsys.readouterr().err
    assert not (tmp_path / "pilots" / "b").exists()


def test_a_base_pilot_refuses_a_training_config(tmp_path, capsys):
    for d in ("base", "latents/stills"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main(
            ["--world", str(tmp_path), "--name", "b", "--config", "training/configs/shapes_video_motion.yaml"]
        )
    assert exit_.value.code == 2
    assert "--config is for video pilots" in capsys.readouterr().err
    assert not (tmp_path / "pilots").exists()


def test_a_video_pilot_scores_the_model_and_its_baseline_on_the_same_seeds(tmp_path, monkeypatch):
    """`--seeds S`: both `training.evaluate` runs draw S videos per prompt; the baseline is kept per seed count."""
    import json
    import sys

    import shapes.build
    import shapes.pilot
    import shapes.pixels

    for d in ("evaluator", "latents/videos", "pilots/b/base/vae"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "pilots/b/base/vae/config.json").write_text(json.dumps({"block_out_channels": [16, 32, 64]}))
    (tmp_path / "evaluator/evaluator.json").write_text(json.dumps({"sha256": "0123456789abcdef"}))
    calls = []

    def run(cmd):  # stands in for the two commands: writes what each leaves behind
        assert cmd[:2] == [sys.executable, "-m"]
        out = Path(cmd[cmd.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        calls.append((cmd[2], out, cmd))
        if cmd[2] == "training.run":
            (out / "result.json").write_text(json.dumps({"metrics": {"loss": 0.1}}))
        else:
            (out / "report.json").write_text(json.dumps({"metrics": {"motion_accuracy": 0.5}}))
        return 0

    monkeypatch.setattr(shapes.pilot.subprocess, "call", run)
    monkeypatch.setattr(shapes.build, "real_set", lambda d, n: d)
    # the pixel judge reads each evaluation's own mp4s (tests/shapes/test_pixels.py)
    monkeypatch.setattr(
        shapes.pixels, "judge_dir", lambda d: {"pixel_motion_accuracy": len(Path(d).name) / 100}
    )
    record = main(["--world", str(tmp_path), "--name", "x", "--video", "b", "--prompts", "4", "--seeds", "2"])
    evaluations = [(out, cmd) for kind, out, cmd in calls if kind == "training.evaluate"]
    assert [out.name for out, _ in evaluations] == [
        "eval",
        "frames_4_15_x2_ev01234567",
    ]  # per seeds and judge
    assert all("output.videos_per_prompt=2" in cmd for _, cmd in evaluations)
    assert "--baseline" in evaluations[1][1] and "--baseline" not in evaluations[0][1]
    assert record["seeds"] == 2 and record["video"] == {"motion_accuracy": 0.5, "pixel_motion_accuracy": 0.04}
    assert record["frame_baseline"]["pixel_motion_accuracy"] == 0.25  # its own dir's
    again = main(["--world", str(tmp_path), "--name", "y", "--video", "b", "--prompts", "4", "--seeds", "2"])
    assert again["frame_baseline"]["pixel_motion_accuracy"] == 0.25  # the cached baseline judged again
    assert "model.latent_size=16" in calls[0][2]  # 64 px through the 4x VAE


@pytest.mark.parametrize("flag", ["--prompts", "--seeds"])
def test_a_video_pilot_refuses_no_prompts_or_seeds(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["--world", str(tmp_path), "--name", "x", "--video", "b", flag, "0"])
    assert exit_.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "pilots").exists()
