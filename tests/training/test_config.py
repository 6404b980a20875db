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
    with pytest.raises(ValueError, match=r"'noise.alpha': -1.0 \(must be >= 0\)"):
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


def test_image_training_and_edm_kinds_need_a_trainable_base():
    """Images through a frozen base train nothing, and EDM's c_noise = ln(sigma)/4 is outside a frozen SD
    timestep embedding: both are refused, naming the fields."""
    from training.config import TrainConfig

    def load(*overrides):
        return load_config(TrainConfig, None, list(overrides))

    assert load().edm.kind == "sd21"
    with pytest.raises(ValueError, match=r"data.images_per_clip=2 trains nothing.*model.trainable_spatial"):
        load("data.images_per_clip=2", "data.image_path=imgs")
    with pytest.raises(ValueError, match="data.image_only=true trains nothing"):
        load("data.image_only=true", "model.num_frames=1", "harivo.mapping_network=false")
    with pytest.raises(ValueError, match="needs data.image_path"):
        load("data.images_per_clip=2", "model.trainable_spatial=['*']")
    with pytest.raises(ValueError, match="needs model.num_frames=1"):
        load("data.image_only=true", "model.trainable_spatial=['*']", "harivo.mapping_network=false")
    with pytest.raises(ValueError, match="edm.kind=edm feeds c_noise"):
        load("diffusion.objective=edm", "edm.kind=edm")
    with pytest.raises(ValueError, match="edm.kind=modified feeds c_noise"):
        load("diffusion.objective=edm", "edm.kind=modified")
    with pytest.raises(ValueError, match=r"model.from_scratch=true needs model.trainable_spatial=\['\*'\]"):
        load("model.from_scratch=true", "model.trainable_spatial=['*attentions*']")
    with pytest.raises(ValueError, match="optim.spatial_lr=1e-05 needs model.trainable_spatial"):
        load("optim.spatial_lr=1e-5")
    ok = load(
        "diffusion.objective=edm", "edm.kind=edm", "model.trainable_spatial=['*']", "optim.spatial_lr=1e-5"
    )
    assert ok.edm.kind == "edm" and ok.optim.spatial_lr == 1e-5
    image_base = load(
        "data.image_only=true",
        "model.num_frames=1",
        "harivo.mapping_network=false",
        "model.from_scratch=true",
        "model.trainable_spatial=['*']",
    )
    assert image_base.data.image_only


def test_spatial_layers_get_their_own_learning_rate(tiny_zoo):
    from fixtures.checkpoints import tiny_train_config
    from training.distributed.engine import param_groups
    from training.model.unet import VideoUNet

    cfg = tiny_train_config(
        tiny_zoo.sd, **{"model.trainable_spatial": ["*attentions*"], "optim.spatial_lr": 2e-5}
    )
    model = VideoUNet.from_pretrained(cfg.model, cfg.harivo)
    added, base = param_groups(model, cfg.optim)
    assert (added["lr"], base["lr"]) == (cfg.optim.lr, 2e-5)
    assert {id(p) for p in base["params"]} == {
        id(p) for n, p in model.unet.named_parameters() if n in model.spatial_names
    }
    frozen = VideoUNet.from_pretrained(tiny_train_config(tiny_zoo.sd).model)
    assert len(param_groups(frozen, cfg.optim)) == 1  # a frozen base: one group
