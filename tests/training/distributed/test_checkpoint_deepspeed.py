"""DeepSpeed's part of a training checkpoint on resume (`engine.load_shard`, `checkpoint.resume`): real
DeepSpeed engines on CPU in one gloo process (world size 1) around a tiny two-layer model.

Resuming must never unpickle arbitrary objects (a planted pickle ran in every worker), must name the file
it cannot read, and must fall back from an unreadable latest checkpoint to the newest intact one. Saving onto a
full disk says so (`OutOfSpace`), and the checkpoint it cut short is never resumed from."""

from __future__ import annotations

import errno
import json
import shutil
import socket
from pathlib import Path

import pytest
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from pipeline.configlib import load_config
from pipeline.write import OutOfSpace
from training.config import TrainConfig
from training.diffusion.objective import HarivoObjective
from training.distributed import checkpoint as ckpt
from training.distributed import engine as ds
from training.distributed import reshard
from training.distributed.checkpoint import TRAINER_STATE, TrainerState, write_rank_files

HSPACE = 8


class Payload:
    """Unpickling this runs code: it creates `marker` (what a planted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class Tiny(nn.Module):
    """A frozen base layer (left out of shards) and a trained head."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 8).requires_grad_(False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x)))

    def trainable_state_dict(self):
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """One gloo process group for the module (DeepSpeed needs one; a Ray Train worker has one), and the
    LOCAL_RANK DeepSpeed asserts, set only while the module runs. ZeRO-3 replaces `F.linear` for the rest of
    the process ("This will persist unless manually reset"), which breaks `torch.jit.script` in later tests:
    put back, with the process group, when the module ends."""
    own_group = not dist.is_initialized()
    if own_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOCAL_RANK", "0")
        env.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)  # restored on exit
        yield
    if own_group:
        dist.destroy_process_group()


def config(stage: int = 2) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        {
            "deepspeed.zero_stage": stage,
            "optim.warmup_steps": 2,
            "loss.queue_size": 16,
            "model.num_frames": 4,
        },
    )


def engine_for(cfg: TrainConfig, seed: int):
    """An engine whose head starts from `seed`; the frozen base is the same in all (the pretrained model)."""
    torch.manual_seed(0)
    model = Tiny()
    torch.manual_seed(seed)
    model.head.reset_parameters()
    return ds.initialize(model, cfg.deepspeed, cfg.optim, use_gpu=False)[0], model


def train(engine, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        engine.backward(engine(torch.randn(2, 4, generator=g)).pow(2).mean())
        engine.step()


def weights(engine, model) -> dict[str, torch.Tensor]:
    return ds.gathered_trainable_state(engine, model)


def save(engine, cfg, directory, step: int) -> None:
    """A whole checkpoint directory, as `save_checkpoint` has Ray Train persist it (one rank)."""
    ds.save_shard(engine, directory)
    objective = HarivoObjective(cfg, HSPACE)
    write_rank_files(
        directory, 0, TrainerState(step=step), torch.Generator().manual_seed(step), objective, cfg
    )


def optim_file(directory):
    return next((directory / ds.CHECKPOINT_TAG).glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_shard_file_loads_with_weights_only_and_restores_training(stage, tmp_path):
    cfg = config(stage)
    engine, model = engine_for(cfg, seed=0)
    train(engine, 3, seed=1)
    ds.save_shard(engine, tmp_path)
    files = sorted((tmp_path / ds.CHECKPOINT_TAG).glob("*.pt"))
    assert files and ds.shard_files(tmp_path, 0) == files
    for path in files:  # SHARD_GLOBALS is all DeepSpeed pickles at this stage
        assert isinstance(ds.read_shard_file(path), dict), path
    saved = weights(engine, model)
    train(engine, 2, seed=2)
    after = weights(engine, model)

    fresh, fresh_model = engine_for(cfg, seed=5)
    assert not torch.equal(weights(fresh, fresh_model)["head.weight"], saved["head.weight"])
    ds.load_shard(fresh, tmp_path)
    assert all(torch.equal(weights(fresh, fresh_model)[k], v) for k, v in saved.items())
    train(fresh, 2, seed=2)  # optimizer moments and schedule came back too: the same next steps
    assert all(torch.allclose(weights(fresh, fresh_model)[k], v, atol=1e-7) for k, v in after.items())


@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_a_pickle_planted_as_a_deepspeed_file_is_refused_and_never_runs(kind, tmp_path):
    cfg = config(2)
    engine, model = engine_for(cfg, seed=0)
    ds.save_shard(engine, tmp_path / "ckpt")
    target = next((tmp_path / "ckpt" / ds.CHECKPOINT_TAG).glob(f"*{kind}.pt"))
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, target)
    torch.load(target, weights_only=False)  # the payload is live: unpickled as DeepSpeed did, it runs
    assert marker.exists()
    marker.unlink()

    before = weights(engine, model)
    with pytest.raises(ds.CheckpointError, match=f"{target}.*refused"):
        ds.load_shard(engine, tmp_path / "ckpt")
    with pytest.raises(ds.CheckpointError, match=f"{target}.*refused"):
        ds.check_shard(tmp_path / "ckpt", 0)
    assert not marker.exists()
    assert all(torch.equal(weights(engine, model)[k], v) for k, v in before.items())


def test_a_truncated_shard_is_named(tmp_path):
    cfg = config(2)
    engine, _ = engine_for(cfg, seed=0)
    ds.save_shard(engine, tmp_path)
    target = optim_file(tmp_path)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ds.CheckpointError, match=f"{target} is unreadable \\(truncated or corrupted\\?\\)"):
        ds.load_shard(engine_for(cfg, seed=1)[0], tmp_path)


