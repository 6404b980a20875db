"""HARIVO's loss terms (eq. 1-5) as small pure functions, plus the negative queue of L_DC.

    L_all = L_simple + lambda_TRS L_TRS + lambda_reg L_reg + lambda_DC L_DC            (eq. 5)

Reductions (the paper writes norms without saying how they are normalised; our reading):
- L_simple, L_reg: mean over elements, like diffusers' `F.mse_loss`; L_reg weighted per sample.
- L_TRS: |A^(j) - A^(j-1)| is the L1 distance between the two frames' attention distributions
  (sum over keys), averaged over queries, heads and batch; summed over frames j and layers i (eq. 3).
  Training computes it a chunk of heads x frames at a time, recomputed in the backward
  (`attention_frame_distances`): the (B, F, heads, HW, HW) maps are never all held.
- L_DC: z L2-normalised (cosine similarity); mean over the videos of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.config import LossConfig


def simple_loss(denoised: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L_simple (eq. 1) in x0 units: mean over the batch of weight_b x mean ||D_b - x0_b||^2, with D the model's x0.

    The weight says what is matched (SPEC 10): w = SNR is the epsilon MSE ||eps_hat - eps||^2 (D - x0 =
    -(eps_hat - eps) / sqrt(SNR)), w = SNR + 1 the v MSE, lambda(sigma) EDM's loss (PYoCo eq. 1), min(SNR, gamma)
    min-SNR-gamma; `weight` (B,)."""
    per_sample = (denoised.float() - x0.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (weight.to(per_sample) * per_sample).mean()


def prediction_weight(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The x0-unit weight of a discrete UNet's own MSE: SNR for epsilon, SNR + 1 for v (Salimans & Ho 2022)."""
    return snr if prediction_type == "epsilon" else snr + 1


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) in x0 units, min(SNR, gamma): the epsilon MSE x min(SNR, gamma) / SNR and the
    v MSE x min(SNR, gamma) / (SNR + 1) (diffusers' `train_text_to_image.py --snr_gamma`)."""
    return snr.clamp(max=gamma)


def reg_weight(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """lambda_t = 1 - t / T (HARIVO sec. 3.2): soft near t = T, where the image model's frames disagree."""
    return 1.0 - timesteps.float() / num_train_timesteps


def reg_loss(
    model_pred: torch.Tensor, image_pred: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int
) -> torch.Tensor:
    """L_reg = lambda_t ||f_{M,theta,phi} - f_{M,phi}||^2 (eq. 2): video model vs. its image mode, (B, ...) in."""
    per_sample = (model_pred.float() - image_pred.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (reg_weight(timesteps, num_train_timesteps).to(per_sample.device) * per_sample).mean()


def frame_distances(maps: torch.Tensor) -> torch.Tensor:
    """|A^(j) - A^(j-1)| of one layer's maps (B, F, heads, HW, HW) for j = 2..F: (F-1,), the L1 distance
    between two frames' attention distributions (sum over keys), averaged over batch, heads and queries."""
    diff = (maps[:, 1:] - maps[:, :-1]).float().abs()  # (B, F-1, heads, HW, HW)
    return diff.sum(dim=-1).mean(dim=(0, 2, 3))


def attention_frame_distances(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    upcast_softmax: bool,
    heads_per_chunk: int = 0,
    frames_per_chunk: int = 0,
) -> torch.Tensor:
    """`frame_distances(softmax(q k^T scale))` of one layer, (F-1,), without holding its maps.

    `query`, `key`: (B, F, heads, HW, d). The maps are built a chunk at a time (`heads_per_chunk` heads x
    `frames_per_chunk` frame pairs; 0 = all) and recomputed in the backward (activation checkpointing), so
    the graph keeps q and k, never the (B, F, heads, HW, HW) maps: same value and gradient, peak memory
    one chunk's maps. Each frame's softmax is its own, so windows of frames overlap by one frame.
    """
    f, heads = query.shape[1:3]
    hc = heads_per_chunk or heads
    fc = frames_per_chunk or f - 1

    def chunk_sum(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, f', h', HW, HW)
        probs = scores.float().softmax(dim=-1) if upcast_softmax else scores.softmax(dim=-1)
        return frame_distances(probs) * q.shape[2]  # (f'-1,): summed over this chunk's heads

    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    per_frame = []
    for j0 in range(0, f - 1, fc):
        j1 = min(j0 + fc, f - 1)  # frames j0..j1: the pairs (j0, j0+1) .. (j1-1, j1)
        window = query.new_zeros(j1 - j0, dtype=torch.float32)
        for h0 in range(0, heads, hc):
            q, k = query[:, j0 : j1 + 1, h0 : h0 + hc], key[:, j0 : j1 + 1, h0 : h0 + hc]
            window = window + (checkpoint(chunk_sum, q, k, use_reentrant=False) if grad else chunk_sum(q, k))
        per_frame.append(window)
    return torch.cat(per_frame) / heads


def trs_loss(distances: list[torch.Tensor], reduction: str = "sum") -> torch.Tensor:
    """L_TRS = sum_i sum_{j=2..F} lambda_i |A_i^(j) - A_i^(j-1)|, lambda_i = i / N (eq. 3).

    `distances`: the N decoder self-attention layers' `frame_distances` (each (F-1,)) in forward order.
    `reduction` 'mean' divides the sum by its (F - 1) N terms, so the loss keeps its scale across clip
    lengths and UNet depths (eq. 3 is 'sum').
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"trs_loss reduction must be 'sum' or 'mean', got {reduction!r}")
    if not distances:
        raise ValueError(
            "trs_loss needs at least one decoder self-attention layer; was the forward captured?"
        )
    n = len(distances)
    total = distances[0].new_zeros((), dtype=torch.float32)
    for i, per_frame in enumerate(distances, start=1):
        total = total + (i / n) * per_frame.float().sum()
    if reduction == "mean":
        return total / (n * distances[0].shape[0])
    return total


def decoupled_contrastive_loss(
    z1: torch.Tensor, z2: torch.Tensor, negatives: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """L_DC = -<z1, z2>/tau + log sum_{q in Q} exp(<z1, z_q>/tau) (eq. 4), mean over the batch.

    z1, z2: (B, D) projected positives (two frames of one video); negatives: (Q, D) or (B, Q, D)
    per-sample. The positive is not in the denominator (decoupled contrastive learning). With no
    negatives at all the second term is 0.
    """
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    positive = (z1 * z2).sum(dim=-1) / tau  # (B,)
    if negatives.numel() == 0:
        return (-positive).mean()
    negatives = F.normalize(negatives.float(), dim=-1)
    if negatives.ndim == 2:
        logits = z1 @ negatives.T / tau  # (B, Q)
    else:
        logits = torch.einsum("bd,bqd->bq", z1, negatives) / tau  # (B, Q)
    return (-positive + torch.logsumexp(logits, dim=-1)).mean()


def positive_frames(
    num_videos: int, num_frames: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Two distinct random frame indices per video, (B, 2): HARIVO's positive pair (sec. 3.4)."""
    if num_frames < 2:
        raise ValueError(f"L_DC needs at least 2 frames per video, got {num_frames}")
    device = generator.device if generator is not None else None
    first = torch.randint(0, num_frames, (num_videos,), generator=generator, device=device)
    offset = torch.randint(
        1, num_frames, (num_videos,), generator=generator, device=device
    )  # 0 never: distinct
    return torch.stack([first, (first + offset) % num_frames], dim=1)


class NegativeQueue(nn.Module):
    """FIFO queue of earlier positives' projections z (detached), the negatives Q of L_DC.

    Buffers, so it travels with `state_dict()` and resumes with the run. The fill pointer and count are
    mirrored as Python ints (refreshed on load), so a step never waits on the device to read them.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"negative queue size must be >= 1, got {size}")
        self.register_buffer("items", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._ptr = self._count = 0
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_host())

    def _sync_host(self) -> None:
        self._ptr, self._count = int(self.ptr), int(self.count)  # once per load: the only host read

    def negatives(self) -> torch.Tensor:
        """The filled part, (Q, D) with Q <= size."""
        return self.items[: self._count]

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        """Enqueue (N, D), overwriting the oldest entries once full."""
        size = self.items.shape[0]
        z = z.detach().to(self.items.dtype)[-size:]
        idx = (self._ptr + torch.arange(z.shape[0], device=self.items.device)) % size
        self.items[idx] = z
        self._ptr, self._count = (self._ptr + z.shape[0]) % size, min(size, self._count + z.shape[0])
        self.ptr.fill_(self._ptr)
        self.count.fill_(self._count)


def dc_loss_from_hspace(
    head: nn.Module,
    hspace: torch.Tensor,
    queue: NegativeQueue,
    tau: float = 0.1,
    generator: torch.Generator | None = None,
    in_batch_negatives: bool = True,
) -> torch.Tensor:
    """L_DC on the h-space (B, F, ch, h, w): two random frames per video are the positive pair.

    Negatives: the queue of earlier positives, plus (`in_batch_negatives`, ours) the other videos of this
    batch, whose pairs are also "other videos"; false is eq. 4 as printed (the queue only). Afterwards this
    step's positives enter the queue (HARIVO sec. 3.4).
    """
    b, f = hspace.shape[:2]  # (B, F, ch, h, w)
    pairs = positive_frames(b, f, generator).to(hspace.device)  # (B, 2)
    rows = torch.arange(b, device=hspace.device)
    z1 = head(hspace[rows, pairs[:, 0]])  # (B, D)
    z2 = head(hspace[rows, pairs[:, 1]])  # (B, D)
    queued = queue.negatives().to(z1.dtype)  # (Q, D)
    if not in_batch_negatives:
        loss = decoupled_contrastive_loss(z1, z2, queued, tau)
        queue.push(F.normalize(torch.cat([z1, z2]), dim=-1))
        return loss
    in_batch = torch.stack([z1, z2], dim=1)  # (B, 2, D)
    negatives = [
        torch.cat([queued, in_batch[torch.arange(b, device=hspace.device) != i].reshape(-1, z1.shape[1])])
        for i in range(b)
    ]
    loss = decoupled_contrastive_loss(z1, z2, torch.stack(negatives), tau)  # negatives (B, Q + 2(B-1), D)
    queue.push(F.normalize(torch.cat([z1, z2]), dim=-1))
    return loss


@dataclass
class LossTerms:
    """Each term of eq. 5 (0-d tensors) and their weighted sum; `total` is what to backpropagate."""

    total: torch.Tensor
    simple: torch.Tensor
    reg: torch.Tensor
    trs: torch.Tensor
    dc: torch.Tensor

    def detached(self) -> dict[str, torch.Tensor]:
        """{"loss": ..., "loss_simple": ..., ...} detached for logging (call .item() where a sync is fine)."""
        return {
            "loss": self.total.detach(),
            "loss_simple": self.simple.detach(),
            "loss_reg": self.reg.detach(),
            "loss_trs": self.trs.detach(),
            "loss_dc": self.dc.detach(),
        }


def term_grad_norms(terms: LossTerms, cfg: LossConfig, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """{"grad_<term>": ||d(lambda_k L_k) / d theta||_2} over `params` (the trainable ones) for each term of eq. 5 that
    is on: which term steers the update. One extra backward per term, through the graph `terms.total` keeps."""
    weights = {"simple": 1.0, "reg": cfg.lambda_reg, "trs": cfg.lambda_trs, "dc": cfg.lambda_dc}
    out = {}
    for name, weight in weights.items():
        term = getattr(terms, name)
        if weight == 0 or not term.requires_grad:
            continue
        grads = torch.autograd.grad(weight * term, params, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        out[f"grad_{name}"] = torch.stack(squares).sum().sqrt() if squares else term.new_zeros(())
    return out


def weighted_total(
    simple: torch.Tensor, reg: torch.Tensor, trs: torch.Tensor, dc: torch.Tensor, cfg: LossConfig
) -> LossTerms:
    """L_all = L_simple + lambda_TRS L_TRS + lambda_reg L_reg + lambda_DC L_DC (eq. 5)."""
    total = simple + cfg.lambda_trs * trs + cfg.lambda_reg * reg + cfg.lambda_dc * dc
    return LossTerms(total=total, simple=simple, reg=reg, trs=trs, dc=dc)
