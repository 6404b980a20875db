"""The one config path: defaults <- YAML preset <- dotted overrides, with errors that name the key."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.configlib import ConfigError, TextFileError, flatten, load_config, read_lines, to_yaml


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


def test_a_users_text_file_names_the_file_and_line_of_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a dog runs\n\n   \n# a note\na cat \xff jumps\nthe kite flies\n")
    with pytest.raises(TextFileError, match=r"prompts.txt, line 5: not UTF-8 text .*xff"):
        read_lines(path, "prompts")
    # Blank and whitespace-only lines (tabs, a CRLF file's \r) and comments are skipped; a BOM is dropped.
    path.write_bytes(codecs.BOM_UTF8 + b"  a dog runs\r\n\r\n \t \r\n# note\r\nthe kite flies\r\n")
    assert read_lines(path, "prompts") == ["a dog runs", "the kite flies"]
    path.write_text("\n   \n\t\n# only a comment\n")
    with pytest.raises(TextFileError, match=r"prompts.txt: no prompts in it"):
        read_lines(path, "prompts")
    with pytest.raises(TextFileError, match=r"cannot read .*missing.txt"):
        read_lines(tmp_path / "missing.txt")


def test_a_preset_with_bad_bytes_or_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"noise:\n  prior: mixed\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"sweep.yaml, line 3: not UTF-8 text"):
        load_config(DemoConfig, path)
    path.write_text("noise:\n  prior: mixed\nname: : x\n")
    with pytest.raises(ConfigError, match=r"config file .*sweep.yaml, line 3: not valid YAML"):
        load_config(DemoConfig, path)


def test_resolved_yaml_round_trips(preset, tmp_path):
    cfg = load_config(DemoConfig, preset, ["optim.lr=0.01"])
    out = tmp_path / "resolved.yaml"
    out.write_text(to_yaml(cfg))
    assert load_config(DemoConfig, out) == cfg
    assert flatten(cfg)["optim.lr"] == 0.01 and flatten(cfg)["noise.prior"] == "mixed"


def test_presets_stack_in_order_and_extend_relative_to_their_file(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "root.yaml").write_text("noise: {prior: mixed, alpha: 1.0}\nname: root\n")
    (tmp_path / "base" / "mid.yaml").write_text("extends: root.yaml\nnoise: {alpha: 2.0}\nsteps: 3\n")
    (tmp_path / "top.yaml").write_text("extends: [base/mid.yaml]\nname: top\n")
    (tmp_path / "last.yaml").write_text("steps: 7\n")
    cfg = load_config(DemoConfig, tmp_path / "top.yaml")
    # root <- mid <- top: each later layer wins only on the keys it sets
    assert (cfg.noise.prior, cfg.noise.alpha, cfg.steps, cfg.name) == ("mixed", 2.0, 3, "top")
    stacked = load_config(DemoConfig, [tmp_path / "top.yaml", tmp_path / "last.yaml"], ["name=cli"])
    assert (stacked.noise.alpha, stacked.steps, stacked.name) == (2.0, 7, "cli")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(DemoConfig, tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*extended by"):
        load_config(DemoConfig, tmp_path / "orphan.yaml")


def test_cli_takes_several_presets_then_overrides(tmp_path):
    import argparse

    from pipeline.configlib import add_config_args, config_args

    (tmp_path / "a.yaml").write_text("steps: 2\n")
    (tmp_path / "b.yaml").write_text("steps: 5\nname: b\n")
    p = argparse.ArgumentParser()
    add_config_args(p)
    args = p.parse_args(["--config", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "noise.alpha=0.5"])
    presets, overrides = config_args(args)
    assert presets == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")] and overrides == [
        "noise.alpha=0.5"
    ]
    cfg = load_config(DemoConfig, presets, overrides)
    assert (cfg.steps, cfg.name, cfg.noise.alpha) == (5, "b", 0.5)


def test_from_dict_applies_overrides_through_the_same_path():
    from pipeline.configlib import from_dict, to_dict

    tree = to_dict(load_config(DemoConfig))
    cfg = from_dict(DemoConfig, tree, {"noise.alpha": 1.5, "optim.betas": [0.5, 0.9]})
    assert (cfg.noise.alpha, cfg.optim.betas) == (1.5, [0.5, 0.9])
    with pytest.raises(ConfigError, match="noise.alpah"):
        from_dict(DemoConfig, tree, {"noise.alpah": 1.0})


def test_mapping_overrides_are_not_reparsed_as_yaml():
    """A Tune trial's {"name": "45386_00000"} (a trial id) must stay that string; as a YAML dotlist it would be
    read as the integer 4538600000 (underscores are digit separators in YAML 1.1)."""
    assert load_config(DemoConfig, None, {"name": "45386_00000"}).name == "45386_00000"
    assert (
        load_config(DemoConfig, None, ["name=45386_00000"]).name == "4538600000"
    )  # the CLI is YAML, as ever
    with pytest.raises(ConfigError, match="noise.alpah"):
        load_config(DemoConfig, None, {"noise.alpah": 1.0})


def test_to_json_is_strict_json():
    """No NaN / Infinity tokens (most JSON readers refuse them): inf is a string float() reads back, NaN null."""
    import json
    import math

    from pipeline.configlib import to_json

    text = to_json({"s_tmax": math.inf, "s_tmin": -math.inf, "score": math.nan, "xs": [1.5, (math.inf,)]})

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    back = json.loads(text, parse_constant=refuse)
    assert back == {"s_tmax": "inf", "s_tmin": "-inf", "score": None, "xs": [1.5, ["inf"]]}
    assert float(back["s_tmax"]) == math.inf
