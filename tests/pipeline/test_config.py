"""Pipeline config: presets load, bad values fail with a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from pipeline.configlib import ConfigError, load_config
from pipeline.run import config_hash, main

CONFIGS = Path(__file__).resolve().parents[2] / "pipeline" / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load(preset):
    cfg = load_config(PipelineConfig, CONFIGS / preset)
    assert cfg.primary_view in cfg.views


def test_production_preset_uses_real_models():
    cfg = load_config(PipelineConfig, CONFIGS / "webvid_sd15.yaml")
    assert (cfg.clip.model, cfg.clip.pretrained) == ("ViT-L-14", "openai")
    assert cfg.views["main"].num_frames == 24 and cfg.views["main"].fps == 6.0


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("views.main.height=30", r"multiple.* of 8"),
        ("decode.clip_per_video=2", r"unknown config key 'decode\.clip_per_video'"),
        ("decode.start=middle", r"'decode\.start'.*'center', 'uniform', 'random'"),
        ("encode.latent_dist=mode", r"'encode\.latent_dist'"),
        ("decode.clips_per_video=0", r"'decode\.clips_per_video': 0 \(must be >= 1\)"),
        ("motion.size=0", r"'motion\.size': 0 \(must be >= 1\)"),
        ("encode.frames_per_batch=0", r"'encode\.frames_per_batch'"),
        ("metadata.max_duration_s=nan", r"'metadata\.max_duration_s': nan \(must be finite, > 0\)"),
        ("metadata.min_side=5000", r"min_side \(5000\) <= max_side"),
        ("clip.min_score=high", r"invalid value for config field 'clip\.min_score'"),
    ],
)
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PipelineConfig, CONFIGS / "demo.yaml", [override])


def test_cli_reports_config_errors(capsys, tmp_path):
    assert (
        main(
            [
                "--config",
                str(CONFIGS / "demo.yaml"),
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path),
                "motion.min_scor=1",
            ]
        )
        == 2
    )
    assert "unknown config key 'motion.min_scor'" in capsys.readouterr().err
    assert main(["--config", str(CONFIGS / "demo.yaml")]) == 2
    assert "--input and --output are required" in capsys.readouterr().err


def test_config_hash_ignores_speed_knobs_only():
    base = load_config(PipelineConfig, CONFIGS / "demo.yaml")
    faster = load_config(
        PipelineConfig, CONFIGS / "demo.yaml", ["decode.concurrency=4", "score.batch_size=64"]
    )
    other = load_config(PipelineConfig, CONFIGS / "demo.yaml", ["clip.min_score=0.3"])
    assert config_hash(base) == config_hash(faster) != config_hash(other)


def test_a_missing_local_model_fails_naming_the_field_before_any_ray_work(capsys, tmp_path, demo_shards):
    from pipeline.run import main

    args = [
        "--config",
        str(CONFIGS / "demo.yaml"),
        "--input",
        str(demo_shards),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*args, f"encode.model={tmp_path / 'no-such-sd'}"]) == 2
    err = capsys.readouterr().err
    assert "encode.model=" in err and "no-such-sd" in err and "python -m pipeline.zoo" in err
    assert not (tmp_path / "o").exists()  # nothing written, no zoo built on the way
