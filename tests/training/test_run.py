"""A PYoCo cascade stage through the real runner: the cascade pipeline preset's paired views, then one short
Ray Train + DeepSpeed run of the super-resolution stage via `python -m training.run`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.configlib import load_config
from training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def _cfg(zoo, store, stage: str, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        CONFIGS / f"pyoco_{stage}_demo.yaml",
        [f"model.pretrained={zoo.sd}", f"data.path={store}", *overrides],
    )


@pytest.mark.slow
def test_cascade_store_pairs_the_sr_views(tiny_zoo, cascade_latents):
    import pyarrow.parquet as pq

    from pipeline import schema
    from training.distributed.data import LatentStoreError, inspect_store

    store, summary = cascade_latents
    assert (
        summary["clips_out"] >= 6
    )  # the good demo clips: enough for 2 workers x batch 2 after the val split
    info = inspect_store(_cfg(tiny_zoo, store, "sr"))
    assert (info.latents_column, info.cond_column) == ("latents_sr", "latents")
    assert info.latents_shape == [16, 4, 8, 8] and info.cond_shape == [16, 4, 4, 4]
    table = pq.read_table(next(Path(info.clips_path).glob("*.parquet")))
    assert table[schema.FRAME_INDICES].to_pylist() == table["frame_indices_sr"].to_pylist()
    # The base and interpolation stages read the 16-frame 32 px view.
    assert inspect_store(_cfg(tiny_zoo, store, "base")).latents_shape == [16, 4, 4, 4]
    assert inspect_store(_cfg(tiny_zoo, store, "interp")).cond_column is None
    with pytest.raises(LatentStoreError, match="cascade.cond_view='low' not in the views"):
        inspect_store(_cfg(tiny_zoo, store, "sr", "cascade.cond_view=low"))
    with pytest.raises(LatentStoreError, match="are not cascade.scale=4 x view 'main'"):
        inspect_store(_cfg(tiny_zoo, store, "sr", "cascade.scale=4"))


@pytest.mark.slow
def test_sr_stage_trains_through_training_run(ray_local, tiny_zoo, cascade_latents, tmp_path):
    from training.model.export import read_train_config
    from training.run import main

    store, _ = cascade_latents
    run_dir = tmp_path / "sr"
    main(
        [
            "--config",
            str(CONFIGS / "pyoco_sr_demo.yaml"),
            "--data",
            str(store),
            "--output",
            str(run_dir),
            f"model.pretrained={tiny_zoo.sd}",
            "optim.max_steps=2",
            "optim.warmup_steps=1",
            "run.checkpoint_every=2",
            "run.log_every=1",
            "run.val_every=0",
        ]
    )
    trainable = run_dir / "export" / "trainable.safetensors"
    with safe_open(str(trainable), framework="pt") as f:
        assert f.metadata()["t2v.kind"] == "pyoco_sr"
    weights = load_file(str(trainable))
    # The zero-initialised conditioning channels and level embedding were trained and exported.
    assert weights["cond_conv_in.weight"].abs().sum() > 0
    assert weights["level_embedding.embedding.linear_2.weight"].abs().sum() > 0
    assert not any(k.startswith("unet.") for k in weights)
    cfg, kind = read_train_config(trainable, ("pyoco_sr",))
    assert kind == "pyoco_sr" and cfg.cascade.stage == "sr" and cfg.cascade.cond_view == "main"
    assert torch.isfinite(weights["cond_conv_in.weight"]).all()
    assert any(run_dir.glob("checkpoint_*"))


def test_sd21_refuses_discrete_levels_other_than_the_bases(tiny_zoo):
    """EDM kind sd21 feeds the frozen base the nearest discrete timestep: on 'linear' betas SD (trained on
    'scaled_linear') would read sigma = 3 as another noise level."""
    from pipeline.configlib import ConfigError
    from training.run import check_discrete_levels

    pyoco = str(CONFIGS / "pyoco_base_demo.yaml")
    cfg = load_config(
        TrainConfig, pyoco, [f"model.pretrained={tiny_zoo.sd}", "diffusion.beta_schedule=linear"]
    )
    with pytest.raises(ConfigError, match=r"diffusion.beta_schedule='linear' \(the base: 'scaled_linear'\)"):
        check_discrete_levels(cfg)
    check_discrete_levels(load_config(TrainConfig, pyoco, [f"model.pretrained={tiny_zoo.sd}"]))  # matches
    for preset in ("pyoco_base.yaml", "pyoco_interp.yaml", "pyoco_sr.yaml", "pyoco_progressive.yaml"):
        assert load_config(TrainConfig, CONFIGS / preset).diffusion.beta_schedule == "scaled_linear", preset


def test_a_full_disk_ends_training_run_with_one_line(tmp_path, monkeypatch):
    """What `training.run` prints when a worker's checkpoint met a full disk (Ray Train re-raises the worker's
    `OutOfSpace` inside its own error); the end to end run is in `distributed/test_worker.py`."""
    import ray.train

    from pipeline.write import OutOfSpace
    from training import run as cli

    cut = "out of space (no space left on device) writing the checkpoint of step 6 to R/checkpoint_00000006 (rank 1)"

    def train(cfg):
        raise ray.train.WorkerGroupError("rank 1 failed", {0: RuntimeError("peer gone"), 1: OutOfSpace(cut)})

    monkeypatch.setattr(cli, "train", train)
    with pytest.raises(SystemExit) as exit:
        cli.main(["--output", str(tmp_path / "run")])
    assert exit.value.code == (
        f"training.run: {cut}; no checkpoint was completed: free space, then run the same command to start again"
    )