def spoil_shard(directory, marker):
    path = optim_file(directory)
    path.write_bytes(path.read_bytes()[:100])
    return path


def plant_payload(directory, marker):
    path = directory / ds.CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
    torch.save(Payload(marker), path)
    return path


def negative_step(directory, marker):
    path = directory / TRAINER_STATE
    path.write_text('{"step": -5, "epoch": 0, "batches_in_epoch": 0, "image_epoch": 0, "image_batches": 0}')
    return path


@pytest.fixture
def run_dir(tmp_path):
    """A run's storage dir with checkpoints at steps 3 and 6, and the trained weights at each."""
    cfg = config(2)
    engine, model = engine_for(cfg, seed=0)
    at = {}
    for step in (3, 6):
        train(engine, 3, seed=step)
        save(engine, cfg, tmp_path / f"checkpoint_{step:08d}", step)
        at[step] = weights(engine, model)
    return tmp_path, at


@pytest.mark.parametrize("spoil", [spoil_shard, plant_payload, negative_step])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_newest_intact(spoil, run_dir, monkeypatch):
    monkeypatch.setattr(ckpt, "_skipped_names", set())
    run, at = run_dir
    marker = run / "pwned"
    spoiled = spoil(run / "checkpoint_00000006", marker)
    cfg = config(2)
    engine, model = engine_for(cfg, seed=9)
    latest = ray.train.Checkpoint(str(run / "checkpoint_00000006"))

    used, state = ckpt.resume(
        engine, latest, 0, torch.Generator(), HarivoObjective(cfg, HSPACE), fallback=True
    )

    assert used.path == str(run / "checkpoint_00000003") and state == TrainerState(step=3)
    assert all(torch.equal(weights(engine, model)[k], v) for k, v in at[3].items())
    assert not marker.exists()
    # The skipped checkpoint stays as it was; the next one of its step gets a name of its own (Ray Train
    # still tracks the skipped one, and deleting it must not delete the new files).
    assert spoiled.exists() and ckpt.dir_name(6) == "checkpoint_00000006_1" and ckpt.dir_name(9).endswith("9")


def test_no_intact_checkpoint_is_an_error_naming_each(run_dir, monkeypatch):
    monkeypatch.setattr(ckpt, "_skipped_names", set())
    run, _ = run_dir
    spoiled = [
        spoil_shard(run / "checkpoint_00000006", None),
        negative_step(run / "checkpoint_00000003", None),
    ]
    (run / "checkpoint_00000001").mkdir()  # an empty one (an interrupted upload)
    (run / "checkpoint_00000009").mkdir()  # newer than Ray Train's latest: never a fallback
    cfg = config(2)
    latest = ray.train.Checkpoint(str(run / "checkpoint_00000006"))
    with pytest.raises(ds.CheckpointError, match="no intact checkpoint") as err:
        ckpt.resume(engine_for(cfg, 1)[0], latest, 0, torch.Generator(), HarivoObjective(cfg, HSPACE), True)
    message = str(err.value)
    assert all(str(p) in message for p in spoiled) and "field 'step'" in message
    assert f"{run / 'checkpoint_00000001'} is not a T2V-Ray training checkpoint" in message
    assert "checkpoint_00000009" not in message


