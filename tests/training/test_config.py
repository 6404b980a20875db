"""TrainConfig through the shared config path: presets, overrides, named errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import training
from pipeline.configlib import ConfigError, load_config, to_yaml
from training.config import TrainConfig

CONFIGS = Path(training.__file__).parent / "configs"


def test_defaults_are_the_papers():
    cfg = load_config(TrainConfig)
    assert (cfg.loss.lambda_trs, cfg.loss.lambda_reg, cfg.loss.lambda_dc, cfg.loss.tau) == (
        0.1,
        0.1,
        0.1,
        0.1,
    )
    assert cfg.harivo.tokens_per_frame == 3 and cfg.model.num_frames == 24
    assert (cfg.harivo.mapping_heads, cfg.harivo.mapping_head_dim) == (8, 64)
    d = cfg.diffusion
    assert (d.beta_start, d.beta_end, d.beta_schedule, d.num_train_timesteps) == (
        0.00085,
        0.012,
        "linear",
        1000,
    )
    assert (cfg.edm.sigma_data, cfg.edm.p_mean, cfg.edm.p_std) == (0.5, -1.2, 1.2)


@pytest.mark.parametrize(
    "preset",
    sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sample_")),
    ids=lambda p: p.name,
)
def test_presets_load_and_round_trip(preset, tmp_path):  # sample_*.yaml are SampleConfig presets
    cfg = load_config(TrainConfig, preset, ["loss.lambda_trs=0.2"])
    assert cfg.loss.lambda_trs == 0.2
    (tmp_path / "resolved.yaml").write_text(to_yaml(cfg))
    assert load_config(TrainConfig, tmp_path / "resolved.yaml") == cfg


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match="noise.prior"):
        load_config(TrainConfig, None, ["noise.prior=pink"])
    with pytest.raises(ConfigError, match="loss.lambda_nope"):
        load_config(TrainConfig, None, ["loss.lambda_nope=1"])
    with pytest.raises(ValueError, match="model.num_frames=40"):
        load_config(TrainConfig, None, {"model.num_frames": 40})
    with pytest.raises(ValueError, match="noise.alpha=-1.0"):
        load_config(TrainConfig, None, {"noise.alpha": -1.0})
    with pytest.raises(ValueError, match="harivo.contrastive_head"):
        load_config(TrainConfig, None, ["harivo.contrastive_head=false"])
    assert load_config(TrainConfig, None, {"noise.alpha": float("inf")}).noise.alpha == float("inf")


def test_a_missing_local_base_fails_naming_the_field(tmp_path):
    from training.run import main

    with pytest.raises(SystemExit, match="model.pretrained=.*no-such-sd"):
        main(
            [
                "--data",
                str(tmp_path),
                "--output",
                str(tmp_path / "run"),
                f"model.pretrained={tmp_path / 'no-such-sd'}",
            ]
        )
    assert not (tmp_path / "run").exists()


def test_noise_alpha_defaults_per_prior_and_new_fields_are_checked():
    assert load_config(TrainConfig, None, ["noise.prior=mixed"]).noise.strength == 1.0  # PYoCo 5.3
    assert load_config(TrainConfig, None, ["noise.prior=progressive"]).noise.strength == 2.0
    assert load_config(TrainConfig, None, ["noise.prior=mixed", "noise.alpha=0.5"]).noise.strength == 0.5
    assert load_config(TrainConfig).loss.cond_drop_prob == 0.1
    with pytest.raises(ValueError, match="cond_drop_prob"):
        load_config(TrainConfig, None, ["loss.cond_drop_prob=1.5"])
    with pytest.raises(ValueError, match="uniform_t needs"):
        load_config(
            TrainConfig, None, ["diffusion.objective=edm", "edm.kind=edm", "edm.sigma_sampling=uniform_t"]
        )


def test_output_paths_are_taken_as_given(tmp_path):
    """--output runs/2024_01 must name the run '2024_01', not the YAML integer 202401."""
    import argparse

    from pipeline.configlib import add_config_args
    from training.run import resolve

    p = argparse.ArgumentParser()
    add_config_args(p)
    p.add_argument("--data")
    p.add_argument("--output")
    cfg = resolve(p.parse_args(["--data", str(tmp_path / "1_000"), "--output", str(tmp_path / "2024_01")]))
    assert cfg.run.name == "2024_01" and cfg.data.path == str(tmp_path / "1_000")
