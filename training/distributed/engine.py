"""DeepSpeed around the single-device video model: the only module that imports deepspeed.

`initialize` builds the engine (ZeRO stage, precision, accumulation, clipping) with a torch AdamW over the
trainable parameters only (the base's own, when some train, in a group with its own learning rate) and the
warmup + cosine schedule; `save_shard` / `load_shard` persist every
rank's ZeRO shard without the frozen base; `gathered_trainable_state` collects the trainable weights on
every rank (ZeRO-3 partitions them) for export.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from training.config import DeepSpeedConfig, OptimConfig

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"


def resolve_precision(cfg: DeepSpeedConfig, use_gpu: bool) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU; half precision on CPU is refused (DeepSpeed's CPU path is fp32)."""
    if cfg.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if cfg.precision in ("bf16", "fp16") and not use_gpu:
        raise ValueError(
            f"deepspeed.precision={cfg.precision} needs a GPU (run.use_gpu=true); use fp32 on CPU"
        )
    return cfg.precision


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, precision: str) -> dict[str, Any]:
    """DeepSpeed's JSON config from our sections (optimizer and scheduler are passed as objects)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: supported, just not DeepSpeed's own
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def lr_lambda(optim: OptimConfig):
    """Multiplier of `optim.lr`: linear warmup to 1, then cosine to `min_lr / lr` at `max_steps`."""
    floor = optim.min_lr / optim.lr

    def fn(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(optim.max_steps - optim.warmup_steps, 1)
        progress = min((step - optim.warmup_steps) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups of the trainable parameters: the added layers at `optim.lr`, the base UNet's own
    (model.trainable_spatial) at `optim.spatial_lr` (default `lr`); empty groups are left out."""
    added, base = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (base if name.startswith("unet.") else added).append(p)
    spatial_lr = optim.lr if optim.spatial_lr is None else optim.spatial_lr
    groups = [{"params": added, "lr": optim.lr}, {"params": base, "lr": spatial_lr}]
    return [g for g in groups if g["params"]]


def initialize(model: nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, use_gpu: bool):
    """(engine, precision): the model wrapped by DeepSpeed with AdamW + schedule on trainable params only."""
    precision = resolve_precision(ds, use_gpu)
    groups = param_groups(model, optim)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(ds, optim, precision),
    )
    return engine, precision


def save_shard(engine, directory: str | Path, client_state: dict | None = None) -> None:
    """This rank's ZeRO shard (trainable params, optimizer, scheduler) into `directory`.

    Every rank must call this (ray #33369: saving from rank 0 only loses the other shards); the frozen
    base stays out of the checkpoint.
    """
    engine.save_checkpoint(
        str(directory), tag=CHECKPOINT_TAG, client_state=client_state or {}, exclude_frozen_parameters=True
    )


def load_shard(engine, directory: str | Path) -> dict:
    """Restore this rank's shard from `directory`; returns the client state saved with it.

    DeepSpeed only warns and returns (None, None) when it finds nothing, which would silently start the
    run over: here that is an error.
    """
    path, client_state = engine.load_checkpoint(
        str(directory),
        tag=CHECKPOINT_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint (tag '{CHECKPOINT_TAG}') found in {directory}")
    return client_state or {}


def gathered_trainable_state(engine, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable state dict on every rank, in fp32 on CPU (ZeRO-3 parameters are gathered)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(
        params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3
    ):
        return {k: v.detach().float().cpu().clone() for k, v in model.trainable_state_dict().items()}