def test_an_unreadable_explicit_checkpoint_fails_naming_the_file(run_dir):
    run, at = run_dir
    shutil.copytree(run / "checkpoint_00000006", run / "elsewhere")
    spoiled = spoil_shard(run / "elsewhere", None)
    cfg = config(2)
    engine, model = engine_for(cfg, seed=9)
    before = weights(engine, model)
    explicit = ray.train.Checkpoint(str(run / "elsewhere"))  # run.resume_from: no fallback
    with pytest.raises(ds.CheckpointError, match=f"{spoiled} is unreadable"):
        ckpt.resume(engine, explicit, 0, torch.Generator(), HarivoObjective(cfg, HSPACE), fallback=False)
    assert all(torch.equal(weights(engine, model)[k], v) for k, v in before.items())  # nothing loaded


def test_a_full_disk_while_saving_is_out_of_space_and_the_cut_checkpoint_is_never_resumed(
    run_dir, monkeypatch
):
    monkeypatch.setattr(ckpt, "_skipped_names", set())
    run, at = run_dir
    cfg = config(2)
    cfg.run.storage_path, cfg.run.name = str(run.parent), run.name
    engine, _ = engine_for(cfg, seed=0)
    temp_dirs = []

    def report(metrics, checkpoint, checkpoint_dir_name):
        """Ray Train copying this rank's files into the run's storage, until the disk is full: half of them whole,
        the next cut short (Ray records a checkpoint as the run's latest only once every rank's files are in)."""
        source = Path(checkpoint.path)
        temp_dirs.append(source)
        files = sorted(p for p in source.rglob("*") if p.is_file())
        for k, path in enumerate(files[: len(files) // 2 + 1]):
            target = run / checkpoint_dir_name / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            target.write_bytes(data if k < len(files) // 2 else data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ray.train, "report", report)
    objective = HarivoObjective(cfg, HSPACE)
    with pytest.raises(OutOfSpace, match=rf"checkpoint of step 9 to {run}/checkpoint_00000009 \(rank 0\)$"):
        ckpt.save_checkpoint(engine, TrainerState(step=9), torch.Generator(), objective, cfg, 0, {})
    assert not temp_dirs[0].exists() and any((run / "checkpoint_00000009").rglob("*.pt"))

    # Resuming the run (Ray's latest is still step 6) never looks at the cut step-9 directory, even when step 6
    # turns out unreadable: the fallback goes to older checkpoints only.
    fresh, fresh_model = engine_for(cfg, seed=9)
    latest = ray.train.Checkpoint(str(run / "checkpoint_00000006"))
    used, state = ckpt.resume(
        fresh, latest, 0, torch.Generator(), HarivoObjective(cfg, HSPACE), fallback=True
    )
    assert used.path == latest.path and state == TrainerState(step=6)
    assert all(torch.equal(weights(fresh, fresh_model)[k], v) for k, v in at[6].items())
    spoil_shard(run / "checkpoint_00000006", None)
    used, state = ckpt.resume(
        fresh, latest, 0, torch.Generator(), HarivoObjective(cfg, HSPACE), fallback=True
    )
    assert used.path == str(run / "checkpoint_00000003") and state == TrainerState(step=3)


def test_a_full_local_temp_dir_is_out_of_space_too_and_other_errors_pass_through(run_dir, monkeypatch):
    from safetensors import SafetensorError

    run, _ = run_dir
    cfg = config(2)
    cfg.run.storage_path, cfg.run.name = str(run.parent), run.name
    engine, _ = engine_for(cfg, seed=0)

    def write_rank_files_on_a_full_disk(directory, *args):
        (directory / "rank0.safetensors").write_bytes(b"cut")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "write_rank_files", write_rank_files_on_a_full_disk)
    objective = HarivoObjective(cfg, HSPACE)
    with pytest.raises(OutOfSpace, match=r"checkpoint of step 9 to this worker's temp dir .*t2v-ckpt-"):
        ckpt.save_checkpoint(engine, TrainerState(step=9), torch.Generator(), objective, cfg, 0, {})

    def write_rank_files_failing(directory, *args):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(ckpt, "write_rank_files", write_rank_files_failing)
    with pytest.raises(RuntimeError, match="a bug, not a full disk"):
        ckpt.save_checkpoint(engine, TrainerState(step=9), torch.Generator(), objective, cfg, 0, {})


def moments(engine, model) -> dict[str, torch.Tensor]:
    """The full fp32 masters and AdamW moments, as a checkpoint of any world size carries them."""
    return ds.full_state(engine)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_checkpoint_of_another_world_size_resumes_the_same_training(stage, tmp_path, monkeypatch):
    """A checkpoint recorded as written by 2 workers, resumed by this one (world 1): weights, AdamW moments,
    step and schedule come from the whole copy (ZeRO 1-2's `full_state.safetensors`; ZeRO-0's shared file),
    not from the 2-rank partitions, and the next steps are the ones the saving engine takes."""
    monkeypatch.setattr(ckpt, "_skipped_names", set())
    cfg = config(stage)
    engine, model = engine_for(cfg, seed=0)
    train(engine, 3, seed=1)
    directory = tmp_path / "checkpoint_00000003"
    save(engine, cfg, directory, step=3)
    reshard.write_full_state(engine, directory, rank=0)
    assert (directory / reshard.FULL_STATE).is_file() == (stage > 0)
    state_file = directory / TRAINER_STATE
    state_file.write_text(
        json.dumps({**json.loads(state_file.read_text()), "batches_in_epoch": 3, "world_size": 2})
    )
    saved = {**weights(engine, model), **(moments(engine, model) if stage else {})}
    train(engine, 2, seed=2)
    after = weights(engine, model)

    fresh, fresh_model = engine_for(cfg, seed=5)
    latest = ray.train.Checkpoint(str(directory))
    _, state = ckpt.resume(fresh, latest, 0, torch.Generator(), HarivoObjective(cfg, HSPACE), True, cfg)

    # the data position as the 2 ranks left it: the loop splits their rest (reshard.resized_position)
    assert (state.step, state.batches_in_epoch, state.world_size, state.epoch_positions) == (3, 3, 2, None)
    restored = {**weights(fresh, fresh_model), **(moments(fresh, fresh_model) if stage else {})}
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], v) for k, v in saved.items())
    train(fresh, 2, seed=2)
    assert all(torch.allclose(weights(fresh, fresh_model)[k], v, atol=1e-7) for k, v in after.items())


