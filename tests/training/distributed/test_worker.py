"""Ray Train + DeepSpeed runner on 2 CPU workers with the tiny zoo and the demo pipeline's latents.

Runs are short (6 optimiser steps) but real: 2 Ray Train workers, DeepSpeed ZeRO over gloo, the
pipeline's Parquet read by each rank (training/distributed/rows.py), checkpoints persisted by Ray Train.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.configlib import load_config
from training.config import TrainConfig

DEMO = Path(__file__).resolve().parents[3] / "training" / "configs" / "demo.yaml"
STEPS = 6  # checkpoints at 3 and 6


def _cfg(zoo, store, run_dir, *overrides) -> TrainConfig:
    from training.run import split_output

    storage, name = split_output(str(run_dir))
    return load_config(
        TrainConfig,
        DEMO,
        [
            f"model.pretrained={zoo.sd}",
            f"data.path={store}",
            f"run.storage_path={storage}",
            f"run.name={name}",
            f"optim.max_steps={STEPS}",
            "optim.warmup_steps=2",
            "run.checkpoint_every=3",
            "run.log_every=3",
            "run.val_every=0",
            *overrides,
        ],
    )


def _train(cfg: TrainConfig) -> dict:
    from training.run import train

    return train(cfg)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "trainable.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max |diff| = {worst}"


@pytest.fixture(scope="module")
def store(demo_latents):
    return demo_latents[0]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_zoo, store, tmp_path_factory):
    """A ZeRO-2 run of STEPS steps from start to end: the reference for resume and fault tests. It measures the
    per-term gradient norms (extra backwards that must not change the update: ZeRO-3's run below does not)."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    summary = _train(_cfg(tiny_zoo, store, run_dir, "run.grad_norm_every=3"))
    return run_dir, summary


def _fixed_batch_loss(cfg: TrainConfig, zoo, store, weights: dict | None) -> float:
    """L_simple on the first 4 stored clips at 8 fixed seeds, for the initial or the trained model."""
    import pyarrow.parquet as pq

    from pipeline import schema
    from training.diffusion.objective import HarivoObjective
    from training.model.unet import VideoUNet

    table = pq.read_table(Path(store) / "clips")
    latents = torch.from_numpy(schema.latents_array(table)[:4].astype("float32")).permute(0, 2, 1, 3, 4)
    text = torch.from_numpy(
        table.column(schema.PROMPT_EMBEDS).combine_chunks().to_numpy_ndarray()[:4]
    ).float()
    torch.manual_seed(cfg.run.seed)
    model = VideoUNet.from_pretrained(cfg.model, cfg.harivo).eval()
    if weights is not None:
        model.load_trainable_state_dict(weights)
    objective = HarivoObjective(load_config(TrainConfig, None, {"loss.lambda_dc": 0.0}))  # L_simple only
    with torch.no_grad():
        losses = [
            objective(model, latents, text, generator=torch.Generator().manual_seed(s)).simple.item()
            for s in range(8)
        ]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_zero2_trains_checkpoints_and_exports(uninterrupted, tiny_zoo, store):
    run_dir, summary = uninterrupted
    assert summary["metrics"]["step"] == STEPS
    # Every rank's ZeRO shard is in the checkpoint (ray #33369), without the frozen base.
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == f"checkpoint_{STEPS:08d}"
    shards = sorted(p.name for p in (ckpt / "deepspeed").iterdir())
    assert (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards
        and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    )
    names = {p.name for p in ckpt.iterdir()}
    assert {"rank0.safetensors", "rank1.safetensors", "trainer_state.json", "config.yaml"} <= names
    model_states = torch.load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert model_states and not any(k.startswith("unet.") for k in model_states)
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000003",
        "checkpoint_00000006",
    ]
    # Exports: trained weights on their own, and the loss on a fixed batch went down.
    weights = _weights(run_dir)
    assert weights and not any(k.startswith("unet.") for k in weights)
    cfg = _cfg(tiny_zoo, store, run_dir)
    before = _fixed_batch_loss(cfg, tiny_zoo, store, None)
    after = _fixed_batch_loss(cfg, tiny_zoo, store, weights)
    assert after < before, (before, after)
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["step"] == STEPS
    assert summary["metrics"]["grad_simple"] > 0 and summary["metrics"]["grad_trs"] > 0


