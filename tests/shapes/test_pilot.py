"""shapes.pilot refuses a world that has not been built up to its stills, before it copies or trains anything."""

from __future__ import annotations

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
    assert "latents/videos" in err and "pilots/b/base" in err and "evaluator" not in err.split("has no")[1]
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