def test_zero3_on_another_world_size_is_refused_naming_both(tmp_path):
    with pytest.raises(ds.CheckpointError, match="written by 2 workers and this run has 1: ZeRO-3"):
        reshard.check_resized(tmp_path, 3, saved_world=2, world=1)
    with pytest.raises(ds.CheckpointError, match="no full_state.safetensors"):
        reshard.check_resized(tmp_path, 2, saved_world=2, world=1)


@pytest.mark.parametrize("resizable", [True, False])
def test_the_whole_copy_is_written_only_when_checkpoints_are_resizable(resizable, tmp_path, monkeypatch):
    cfg = config(2)
    cfg.run.resizable_checkpoints = resizable
    engine, _ = engine_for(cfg, seed=0)
    saved = []

    def report(metrics, checkpoint, checkpoint_dir_name):  # Ray Train persisting the rank's files
        saved.append(sorted(p.name for p in Path(checkpoint.path).iterdir()))

    monkeypatch.setattr(ray.train, "report", report)
    objective = HarivoObjective(cfg, HSPACE)
    ckpt.save_checkpoint(engine, TrainerState(step=1), torch.Generator(), objective, cfg, 0, {})
    assert (reshard.FULL_STATE in saved[0]) == resizable and TRAINER_STATE in saved[0]


def test_the_loops_step_is_deepspeeds_when_an_epoch_ends_mid_accumulation():
    """`worker.micro_step` with optim.grad_accum 2 over two epochs of 3 micro-batches each: the third micro-batch of
    the first epoch and the first of the second make one optimiser step (DeepSpeed's count runs across epochs), so
    the loop counts 3 steps, as DeepSpeed does; counting per epoch (`batches_in_epoch % grad_accum`, before) made 2."""
    from training.distributed.worker import micro_step

    cfg = load_config(TrainConfig, None, {"deepspeed.zero_stage": 2, "optim.grad_accum": 2})
    engine, _ = engine_for(cfg, seed=0)
    g, ends = torch.Generator().manual_seed(0), []
    for _epoch in range(2):
        for _ in range(3):
            ends.append(micro_step(engine, engine(torch.randn(2, 4, generator=g)).pow(2).mean()))
    assert ends == [False, True, False, True, False, True]
    assert sum(ends) == engine.global_steps == 3