@pytest.mark.slow
def test_zero3_trains(ray_local, tiny_zoo, store, tmp_path, uninterrupted):
    run_dir = tmp_path / "zero3"
    summary = _train(_cfg(tiny_zoo, store, run_dir, "deepspeed.zero_stage=3"))
    assert summary["metrics"]["step"] == STEPS
    shards = {p.name for p in (Path(summary["checkpoint"]) / "deepspeed").iterdir()}
    assert {
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    } <= shards
    # ZeRO-3 partitions parameters; the export gathers them, so it has the same weights as ZeRO-2's up to the
    # order of fp32 reductions, which AdamW's normalised step (|m_hat / sqrt(v_hat)| <~ 1) can amplify to a
    # fraction of lr for weights whose gradients are near zero: 0.3 x lr, where a missing gather or a lost
    # gradient moves weights by whole steps (up to 6 x lr). Measured 1.4e-4 (lr 1e-3).
    cfg = _cfg(tiny_zoo, store, run_dir)
    _assert_same_weights(_weights(run_dir), _weights(uninterrupted[0]), atol=0.3 * cfg.optim.lr)


@pytest.mark.slow
def test_rerun_resumes_to_the_same_weights(ray_local, tiny_zoo, store, tmp_path, uninterrupted):
    run_dir = tmp_path / "resumed"
    # First attempt dies after the step-3 checkpoint (no retries): the user's job crashed.
    with pytest.raises(Exception):  # noqa: B017 (Ray wraps the worker's exit in its own error types)
        _train(_cfg(tiny_zoo, store, run_dir, "run.fail_at_step=4", "run.max_failures=0"))
    assert (run_dir / "checkpoint_00000003").is_dir() and not (run_dir / "export").exists()
    # The same command again resumes from the latest checkpoint and ends where an uninterrupted run ends.
    summary = _train(_cfg(tiny_zoo, store, run_dir))
    assert summary["metrics"]["step"] == STEPS
    _assert_same_weights(_weights(run_dir), _weights(uninterrupted[0]), atol=1e-5)


