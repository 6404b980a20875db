"""DeepSpeed around the single-device video model: the only module that imports deepspeed.

`initialize` builds the engine (ZeRO stage, precision, accumulation, clipping) with a torch AdamW over the
trainable parameters only (the base's own, when some train, in a group with its own learning rate) and the
warmup + cosine schedule; `save_shard` / `load_shard` persist every
rank's ZeRO shard without the frozen base; `gathered_trainable_state` collects the trainable weights on
every rank (ZeRO-3 partitions them) for export.

Shards are read back with `weights_only=True` and only `SHARD_GLOBALS` allowed (`read_shard_file`): a
pickle planted in a run directory (a shared bucket or volume) must not run code in the workers on resume.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from training.config import DeepSpeedConfig, OptimConfig

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"

SHARD_GLOBALS = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)
"""The classes besides tensors and containers that DeepSpeed pickles into a ZeRO 0-3 shard (its optimizer
state: loss scaler, ZeRO stage, bf16/fp32 partition addresses); anything else in a shard is refused."""


class CheckpointError(RuntimeError):
    """A checkpoint file resuming cannot use (unreadable, truncated, unsafe or invalid); names the file."""


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


def adamw(groups: list[dict], optim: OptimConfig, use_gpu: bool) -> torch.optim.AdamW:
    """torch AdamW over `groups`; on GPU its fused kernel (one launch for all parameters, not several per
    tensor). The CPU runs keep the default for-each kernel their tests and measurements were made with."""
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=True if use_gpu else None,
    )


def initialize(model: nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, use_gpu: bool):
    """(engine, precision): the model wrapped by DeepSpeed with AdamW + schedule on trainable params only."""
    precision = resolve_precision(ds, use_gpu)
    groups = param_groups(model, optim)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = adamw(groups, optim, use_gpu)
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


def read_shard_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """One DeepSpeed checkpoint file, unpickled with weights_only=True and SHARD_GLOBALS only (DeepSpeed's
    own reader unpickles anything: code execution on resume); every failure names the file."""
    try:
        with torch.serialization.safe_globals(list(SHARD_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects other than DeepSpeed's checkpoint state: refused ({e})"
        ) from None
    except Exception as e:  # torch reports truncation as RuntimeError, OSError or EOFError, naming no file
        raise CheckpointError(f"{path} is unreadable (truncated or corrupted?): {e}") from e


class _WeightsOnlyLoads:
    """The engine's checkpoint engine with `load` replaced by `read_shard_file` (all else is DeepSpeed's)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return read_shard_file(path, map_location)


@contextmanager
def _weights_only_loads(engine):
    """For one `load_checkpoint`: DeepSpeed reads every shard file through `engine.checkpoint_engine.load`
    (TorchCheckpointEngine: weights_only=False), so only that attribute is swapped, and put back after."""
    own = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(own)
    try:
        yield
    finally:
        engine.checkpoint_engine = own


def shard_files(directory: str | Path, rank: int) -> list[Path]:
    """The DeepSpeed files rank `rank` reads on load: the shared mp_rank_* model states (ZeRO 0-2) and its
    own zero_pp_rank_{rank}_* files (optimizer partition; ZeRO-3 model partition)."""
    own = re.compile(rf"^(mp_rank_\d+_|(bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_).*\.pt$")
    folder = Path(directory) / CHECKPOINT_TAG
    return sorted(p for p in folder.glob("*.pt") if own.match(p.name)) if folder.is_dir() else []


def check_shard(directory: str | Path, rank: int) -> None:
    """Read this rank's DeepSpeed files before any reaches the engine, so that a truncated or unsafe one
    is found while another checkpoint can still be loaded (a failed load_checkpoint half-restores)."""
    files = shard_files(directory, rank)
    if not files:
        raise CheckpointError(f"{Path(directory) / CHECKPOINT_TAG} has no DeepSpeed files for rank {rank}")
    for path in files:
        read_shard_file(path)


