"""Search spaces and sweep configs are checked before any trial starts, naming the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.configlib import ConfigError, load_config
from training.config import TrainConfig
from training.sampling.config import SampleConfig
from tuning.config import SweepConfig
from tuning.objectives import trial_config
from tuning.run import concurrency, main, trial_resources
from tuning.space import SpaceError, check_space, flatten_space, grid_size, to_tune

CONFIGS = Path(__file__).resolve().parents[2] / "tuning" / "configs"
DEMO_TRAIN = Path(__file__).resolve().parents[2] / "training" / "configs" / "demo.yaml"


@pytest.mark.parametrize(
    "space, key, words",
    [
        ({"noise.alpah": {"uniform": [0.0, 1.0]}}, "noise.alpah", "unknown config key"),
        ({"lossx.lambda_trs": {"choice": [0.1]}}, "lossx.lambda_trs", "unknown config key"),
        ({"noise.alpha": {"uniform": [1.0, 1.0]}}, "noise.alpha", "empty range"),
        ({"optim.max_steps": {"randint": [5, 5]}}, "optim.max_steps", "empty range"),
        ({"noise.prior": {"choice": []}}, "noise.prior", "non-empty list"),
        ({"optim.lr": {"loguniform": [0.0, 1e-3]}}, "optim.lr", "lo > 0"),
        ({"optim.lr": {"uniform": ["a", 1.0]}}, "optim.lr", "not a number"),
        ({"noise.prior": {"choice": ["iid", "gaussian"]}}, "noise.prior", "invalid value"),
        ({"noise.alpha": {"grid": ["high"]}}, "noise.alpha", "invalid value"),
        ({"optim.max_steps": {"grid": [1.5]}}, "optim.max_steps", "invalid value"),
        ({"loss.lambda_trs": {"uniform": [-1.0, 1.0]}}, "loss.lambda_trs", "must be >= 0"),
        ({"noise.alpha": {"normal": [0.0, 1.0]}}, "noise.alpha", "expected one of"),
        ({"noise.alpha": 1.0}, "noise.alpha", "expected one of"),
    ],
)
def test_bad_space_names_the_key(space, key, words):
    with pytest.raises(SpaceError) as info:
        check_space(space, TrainConfig, str(DEMO_TRAIN))
    assert f"'{key}'" in str(info.value) and words in str(info.value)


def test_sampling_space_checks_cross_field_ranges():
    with pytest.raises(SpaceError, match=r"'jvid\.t_v'.*jvid\.t_e"):
        check_space({"jvid.t_v": {"uniform": [0.0, 0.9]}}, SampleConfig, None, {"jvid.t_e": 0.6})


def test_nested_and_dotted_spaces_agree():
    nested = {"noise": {"alpha": {"grid": [0.0, 1.0]}}, "optim.lr": {"loguniform": [1e-5, 1e-3]}}
    flat = flatten_space(nested)
    assert flat == {"noise.alpha": {"grid": [0.0, 1.0]}, "optim.lr": {"loguniform": [1e-5, 1e-3]}}
    assert check_space(nested, TrainConfig) == flat
    assert grid_size(flat, "random") == 2


def test_algorithm_constraints_name_the_key():
    flat = {"noise.alpha": {"uniform": [0.0, 1.0]}, "noise.prior": {"grid": ["mixed", "progressive"]}}
    with pytest.raises(SpaceError, match="'noise.alpha'"):
        to_tune(flat, "grid")
    with pytest.raises(SpaceError, match="'noise.prior'"):
        to_tune(flat, "optuna")
    space = to_tune({"noise.prior": {"choice": ["mixed", "progressive"]}}, "grid")
    assert space["noise.prior"] == {"grid_search": ["mixed", "progressive"]}


def test_trial_config_is_the_config_path():
    base = load_config(TrainConfig, DEMO_TRAIN)
    from pipeline.configlib import to_dict

    cfg = trial_config(TrainConfig, to_dict(base), {"noise.alpha": 0.0, "loss.lambda_dc": 0.3})
    assert cfg.noise.alpha == 0.0 and cfg.loss.lambda_dc == 0.3 and cfg.model.num_frames == 8
    with pytest.raises(ConfigError, match="nosuch.alpha"):
        trial_config(TrainConfig, to_dict(base), {"nosuch.alpha": 1.0})


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["metric=clipsim"], "metric='clipsim'"),
        (["metric=motion_accuracy"], "need evaluation.prompts"),
        (["metric=motion_accuracy", "evaluation.prompts=p.txt"], "scheduler.kind=fifo"),  # demo: asha
        (["kind=sampling", "metric=clipsim", "scheduler.kind=asha"], "asha"),
        (["search.num_samples=0"], "search.num_samples"),
        (["resources.cpu=0"], "resources.cpu=0"),
        (["search.algorithm=bayes"], "search.algorithm"),
    ],
)
def test_bad_sweep_config(overrides, words):
    with pytest.raises((ConfigError, ValueError), match=words):
        load_config(SweepConfig, CONFIGS / "demo_train.yaml", overrides)


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load_and_their_spaces_check(preset, tiny_zoo, monkeypatch):
    monkeypatch.setenv("T2V_TINY_ZOO", str(tiny_zoo.root))
    sweep = load_config(SweepConfig, CONFIGS / preset)
    from pipeline.configlib import flatten
    from tuning.run import target_schema

    base = str(Path(__file__).resolve().parents[2] / sweep.base) if sweep.base else None
    flat = check_space(
        sweep.space, target_schema(sweep), base, {**flatten(sweep.fixed), **flatten(sweep.budget)}
    )
    to_tune(flat, sweep.search.algorithm)


def test_cli_rejects_bad_space_before_any_trial(tmp_path, capsys):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--config",
                str(CONFIGS / "demo_train.yaml"),
                "--data",
                str(tmp_path),
                "--output",
                str(out),
                "space.loss.lambda_tsr={uniform: [0, 1]}",
            ]
        )
    assert "loss.lambda_tsr" in str(info.value)
    assert not (out / "tune").exists()  # nothing ran


def test_cli_needs_data_for_training_sweeps(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        main(["--config", str(CONFIGS / "demo_train.yaml"), "--output", str(tmp_path / "s")])


def test_concurrency_from_cluster_resources():
    sweep = load_config(SweepConfig, CONFIGS / "demo_train.yaml")
    tree = {"run": {"num_workers": 4, "cpus_per_worker": 1.0, "use_gpu": True, "resources_per_worker": {}}}
    own, whole = trial_resources(sweep, tree)
    assert own == {"CPU": 0.01}  # the trial only drives its Ray Train run
    assert whole["GPU"] == 4 and whole["CPU"] == pytest.approx(5.01)
    assert concurrency(sweep, whole, {"CPU": 64, "GPU": 8}) == 2
    with pytest.raises(ValueError, match="GPU"):
        concurrency(sweep, whole, {"CPU": 64})
    sampling = load_config(SweepConfig, CONFIGS / "demo_sampling.yaml", ["resources.gpu=0.25"])
    own, whole = trial_resources(sampling, tree)
    assert own == {"CPU": 1.0, "GPU": 0.25}
    assert concurrency(sampling, whole, {"CPU": 16, "GPU": 2}) == 8