@pytest.mark.slow
def test_a_run_resumes_on_another_number_of_workers(ray_local, tiny_zoo, store, tmp_path, uninterrupted):
    """The reference's step-3 checkpoint (2 workers) resumed by 1 worker (grad_accum 2: the same global batch) to
    step 4's checkpoint, that one by 2 workers again to the end. Explicit `run.resume_from`s: a crash right after
    a checkpoint may beat Ray Train's write of the run's snapshot, which a plain rerun resumes from."""
    reference = uninterrupted[0]
    one = tmp_path / "one"
    with pytest.raises(Exception):  # noqa: B017 (checkpoints step 4, dies at step 5)
        _train(
            _cfg(
                tiny_zoo,
                store,
                one,
                "run.num_workers=1",
                "optim.grad_accum=2",
                "run.checkpoint_every=1",
                f"run.resume_from={reference / 'checkpoint_00000003'}",
                "run.fail_at_step=5",
                "run.max_failures=0",
            )
        )
    two = tmp_path / "two"
    summary = _train(_cfg(tiny_zoo, store, two, f"run.resume_from={one / 'checkpoint_00000004'}"))
    assert summary["metrics"]["step"] == STEPS

    def state(path: Path) -> dict:
        return json.loads((path / "trainer_state.json").read_text())

    # (numbered checkpoints only: Ray Train may also have written its checkpoint_manager_snapshot.json there)
    assert sorted(p.name for p in one.glob("checkpoint_[0-9]*")) == ["checkpoint_00000004"]  # resumed at 3
    assert not (one / "checkpoint_00000004" / "rank1.safetensors").exists()
    written = [reference / "checkpoint_00000003", one / "checkpoint_00000004", two / "checkpoint_00000006"]
    assert [state(path)["world_size"] for path in written] == [2, 1, 2]
    # Not fp-tight, and not meant to be: the weights and AdamW moments carry over exactly (checked bit for bit
    # in test_checkpoint_deepspeed.py), but one worker cannot draw two ranks' noise streams, and the clips
    # are shared among the ranks it has, so steps 4-6 train on other noise (and clip order) than the
    # reference's. Each AdamW step moves a weight by about lr at most (|m_hat / sqrt(v_hat)| <~ 1), so the two
    # runs may part by 2 x (lr of steps 4, 5 and 6) per weight, and no more; the validation loss at fixed
    # seeds (the loss curve without the noise draw) stays where the reference's is.
    from training.distributed.engine import lr_lambda

    cfg = _cfg(tiny_zoo, store, two)
    bound = 2 * sum(cfg.optim.lr * lr_lambda(cfg.optim)(step) for step in (3, 4, 5))
    resumed, ref = _weights(two), _weights(reference)
    assert resumed.keys() == ref.keys()
    worst = max((resumed[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= bound, (worst, bound)  # measured 2.5e-3 against 3.3e-3
    val, ref_val = summary["metrics"]["val_loss"], uninterrupted[1]["metrics"]["val_loss"]
    assert abs(val - ref_val) <= 0.01 * ref_val, (val, ref_val)  # measured 1.1278 against 1.1284


@pytest.mark.slow
def test_worker_crash_restarts_from_checkpoint(ray_local, tiny_zoo, store, tmp_path, uninterrupted):
    run_dir = tmp_path / "fault"
    summary = _train(_cfg(tiny_zoo, store, run_dir, "run.fail_at_step=5", "run.max_failures=1"))
    assert (run_dir / ".fault_injected").is_file()  # the crash did happen
    assert summary["metrics"]["step"] == STEPS
    _assert_same_weights(_weights(run_dir), _weights(uninterrupted[0]), atol=1e-5)


@pytest.mark.slow
def test_motion_adapter_export_loads_in_animatediff(uninterrupted, tiny_zoo):
    from diffusers import AnimateDiffPipeline, MotionAdapter

    adapter = MotionAdapter.from_pretrained(uninterrupted[0] / "export" / "motion_adapter")
    pipe = AnimateDiffPipeline.from_pretrained(tiny_zoo.sd, motion_adapter=adapter)
    frames = pipe(
        "a red circle moves up",
        num_frames=8,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 8, 64, 64, 3) and torch.isfinite(torch.from_numpy(frames)).all()
    # The exported temporal weights are the trained ones, not a fresh adapter's zeros.
    trained = _weights(uninterrupted[0])
    key = next(k for k in trained if k.startswith("motion_adapter.") and "proj_out.weight" in k)
    exported = dict(adapter.named_parameters())[key[len("motion_adapter.") :]]
    assert torch.equal(exported.detach(), trained[key]) and exported.abs().sum() > 0


def _nan_store(store: Path, dest: Path) -> Path:
    """A copy of `store` whose latents are all NaN (a broken encode), its metadata and tensor types unchanged."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import schema

    (dest / "clips").mkdir(parents=True)
    for path in sorted((store / "clips").glob("*.parquet")):
        table = pq.read_table(path)
        nan = np.full_like(schema.latents_array(table), np.nan)
        latents = pa.FixedShapeTensorArray.from_numpy_ndarray(nan)
        assert latents.type == table.schema.field(schema.LATENTS).type
        index = table.schema.get_field_index(schema.LATENTS)
        table = table.set_column(index, schema.LATENTS, latents).replace_schema_metadata(
            table.schema.metadata
        )
        pq.write_table(table, dest / "clips" / path.name)
    return dest


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_without_an_export(ray_local, tiny_zoo, store, tmp_path):
    """NaN latents used to train all STEPS steps on `loss nan` and export; now the run stops at the first step
    past optim.max_nonfinite_steps, naming it and the loss terms, and leaves no export."""
    import ray.train

    from training.run import main

    run_dir = tmp_path / "nan"
    args = [
        "--config",
        str(DEMO),
        "--data",
        str(_nan_store(Path(store), tmp_path / "nan-latents")),
        "--output",
        str(run_dir),
        f"model.pretrained={tiny_zoo.sd}",
        f"optim.max_steps={STEPS}",
        "optim.warmup_steps=2",
        "optim.max_nonfinite_steps=1",  # step 1 is tolerated, step 2 is one too many
        "run.num_workers=1",
        "run.checkpoint_every=3",
        "run.log_every=1",
        "run.val_every=0",
    ]
    with pytest.raises(ray.train.TrainingFailedError) as failed:  # the pre-flight accepted the store
        main(args)
    message = str(failed.value)
    assert "step 2: non-finite loss (loss nan, loss_simple nan" in message, message
    assert "for 2 consecutive optimiser steps, more than optim.max_nonfinite_steps=1" in message
    assert not (run_dir / "export").exists() and not (run_dir / "result.json").exists()
    assert not list(run_dir.glob("checkpoint_*"))  # stopped before the step-3 checkpoint


def test_bad_inputs_fail_fast_with_a_message(tiny_zoo, store, tmp_path, capsys):
    from training.distributed.data import LatentStoreError, inspect_store
    from training.run import main

    with pytest.raises(SystemExit, match="data.path not found: .*nowhere"):
        main(
            [
                "--config",
                str(DEMO),
                "--data",
                str(tmp_path / "nowhere"),
                "--output",
                str(tmp_path / "r"),
                f"model.pretrained={tiny_zoo.sd}",
            ]
        )
    with pytest.raises(SystemExit, match="unknown config key 'optim.lrr'"):
        main(["--config", str(DEMO), "--output", str(tmp_path / "r"), "optim.lrr=1"])
    with pytest.raises(SystemExit, match=r"'deepspeed.zero_stage': 5 \(must be >= 0 and <= 3\)"):
        main(["--config", str(DEMO), "--output", str(tmp_path / "r"), "deepspeed.zero_stage=5"])
    with pytest.raises(SystemExit, match="no training data"):
        main(["--config", str(DEMO), "--output", str(tmp_path / "r"), f"model.pretrained={tiny_zoo.sd}"])
    # Latents encoded with another model's VAE are refused, naming both (a copy of the base whose VAE
    # weights differ: same config, other content).
    import shutil

    from diffusers import AutoencoderKL

    other = tmp_path / "other-vae-sd"
    shutil.copytree(tiny_zoo.sd, other)
    torch.manual_seed(123)
    AutoencoderKL.from_config(AutoencoderKL.load_config(other, subfolder="vae")).save_pretrained(
        other / "vae"
    )
    cfg = _cfg(tiny_zoo, store, tmp_path / "r", f"model.pretrained={other}")
    with pytest.raises(
        LatentStoreError, match=r"encoded with the VAE of .*sd.*but model.pretrained=.*other-vae-sd"
    ):
        inspect_store(cfg)
    cfg = _cfg(tiny_zoo, store, tmp_path / "r", "model.num_frames=16")
    with pytest.raises(LatentStoreError, match="stores 8 frames; model.num_frames=16"):
        inspect_store(cfg)
    info = inspect_store(_cfg(tiny_zoo, store, tmp_path / "r"))
    assert info.latents_shape == [8, 4, 8, 8] and info.has_prompt_embeds
    # A copy of the base elsewhere (same VAE files) is accepted: the VAE is compared by content.
    shutil.copytree(tiny_zoo.sd, tmp_path / "moved-sd")
    assert inspect_store(_cfg(tiny_zoo, store, tmp_path / "r", f"model.pretrained={tmp_path / 'moved-sd'}"))


@pytest.mark.slow
def test_a_truncated_shard_on_one_rank_resumes_both_from_the_previous_checkpoint(
    ray_local, tiny_zoo, demo_latents, tmp_path
):
    """2 workers, ZeRO-2: the latest checkpoint is damaged on rank 1 only; both ranks fall back to the previous
    one and end where an undamaged run ends."""
    run_dir = tmp_path / "run"
    store = demo_latents[0]
    _train(_cfg(tiny_zoo, store, run_dir, "run.keep_last=2"))
    reference = _weights(run_dir)
    shutil.rmtree(run_dir / "export")
    shard = run_dir / "checkpoint_00000006" / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # rank 1's optimizer partition only

    summary = _train(_cfg(tiny_zoo, store, run_dir, "run.keep_last=2"))  # the same command again

    # Resumed at step 3 on both ranks (rank 0's files were intact), trained to 6: the same weights.
    assert summary["metrics"]["step"] == 6
    _assert_same_weights(_weights(run_dir), reference, atol=1e-5)
    # The new step-6 checkpoint did not go into the skipped one, which is left as it was.
    assert Path(summary["checkpoint"]).name == "checkpoint_00000006_1" and shard.stat().st_size == 100

    # Later checkpoints retire the skipped one (keep_last=2) without touching the new step-6 files.
    summary = _train(_cfg(tiny_zoo, store, run_dir, "run.keep_last=2", "optim.max_steps=9"))
    assert summary["metrics"]["step"] == 9
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000006_1",
        "checkpoint_00000009",
    ]
    assert (run_dir / "checkpoint_00000006_1" / "rank1.safetensors").is_file()


@pytest.mark.slow
def test_a_checkpoint_dir_that_fills_up_keeps_the_last_intact_checkpoint_and_the_same_command_resumes(
    ray_local, tiny_zoo, store, tmp_path, uninterrupted, monkeypatch
):
    import ray.train

    from training import run as cli
    from training.distributed import worker

    run_dir = tmp_path / "full"
    train_fn = worker.train_fn_per_worker

    def train_fn_on_a_filling_disk(config):
        """The real loop, in each Ray Train worker, except that the run's disk fills while Ray Train copies rank
        1's step-6 files into it (rank 0's go in whole): half of them whole, the next cut short."""
        import pyarrow.fs

        copy_files = pyarrow.fs.copy_files

        def filling(source, destination, *args, **kwargs):
            if (
                not destination.endswith("checkpoint_00000006")
                or ray.train.get_context().get_world_rank() != 1
            ):
                return copy_files(source, destination, *args, **kwargs)
            files = sorted(p for p in Path(source).rglob("*") if p.is_file())
            for k, path in enumerate(files[: len(files) // 2 + 1]):
                target = Path(destination) / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                data = path.read_bytes()
                target.write_bytes(data if k < len(files) // 2 else data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        pyarrow.fs.copy_files = filling
        train_fn(config)

    monkeypatch.setattr(worker, "train_fn_per_worker", train_fn_on_a_filling_disk)  # what build_trainer runs
    args = [
        "--config",
        str(DEMO),
        "--data",
        str(store),
        "--output",
        str(run_dir),
        f"model.pretrained={tiny_zoo.sd}",
        f"optim.max_steps={STEPS}",
        "optim.warmup_steps=2",
        "run.checkpoint_every=3",
        "run.log_every=3",
        "run.val_every=0",
        "run.max_failures=0",
    ]
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == (
        f"training.run: out of space (no space left on device) writing the checkpoint of step 6 to "
        f"{run_dir}/checkpoint_00000006 (rank 1); the latest intact checkpoint is {run_dir}/checkpoint_00000003: "
        "free space, then run the same command to resume"
    )
    assert (run_dir / "checkpoint_00000006" / "rank0.safetensors").is_file()  # the cut checkpoint is there...
    assert ray.train.Result.from_path(str(run_dir)).checkpoint.path == str(run_dir / "checkpoint_00000003")

    monkeypatch.undo()  # space freed: ...but the same command resumes from step 3 and ends as an uninterrupted run
    shutil.rmtree(
        run_dir / "export", ignore_errors=True
    )  # rank 0 may have exported before the run was stopped
    summary = _train(_cfg(tiny_zoo, store, run_dir))
    assert summary["metrics"]["step"] == STEPS and Path(summary["checkpoint"]).name == "checkpoint_00000006"
    _assert_same_weights(_weights(run_dir), _weights(uninterrupted[0]), atol=1e-5)
