"""The one config path: defaults <- YAML preset <- dotted overrides, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.config import ConfigError, flatten, load_config, to_yaml


@dataclass
class NoiseConfig:
    prior: Literal["iid", "mixed", "progressive"] = "iid"
    """Noise prior."""
    alpha: float = 0.0
    """Correlation strength."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""


@dataclass
class DemoConfig:
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    name: str = "run"
    """Run name."""
    steps: int = 10
    """Steps."""

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be > 0, got {self.steps}")


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("noise:\n  prior: mixed\n  alpha: 1.0\nsteps: 5\n")
    return path


def test_defaults_preset_and_overrides_merge_in_order(preset):
    cfg = load_config(DemoConfig, preset, ["noise.alpha=2.5", "optim.lr=3e-4"])
    assert isinstance(cfg, DemoConfig) and isinstance(cfg.noise, NoiseConfig)
    assert cfg.noise.prior == "mixed"  # from the preset
    assert cfg.noise.alpha == 2.5  # override beats preset
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" parsed as a float
    assert cfg.steps == 5 and cfg.name == "run"  # preset / default


def test_mapping_overrides_keep_python_types(preset):
    # A Ray Tune trial passes {dotted key: value}; lists and floats survive the trip.
    cfg = load_config(DemoConfig, preset, {"noise.alpha": 0.75, "optim.betas": [0.8, 0.95], "name": "a b"})
    assert cfg.noise.alpha == 0.75 and cfg.optim.betas == [0.8, 0.95] and cfg.name == "a b"


def test_unknown_key_names_the_key(preset, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'noise\.alpah'.*Did you mean"):
        load_config(DemoConfig, preset, ["noise.alpah=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr' in config file .*bad\.yaml"):
        load_config(DemoConfig, bad)


def test_invalid_value_names_field_and_allowed_values():
    with pytest.raises(
        ConfigError, match=r"'noise\.prior'.*expected one of \['iid', 'mixed', 'progressive'\]"
    ):
        load_config(DemoConfig, None, ["noise.prior=gaussian"])
    with pytest.raises(ConfigError, match=r"invalid value for config field 'steps'"):
        load_config(DemoConfig, None, ["steps=many"])


def test_validate_hook_and_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="steps must be > 0"):
        load_config(DemoConfig, None, ["steps=0"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(DemoConfig, None, ["steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(DemoConfig, tmp_path / "missing.yaml")


def test_resolved_yaml_round_trips(preset, tmp_path):
    cfg = load_config(DemoConfig, preset, ["optim.lr=0.01"])
    out = tmp_path / "resolved.yaml"
    out.write_text(to_yaml(cfg))
    assert load_config(DemoConfig, out) == cfg
    assert flatten(cfg)["optim.lr"] == 0.01 and flatten(cfg)["noise.prior"] == "mixed"
