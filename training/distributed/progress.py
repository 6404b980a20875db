"""What the training loop reports between optimiser steps: a meter of loss terms and timings, which of
log / validate / checkpoint a step is due for, and rank 0's progress line and TensorBoard scalars."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from training.config import TrainConfig

TERMS = ("loss_simple", "loss_reg", "loss_trs", "loss_dc", "loss_temporal_off")
"""The loss terms of eq. 5 the progress line shows next to L_all, and L_simple of the steps without the temporal
layers (loss.temporal_off_every; its mean over those steps alone). TensorBoard gets every metric."""


@dataclass
class Due:
    """What optimiser step `step` does after its update (the last step does everything)."""

    log: bool
    validate: bool
    checkpoint: bool

    @classmethod
    def at(cls, step: int, cfg: TrainConfig) -> Due:
        run, last = cfg.run, step == cfg.optim.max_steps
        return cls(
            log=step % run.log_every == 0,
            validate=last or (run.val_every > 0 and step % run.val_every == 0),
            checkpoint=last or step % run.checkpoint_every == 0,
        )

    @property
    def any(self) -> bool:
        return self.log or self.validate or self.checkpoint


class StepLogger:
    """Sums detached loss terms and timings between reports (`.item()` only when reporting: a sync point),
    and on rank 0 prints the progress line and writes TensorBoard scalars."""

    def __init__(self, cfg: TrainConfig, rank: int, tensorboard_dir: str | None, start_step: int):
        self.cfg, self.rank, self.start_step = cfg, rank, start_step
        self.started = time.perf_counter()
        self.writer = None
        if rank == 0 and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir, purge_step=start_step)
        self._reset()

    def _reset(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # micro-batches that reported each term
        self.grad_norms: dict[str, torch.Tensor] = {}
        self.batches = self.samples = 0
        self.data_s = self.step_s = 0.0

    def add(self, terms: dict[str, torch.Tensor], samples: int, data_s: float, step_s: float) -> None:
        """One micro-batch: its detached loss terms, samples over all ranks, data wait and compute time."""
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.batches += 1
        self.samples += samples
        self.data_s += data_s
        self.step_s += step_s

    def add_grad_norms(self, norms: dict[str, torch.Tensor]) -> None:
        """Per-term gradient norms of a measured micro-batch (`losses.term_grad_norms`); the latest is reported."""
        self.grad_norms.update(norms)

    def metrics(self, step: int, epoch: int, lr: float, device: torch.device) -> dict[str, float]:
        """Means since the last report (then reset), throughput, and where the run is."""
        n = max(self.batches, 1)
        # Each term over the micro-batches that reported it (loss_temporal_off: the off steps' alone).
        out = {k: float(v) / self.counts[k] for k, v in self.terms.items()}
        out.update({k: float(v) for k, v in self.grad_norms.items()})
        wall = self.data_s + self.step_s
        out["samples_per_s"] = self.samples / wall if wall else 0.0
        out["step_time_s"] = wall / n * self.cfg.optim.grad_accum
        out["data_wait_frac"] = self.data_s / wall if wall else 0.0
        out.update(step=step, epoch=epoch, lr=lr, peak_mem_mb=peak_memory_mb(device))
        self._reset()
        return out

    def log(self, metrics: dict[str, float]) -> None:
        """Rank 0: the progress line (step / total, loss, val, lr, throughput, ETA) and TensorBoard."""
        if self.rank != 0:
            return
        step, total = int(metrics["step"]), self.cfg.optim.max_steps
        eta = (time.perf_counter() - self.started) / max(step - self.start_step, 1) * (total - step)
        val = f" val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        # Each term's own magnitude (unweighted), so a loss that dominates L_all is visible at a glance.
        terms = " ".join(f"{k[5:]} {metrics[k]:.3g}" for k in TERMS if k in metrics)
        norms = " ".join(f"{k[5:]} {v:.3g}" for k, v in metrics.items() if k.startswith("grad_"))
        terms += f"; |grad| {norms}" if norms else ""
        say(
            f"step {step}/{total} loss {metrics.get('loss', math.nan):.4f} ({terms}){val} "
            f"lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s "
            f"data-wait {metrics['data_wait_frac']:.0%} ETA {format_eta(eta)}"
        )
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, float) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def say(line: str) -> None:
    """One line on the worker's stdout, which Ray streams to the driver. Not `print`: Ray Train patches it
    to write the stream *and* its logger, so the driver shows every printed line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once `device` has finished its queued work: CUDA runs asynchronously, so an
    unsynchronised timer measures kernel launches, not the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