def all_ranks_ok(engine, ok: bool) -> bool:
    """True when `ok` holds on every rank (one MIN all-reduce): ranks must resume from the same checkpoint."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([int(ok)], device=engine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load_shard(engine, directory: str | Path, optimizer_states: bool = True) -> dict:
    """Restore this rank's shard from `directory`; returns the client state saved with it.
    `optimizer_states=False`: weights and schedule only (ZeRO 1-2 then refill the fp32 masters from the
    weights; `load_full_state` sets them and the moments when the world size changed).

    DeepSpeed only warns and returns (None, None) when it finds nothing, which would silently start the
    run over: here that is an error. Its files are read by `read_shard_file` (no arbitrary unpickling).
    """
    with _weights_only_loads(engine):
        path, client_state = engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_module_strict=False,
            load_optimizer_states=optimizer_states,
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


MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state besides its step count."""


def full_state(engine) -> dict[str, torch.Tensor]:
    """ZeRO 1-2: every trainable parameter's fp32 master weight and AdamW moments, whole (gathered from every
    rank's partition: one all-reduce per tensor, so every rank calls this), on CPU, keyed `param.<name>`,
    `exp_avg.<name>`, `exp_avg_sq.<name>`, plus the optimiser `step`. A checkpoint's world-size-free copy."""
    out = {}
    steps = [float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[f"param.{name}"] = safe_get_full_fp32_param(p).detach().float().cpu()
            for key in MOMENTS:  # before its group's first step AdamW has no moments yet: zeros are the same
                out[f"{key}.{name}"] = _moment(p, key, steps).detach().float().cpu()
    out["step"] = torch.tensor(max(steps, default=0.0), dtype=torch.float64)
    return out


def _moment(p: torch.Tensor, key: str, steps: list[float]) -> torch.Tensor:
    """`key` of `p`'s AdamW state, whole (collective); zeros before the first step."""
    return safe_get_full_optimizer_state(p, key) if steps else torch.zeros_like(p)


def moments_ready(engine) -> bool:
    """Whether every rank holds AdamW moments for every trainable parameter's partition, or none has stepped at
    all (collective: one all-reduce). False when one group has stepped and another not yet (joint training's
    spatial group before its first image batch): the whole copy cannot be gathered then."""
    state = engine.optimizer.optimizer.state
    stepped = any("step" in v for v in state.values())
    ready = not stepped or all(
        m is None or (m.optim_fragment is not None and all(k in m.optim_fragment for k in MOMENTS))
        for p in engine.module.parameters()
        if p.requires_grad
        for m in [getattr(p, "_hp_mapping", None)]
    )
    return all_ranks_ok(engine, ready)


def load_full_state(engine, tensors: dict[str, torch.Tensor]) -> None:
    """ZeRO 1-2, after `load_shard(optimizer_states=False)`: set this rank's partition of the fp32 masters and
    AdamW moments from `full_state`'s tensors, whatever world size wrote them (DeepSpeed #5405)."""
    zero, base = engine.optimizer, engine.optimizer.optimizer
    # A fresh engine's AdamW has no state until its first step: create it, then link DeepSpeed's per-parameter
    # views of it (what ZeRO's first step does lazily).
    for i, group in enumerate(base.param_groups):
        flat = zero.single_partition_of_fp32_groups[i]
        on_device = group.get("fused") or group.get("capturable")
        base.state[flat] = {
            "step": torch.tensor(float(tensors["step"]), device=flat.device if on_device else "cpu"),
            **{key: torch.zeros_like(flat) for key in MOMENTS},
        }
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    # The schedule was restored, but the groups' learning rates live in the optimiser's state, not loaded.
    for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        missing = [k for k in (f"param.{name}", *(f"{m}.{name}" for m in MOMENTS)) if k not in tensors]
        if missing:
            raise CheckpointError(f"the checkpoint's full optimiser state lacks {missing}")
        safe_set_full_fp32_param(p, tensors[f"param.{name}"].to(p.device))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, tensors[f"{key}.{name}"].to(p.device), key)
        with torch.no_grad():
            p.copy_(tensors[f"param.{name}"].to(p.dtype))  # the working (bf16) weights from the masters
