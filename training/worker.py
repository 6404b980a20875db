"""The per-worker training loop Ray Train runs on every rank: `train_fn_per_worker`.

One visible loop: batch -> latents -> objective (noise, timesteps, model_pred, losses) -> engine.backward
-> engine.step -> report / checkpoint. The model and objective are single-device code; DeepSpeed wraps
them in `training/deepspeed.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from pipeline.config import from_dict
from training import deepspeed as ds
from training.checkpoint import TrainerState, export_weights, read_rank_files, write_rank_files
from training.config import TrainConfig
from training.data import StoreInfo, TextEncoder, collate_stage
from training.model import VideoUNet
from training.objective import HarivoObjective

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _Meter:
    """Sums of detached loss terms and timings between reports; `.item()` only when reporting (a sync point)."""

    def __init__(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = self.samples = 0
        self.data_s = self.step_s = 0.0

    def add(self, terms: dict[str, torch.Tensor], samples: int, data_s: float, step_s: float) -> None:
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0) + v.float()
        self.steps += 1
        self.samples += samples
        self.data_s += data_s
        self.step_s += step_s

    def summary(self, micro_per_step: int) -> dict[str, float]:
        n = max(self.steps, 1)
        out = {k: float(v) / n for k, v in self.terms.items()}
        wall = self.data_s + self.step_s
        out["samples_per_s"] = self.samples / wall if wall else 0.0
        out["step_time_s"] = wall / n * micro_per_step
        out["data_wait_frac"] = self.data_s / wall if wall else 0.0
        self.__init__()
        return out


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@torch.no_grad()
def validation_loss(model, cfg: TrainConfig, info: StoreInfo, text_encoder, device, dtype) -> float:
    """Mean L_simple over this rank's val shard at fixed seeds (same noise and timesteps every time),
    averaged over ranks. The whole shard is consumed so every rank stays in step with the split."""
    val_cfg = from_dict(
        TrainConfig,
        {**asdict(cfg), "loss": {**asdict(cfg.loss), "lambda_trs": 0.0, "lambda_reg": 0.0, "lambda_dc": 0.0}},
    )
    objective = HarivoObjective(val_cfg).to(device)
    total = torch.zeros(2, dtype=torch.float64)  # (sum of losses, batches)
    shard = ray.train.get_dataset_shard("val")
    for i, batch in enumerate(shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy")):
        if i >= cfg.data.val_batches:
            continue
        latents, captions, embeds, cond_latents = collate_stage(
            batch, info, cfg.model.num_frames, cfg.data.frame_stride, None, device
        )
        text = embeds if embeds is not None else text_encoder(captions)
        generator = torch.Generator(device).manual_seed(10_000 + i)
        cond_latents = cond_latents.to(dtype) if cond_latents is not None else None
        terms = objective(
            model, latents.to(dtype), text.to(dtype), generator=generator, cond_latents=cond_latents
        )
        total += torch.tensor([float(terms.simple), 1.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else math.nan


def train_fn_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` = {"cfg": TrainConfig as dict, "store": StoreInfo as dict, ...}."""
    # The loop prints its own progress line; Ray Train's per-report INFO lines would bury it.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = from_dict(TrainConfig, config["cfg"])
    info = StoreInfo(**config["store"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    # Identical initialisation on every rank (DeepSpeed also broadcasts rank 0's weights at init).
    torch.manual_seed(cfg.run.seed)
    model = VideoUNet.from_pretrained(cfg.model, cfg.harivo, cascade=cfg.cascade).to(device)
    objective = HarivoObjective.for_model(cfg, model).to(device)
    engine, precision = ds.initialize(model, cfg.deepspeed, cfg.optim, cfg.run.use_gpu)
    dtype = DTYPES[precision]
    text_encoder = (
        None
        if info.has_prompt_embeds
        else TextEncoder.from_pretrained(cfg.model.pretrained, device, cfg.model.revision)
    )
    # Per-rank random stream: noise, timesteps, frame starts and L_DC positives differ across ranks but are
    # reproducible; its state is checkpointed, so a resumed run draws exactly what an uninterrupted one would.
    generator = torch.Generator(device).manual_seed(cfg.run.seed * 1_000_003 + rank)

    state = TrainerState()
    checkpoint = ray.train.get_checkpoint()  # the run's latest (same name, or after a worker failure)
    if checkpoint is None and cfg.run.resume_from:
        checkpoint = ray.train.Checkpoint(cfg.run.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            ds.load_shard(engine, directory)
            state = read_rank_files(Path(directory), rank, generator, objective)
        if rank == 0:
            print(f"resumed from {checkpoint.path} at step {state.step} (epoch {state.epoch})", flush=True)

    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"], purge_step=state.step)

    micro = cfg.optim.grad_accum
    meter, started, start_step = _Meter(), time.perf_counter(), state.step
    shard = ray.train.get_dataset_shard("train")
    engine.train()
    while state.step < cfg.optim.max_steps:
        batches = shard.iter_batches(
            batch_size=cfg.optim.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.run.seed * 1009 + state.epoch,  # reshuffled every epoch, reproducibly
        )
        seen, t_data = 0, time.perf_counter()
        for batch in batches:
            seen += 1
            if seen <= state.batches_in_epoch or state.step >= cfg.optim.max_steps:
                t_data = time.perf_counter()  # resuming: skip what the checkpointed run already trained on
                continue
            t_step = time.perf_counter()
            data_s = t_step - t_data
            # Latents (B, C, F, h, w) and text (B, 77, D); every k-th step, single frames in image mode.
            # A super-resolution stage also gets the low-resolution latents of the same frames.
            stride, rng = cfg.data.frame_stride, generator if cfg.data.random_start else None
            latents, captions, embeds, cond_latents = collate_stage(
                batch, info, cfg.model.num_frames, stride, rng, device
            )
            text = embeds if embeds is not None else text_encoder(captions)
            image_mode = cfg.data.image_mode_every > 0 and (state.step + 1) % cfg.data.image_mode_every == 0
            if image_mode:
                frame = int(torch.randint(0, latents.shape[2], (1,), generator=generator))
                latents = latents[:, :, frame : frame + 1]  # (B, C, 1, h, w)
                if cond_latents is not None:
                    cond_latents = cond_latents[:, :, frame : frame + 1]  # (B, C, 1, h', w')
            terms = objective(
                engine.module,
                latents.to(dtype),
                text.to(dtype),
                generator=generator,
                image_mode=image_mode,
                cond_latents=cond_latents.to(dtype) if cond_latents is not None else None,
            )
            engine.backward(terms.total)
            engine.step()  # DeepSpeed only updates at the accumulation boundary
            state.batches_in_epoch += 1
            meter.add(terms.detached(), latents.shape[0] * world, data_s, time.perf_counter() - t_step)
            if state.batches_in_epoch % micro == 0:
                state.step += 1
                _after_step(
                    _Worker(
                        cfg,
                        config,
                        engine,
                        objective,
                        generator,
                        writer,
                        rank,
                        info,
                        text_encoder,
                        device,
                        dtype,
                        started,
                        start_step,
                    ),
                    state,
                    meter,
                )
            t_data = time.perf_counter()
        if seen == 0:
            raise RuntimeError(
                f"rank {rank}'s training shard is empty: fewer clips than run.num_workers x optim.batch_size "
                f"({world} x {cfg.optim.batch_size}) after the {cfg.data.val_fraction:.0%} validation split"
            )
        state.epoch += 1
        state.batches_in_epoch = 0

    # Export the trained weights on their own (ZeRO-3: every rank takes part in the gather).
    weights = ds.gathered_trainable_state(engine, engine.module)
    if rank == 0 and config.get("export_dir"):
        export_weights(
            weights,
            dict(engine.module.motion_adapter.config),
            cfg,
            config["export_dir"],
            kind=config.get("kind", "harivo"),
        )
        print(f"exported trained weights to {config['export_dir']}", flush=True)
    if writer is not None:
        writer.close()


@dataclass
class _Worker:
    """What `_after_step` needs of this worker: fixed for the whole run."""

    cfg: TrainConfig
    config: dict
    engine: object
    objective: HarivoObjective
    generator: torch.Generator
    writer: object
    rank: int
    info: StoreInfo
    text_encoder: object
    device: torch.device
    dtype: torch.dtype
    started: float
    start_step: int


def _after_step(w: _Worker, state: TrainerState, meter: _Meter) -> None:
    """Fault injection, validation, metric reports and checkpoints after optimiser step `state.step`."""
    cfg, config, engine, rank, device, dtype = w.cfg, w.config, w.engine, w.rank, w.device, w.dtype
    step, run = state.step, cfg.run
    marker = config.get("fault_marker")
    if run.fail_at_step == step and rank == 0 and marker and not os.path.exists(marker):
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(json.dumps({"step": step}))
        os._exit(1)  # simulate a worker crash: Ray Train restarts the group from the last checkpoint

    last = step == cfg.optim.max_steps
    do_val = last or (run.val_every > 0 and step % run.val_every == 0)
    do_ckpt = last or step % run.checkpoint_every == 0
    if not (do_val or do_ckpt or step % run.log_every == 0):
        return
    metrics = meter.summary(cfg.optim.grad_accum)
    metrics.update(step=step, epoch=state.epoch, lr=engine.get_lr()[0], peak_mem_mb=_peak_memory_mb(device))
    if do_val:
        engine.eval()
        metrics["val_loss"] = validation_loss(engine.module, cfg, w.info, w.text_encoder, device, dtype)
        engine.train()
    if rank == 0:
        done = step - w.start_step
        eta = (time.perf_counter() - w.started) / max(done, 1) * (cfg.optim.max_steps - step)
        val = f" val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        print(
            f"step {step}/{cfg.optim.max_steps} loss {metrics.get('loss', math.nan):.4f}{val} "
            f"lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s "
            f"data-wait {metrics['data_wait_frac']:.0%} ETA {_eta(eta)}",
            flush=True,
        )
        if w.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, float) and k not in ("step", "epoch"):
                    w.writer.add_scalar(k, v, step)
            w.writer.flush()
    if not do_ckpt:
        ray.train.report(metrics)
        return
    # Every rank writes its own DeepSpeed shard into its own temp dir; Ray Train merges them into one
    # checkpoint directory in storage (ray #33369: rank-0-only saving loses the other shards).
    directory = Path(tempfile.mkdtemp(prefix="t2v-ckpt-"))
    try:
        ds.save_shard(engine, directory)
        write_rank_files(directory, rank, state, w.generator, w.objective, cfg)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
