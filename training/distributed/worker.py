"""The per-worker training loop Ray Train runs on every rank: `train_fn_per_worker`.

One visible loop: batch -> latents -> objective (noise, timesteps, model_pred, losses) -> engine.backward
-> engine.step -> log / validate / checkpoint. The model and objective are single-device code; DeepSpeed
wraps them in `engine.py`; `checkpoint.py` restores and saves, `progress.py` logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from pipeline.configlib import from_dict, to_dict
from pipeline.models import TextEncoder, torch_dtype
from training.config import TrainConfig
from training.diffusion.guidance import drop_captions
from training.diffusion.losses import term_grad_norms
from training.diffusion.objective import HarivoObjective
from training.distributed import engine as ds
from training.distributed import reshard
from training.distributed.checkpoint import TrainerState, restore, save_checkpoint
from training.distributed.data import ImageStream, StoreInfo, collate_stage, feed_columns
from training.distributed.progress import Due, StepLogger, clock, say
from training.distributed.rows import RowReader
from training.distributed.split import Split
from training.model.export import export_weights
from training.model.unet import VideoUNet

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """What the driver hands every rank (Ray Train's `train_loop_config`, plain dicts across Ray)."""

    cfg: TrainConfig
    store: StoreInfo
    split: Split
    """The training and validation rows (`split.py`, chosen by the driver)."""
    image_store: StoreInfo | None = None
    """The image store of joint image-video training (data.images_per_clip), else None."""
    export_dir: str | None = None
    """Where rank 0 writes the trained weights at the end (None: no export)."""
    kind: str = "harivo"
    """The export's kind (harivo, pyoco_<stage>)."""
    recorded: dict | None = None
    """The config tree the export records, if not `cfg` (paths as given inside a Ray job's working dir)."""
    tensorboard_dir: str | None = None
    fault_marker: str | None = None
    """Tests only (`run.fail_at_step`): the file that makes the injected crash happen once (`inject_fault`)."""

    def to_loop_config(self) -> dict:
        return {**asdict(self), "cfg": to_dict(self.cfg)}

    @classmethod
    def from_loop_config(cls, config: dict) -> WorkerConfig:
        images = config.get("image_store")
        return cls(
            **{
                **config,
                "cfg": from_dict(TrainConfig, config["cfg"]),
                "store": StoreInfo(**config["store"]),
                "split": Split.from_dict(config["split"]),
                "image_store": StoreInfo(**images) if images else None,
            }
        )


def quiet_ray_train() -> None:
    """The loop prints its own progress line: Ray Train's INFO lines (each report's whole metrics dict,
    from a logger named by its file path rather than `ray.train.*`) would repeat it."""
    from ray.train.v2._internal.execution import context

    for name in ("ray.train", context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_fn_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is `WorkerConfig.to_loop_config()`."""
    quiet_ray_train()
    w = WorkerConfig.from_loop_config(config)
    cfg, info = w.cfg, w.store
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()

    torch.manual_seed(cfg.run.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    model = VideoUNet.from_pretrained(cfg.model, cfg.harivo, cascade=cfg.cascade).to(device)
    if cfg.data.image_only:
        model.freeze_video_layers()
    objective = HarivoObjective.for_model(cfg, model).to(device)
    engine, precision = ds.initialize(model, cfg.deepspeed, cfg.optim, cfg.run.use_gpu)
    dtype = torch_dtype(precision)
    text_encoder = TextEncoder.from_pretrained(cfg.model.pretrained, device, cfg.model.revision)
    empty_text = text_encoder([""])  # (1, 77, D): a dropped caption's embedding (loss.cond_drop_prob)
    if info.has_prompt_embeds:  # the store's embeddings were saved in fp16: drop ones the same way
        empty_text = empty_text.half().float()
    # Per-rank random stream: noise, timesteps, frame starts and L_DC positives differ across ranks but are
    # reproducible; its state is checkpointed, so a resumed run draws exactly what an uninterrupted one would.
    generator = torch.Generator(device).manual_seed(cfg.run.seed * 1_000_003 + rank)
    state = restore(engine, cfg, rank, generator, objective)
    reshard.resized_position(state, world, w.split.train.num_rows, cfg.optim.batch_size)
    images = None
    if w.image_store is not None:
        images = ImageStream(
            ray.train.get_dataset_shard("images"),
            cfg.optim.batch_size * cfg.data.images_per_clip,
            cfg.run.seed,
            cfg.data.shuffle_buffer,
            state,
        )
    feed = BatchFeed(cfg, info, text_encoder, empty_text, generator, dtype, w.image_store, images)
    logger = StepLogger(cfg, rank, w.tensorboard_dir, state.step)
    guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps)

    train_rows = RowReader(w.split.train, feed_columns(info))
    val_rows = RowReader(w.split.val, feed_columns(info))
    engine.train()
    first_micro = True  # this micro-batch starts an optimiser step (a checkpoint is always at a step's end)
    while state.step < cfg.optim.max_steps:
        t_data = time.perf_counter()
        for batch in epoch_batches(train_rows, cfg, state, rank, world):
            t_step = time.perf_counter()
            b = feed(batch)
            temporal = not temporal_off(cfg, state)
            terms = objective(
                engine.module,
                b.latents,
                b.text,
                generator,
                b.image_mode,
                b.cond,
                b.images,
                b.image_text,
                temporal,
            )
            grad_norms = {}
            if measure_grad_norms(cfg, state, first_micro):  # before backward: autograd.grad keeps the graph
                grad_norms = term_grad_norms(
                    terms, cfg.loss, [p for p in engine.module.parameters() if p.requires_grad]
                )
            first_micro = micro_step(engine, terms.total)
            state.batches_in_epoch += 1
            detached = terms.detached()
            # An off step's L_simple also on its own (of the model without temporal layers), averaged over those.
            logged = detached if temporal else {**detached, "loss_temporal_off": detached["loss_simple"]}
            t_end = clock(device)  # the step's kernels done: compute time, not launch time
            logger.add(logged, b.latents.shape[0] * world, t_step - t_data, t_end - t_step)
            logger.add_grad_norms(grad_norms)
            guard.add(detached)
            t_data = time.perf_counter()
            if not first_micro:  # mid-accumulation
                continue
            state.step += 1
            guard.check(state.step)
            if w.fault_marker:
                inject_fault(cfg, w.fault_marker, state.step, rank)
            due = Due.at(state.step, cfg)
            if not due.any:
                continue
            metrics = logger.metrics(state.step, state.epoch, engine.get_lr()[0], device)
            if due.validate:
                engine.eval()
                metrics["val_loss"] = validation_loss(
                    engine.module, cfg, info, val_rows, rank, world, text_encoder, device, dtype
                )
                engine.train()
            logger.log(metrics)
            if due.checkpoint:
                save_checkpoint(engine, state, generator, objective, cfg, rank, metrics)
            else:
                ray.train.report(metrics)
            t_data = time.perf_counter()
        state.epoch += 1
        state.batches_in_epoch, state.epoch_positions = 0, None

    # Export the trained weights on their own (ZeRO-3: every rank takes part in the gather).
    weights = ds.gathered_trainable_state(engine, engine.module)
    if rank == 0 and w.export_dir:
        recorded = from_dict(TrainConfig, w.recorded) if w.recorded else cfg
        export_weights(
            weights, dict(engine.module.motion_adapter.config), recorded, w.export_dir, kind=w.kind
        )
        say(f"exported trained weights to {w.export_dir}")
    logger.close()


def micro_step(engine, loss: torch.Tensor) -> bool:
    """Backward and DeepSpeed's step on one micro-batch; whether it ended an optimiser step. DeepSpeed counts the
    micro-batches itself, across epochs: an epoch whose micro-batches per rank are not a multiple of
    optim.grad_accum carries its last ones into the next epoch's first step, and the loop's step is DeepSpeed's
    (counting per epoch, the two drifted apart at every such epoch's end)."""
    boundary = engine.is_gradient_accumulation_boundary()  # asked before step() moves DeepSpeed's count on
    engine.backward(loss)
    engine.step()  # DeepSpeed only updates at the accumulation boundary
    return boundary


def temporal_off(cfg: TrainConfig, state) -> bool:
    """Whether this micro-batch's optimiser step trains without the temporal layers (loss.temporal_off_every):
    every k-th step, counted from 1 like the step being taken, so the same steps on every rank and after a resume."""
    every, step = cfg.loss.temporal_off_every, state.step + 1
    return every > 0 and step % every == 0


def measure_grad_norms(cfg: TrainConfig, state, first_micro: bool) -> bool:
    """Whether this micro-batch (the first of an optimiser step that is a multiple of run.grad_norm_every) measures
    the per-term gradient norms."""
    every, step = cfg.run.grad_norm_every, state.step + 1  # the optimiser step this micro-batch belongs to
    return every > 0 and step % every == 0 and first_micro


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN / inf for more optimiser steps in a row than optim.max_nonfinite_steps allows."""


class NonFiniteGuard:
    """Stops the run when an optimiser step's loss, averaged over its micro-batches and all ranks, is non-finite
    for more than `limit` consecutive steps. Every rank sees the same all-reduced value, so all stop together.

    The forward loss is checked, before any loss scaling: a step that DeepSpeed's fp16 scaler skips because the
    scaled gradients overflowed has a finite loss and is not counted; a non-finite forward loss (NaN latents,
    diverged weights) is, as lowering the loss scale cannot repair it."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """One micro-batch's detached loss terms (no sync)."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.batches += 1

    def check(self, step: int) -> None:
        """After optimiser step `step`: one all-reduce of the summed terms, and one sync to read them."""
        names = list(self.sums)
        sums = torch.stack([self.sums[k] for k in names])
        world = 1
        if dist.is_initialized():
            dist.all_reduce(sums)
            world = dist.get_world_size()
        mean = dict(zip(names, (sums / (self.batches * world)).tolist()))
        self.sums, self.batches = {}, 0
        if all(map(math.isfinite, mean.values())):
            self.streak = 0
            return
        self.streak += 1
        if self.streak > self.limit:
            terms = ", ".join(f"{k} {v:.4g}" for k, v in mean.items())
            raise NonFiniteLossError(
                f"step {step}: non-finite loss ({terms}; mean over ranks) for {self.streak} consecutive "
                f"optimiser steps, more than optim.max_nonfinite_steps={self.limit}: stopped without an "
                "export. Check the latents (data.path) for NaN / inf, or lower optim.lr"
            )


def epoch_batches(rows: RowReader, cfg: TrainConfig, state: TrainerState, rank: int, world: int):
    """This epoch's micro-batches still to train on: this rank's share of the epoch's order (`rows.py`; after
    a resume on another world size, of the positions the old ranks had left, `state.epoch_positions`), from
    the checkpoint's position `state.batches_in_epoch` on. A resumed run reads nothing it already trained on
    (only the rest of the window in progress); reshuffled every epoch, reproducibly."""
    if rows.num_batches(world, cfg.optim.batch_size) == 0:
        raise RuntimeError(
            f"rank {rank}'s training shard is empty: fewer clips than run.num_workers x optim.batch_size "
            f"({world} x {cfg.optim.batch_size}) after the {cfg.data.val_fraction:.0%} validation split"
        )
    start, batch_size, shuffle = state.batches_in_epoch, cfg.optim.batch_size, cfg.data.shuffle_buffer
    batches = rows.epoch(
        state.epoch, rank, world, batch_size, shuffle, cfg.run.seed, start, pool=state.epoch_positions
    )
    for i, batch in enumerate(batches):
        if i == 0 and start and rank == 0:
            say(
                f"resumed epoch {state.epoch} at micro-batch {start}: the {start * batch_size} rows "
                "per rank trained on were not read again (only the rest of the window in progress)"
            )
        if state.step >= cfg.optim.max_steps:
            return
        yield batch


@dataclass
class Batch:
    """One micro-batch as the objective takes it, on this rank's device and in the engine's dtype."""

    latents: torch.Tensor
    """(B, C, F, h, w) the clips (data.image_only: (B, C, 1, h, w) images)."""
    text: torch.Tensor
    """(B, 77, D) the captions' embeddings, some dropped to the empty prompt's."""
    cond: torch.Tensor | None = None
    """The SR stage's low-resolution latents (B, C, F, h', w') of the same frames."""
    image_mode: bool = False
    """data.image_only: no temporal layers."""
    images: torch.Tensor | None = None
    """(B, C, N, h, w) joint training's images, concatenated after each clip."""
    image_text: torch.Tensor | None = None
    """(B, N, 77, D) their captions' embeddings."""


@dataclass
class BatchFeed:
    """Numpy batches of the store(s) -> `Batch`."""

    cfg: TrainConfig
    store: StoreInfo
    text_encoder: TextEncoder
    empty_text: torch.Tensor
    """(1, 77, D) the empty prompt's embedding: a dropped caption's (loss.cond_drop_prob)."""
    generator: torch.Generator
    dtype: torch.dtype
    image_store: StoreInfo | None = None
    images: ImageStream | None = None
    """Joint training: the image batches, `optim.batch_size x data.images_per_clip` per clip batch."""

    def __call__(self, batch: dict) -> Batch:
        """The micro-batch of `batch`: a random window of frames (a super-resolution stage also gets the
        low-resolution latents of the same frames), joint training's images, and captions dropped to the
        empty prompt with probability `loss.cond_drop_prob`. The draw order (frame start, caption dropout,
        image captions' dropout) is part of the resumable random stream."""
        cfg, g, device = self.cfg, self.generator, self.empty_text.device
        rng = g if cfg.data.random_start else None
        latents, captions, embeds, cond_latents = collate_stage(
            batch, self.store, cfg.model.num_frames, cfg.data.frame_stride, rng, device
        )
        text = embeds if embeds is not None else self.text_encoder(captions)
        text = drop_captions(text.float(), self.empty_text, cfg.loss.cond_drop_prob, g)
        cond_latents = cond_latents.to(self.dtype) if cond_latents is not None else None
        out = Batch(latents.to(self.dtype), text.to(self.dtype), cond_latents, cfg.data.image_only)
        if self.images is not None:
            n = cfg.data.images_per_clip
            pixels, image_captions, image_embeds, _ = collate_stage(
                self.images.next(), self.image_store, 1, 1, None, device
            )  # (B N, C, 1, h, w)
            image_text = image_embeds if image_embeds is not None else self.text_encoder(image_captions)
            image_text = drop_captions(image_text.float(), self.empty_text, cfg.loss.cond_drop_prob, g)
            b = latents.shape[0]
            pixels = pixels[:, :, 0]  # (B N, C, h, w)
            out.images = (
                pixels.reshape(b, n, *pixels.shape[1:]).transpose(1, 2).to(self.dtype)
            )  # (B, C, N, h, w)
            out.image_text = image_text.reshape(b, n, *image_text.shape[1:]).to(self.dtype)  # (B, N, 77, D)
        return out


@torch.no_grad()
def validation_loss(
    model,
    cfg: TrainConfig,
    info: StoreInfo,
    rows: RowReader,
    rank: int,
    world: int,
    text_encoder,
    device,
    dtype,
) -> float:
    """Mean L_simple over this rank's first data.val_batches batches of the validation split (its own small
    files: nothing else is read) at fixed seeds (same clips, noise and timesteps every time), averaged over
    ranks."""
    val_cfg = from_dict(
        TrainConfig, to_dict(cfg), {"loss.lambda_trs": 0.0, "loss.lambda_reg": 0.0, "loss.lambda_dc": 0.0}
    )
    objective = HarivoObjective(val_cfg).to(device)
    total = torch.zeros(2, dtype=torch.float64)  # (sum of losses, batches)
    for i, batch in enumerate(rows.first(rank, world, cfg.optim.batch_size, cfg.data.val_batches)):
        latents, captions, embeds, cond_latents = collate_stage(
            batch, info, cfg.model.num_frames, cfg.data.frame_stride, None, device
        )
        text = embeds if embeds is not None else text_encoder(captions)
        generator = torch.Generator(device).manual_seed(10_000 + i)
        cond_latents = cond_latents.to(dtype) if cond_latents is not None else None
        terms = objective(
            model,
            latents.to(dtype),
            text.to(dtype),
            generator=generator,
            image_mode=cfg.data.image_only,
            cond_latents=cond_latents,
        )
        total += torch.tensor([float(terms.simple), 1.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else math.nan


def inject_fault(cfg: TrainConfig, marker: str, step: int, rank: int) -> None:
    """Test-only hook: at step `run.fail_at_step`, rank 0 dies once (the marker file records it), as a crashed
    worker would; Ray Train then restarts the group from the last checkpoint."""
    if cfg.run.fail_at_step == step and rank == 0 and not os.path.exists(marker):
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(json.dumps({"step": step}))
        os._exit(1)
