"""Video metrics usable from the CLI and from Ray Tune objectives.

- `frechet_distance` / `fvd`: Frechet distance between Gaussian fits of features (FVD with I3D
  features, StyleGAN-V protocol; the I3D TorchScript detector loads from a local path);
- `clipsim`: mean open_clip cosine similarity of each frame with its prompt (CLIPSIM);
- `frame_consistency`: mean CLIP cosine similarity of consecutive frames;
- `latent_flicker`: mean absolute change between consecutive latent frames, relative to the latents'
  spread (lower is steadier).
Videos are float tensors in [0, 1], `(B, F, 3, H, W)`; latents `(B, C, F, H, W)`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def gaussian_stats(features: np.ndarray | torch.Tensor, biased: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of `(N, D)` features, float64. `biased` (divide by N, StyleGAN-V's FeatureStats
    and SPEC section 8) is the FVD protocol; False divides by N - 1."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, bias=biased)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """`||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))` (Heusel et al. 2017, eq. for FID).

    The trace of the matrix square root is computed as `sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`, which
    has the same eigenvalues as `S1 S2` but is symmetric, so `eigh` applies and no complex parts appear.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    vals, vecs = np.linalg.eigh(sigma1)
    sqrt1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T  # S1^(1/2)
    middle = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@dataclass
class FVDResult:
    """An FVD score and the protocol it was measured with (scores are only comparable under one)."""

    fvd: float
    num_videos_real: int
    num_videos_fake: int
    frames: int
    height: int
    width: int
    fps: float | None
    detector: str
    detector_sha256: str = ""
    """Checksum of the feature network's file: scores from two I3D files are not comparable."""
    covariance: str = "biased"
    min_videos: int = 2048
    """The protocol's N; `below_min_videos` records a score computed on fewer (eval.allow_few_videos)."""
    below_min_videos: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (the feature network's identity in every FVD record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The I3D feature detector as a TorchScript file (StyleGAN-V's `i3d_torchscript.pt`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D detector not found: {path} (StyleGAN-V's i3d_torchscript.pt; download it once and point "
            "eval.i3d_path at it)"
        )
    return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def i3d_features(detector: torch.nn.Module, videos: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """I3D features of videos `(B, F, 3, H, W)` in [0, 1] (StyleGAN-V: input in [-1, 1], `(B, 3, F, H, W)`)."""
    feats = []
    for chunk in videos.split(batch_size):
        x = chunk.permute(0, 2, 1, 3, 4) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
        feats.append(detector(x, rescale=False, resize=True, return_features=True).cpu().numpy())
    return np.concatenate(feats)


def fvd(
    detector: torch.nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    fps: float | None = None,
    detector_name: str = "i3d",
    detector_sha256: str = "",
    min_videos: int = 2048,
    allow_few: bool = False,
) -> FVDResult:
    """FVD between two video sets `(N, F, 3, H, W)` in [0, 1] (biased covariance), with the protocol recorded.

    Fewer than `min_videos` on either side is refused (I3D's 400-d features need N well above 400 for a
    non-singular covariance; StyleGAN-V / PYoCo: 2048) unless `allow_few`, which is recorded and warned about."""
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real and fake videos differ in (F, 3, H, W): {real.shape[1:]} vs {fake.shape[1:]}")
    few = min(len(real), len(fake)) < min_videos
    if few and not allow_few:
        raise ValueError(
            f"FVD on {len(real)} real and {len(fake)} generated videos: the protocol needs eval.min_videos="
            f"{min_videos} of each; set eval.allow_few_videos=true to compute it anyway (recorded in the report)"
        )
    if few:
        log.warning(
            "FVD on %d real / %d generated videos, below the protocol's %d", len(real), len(fake), min_videos
        )
    score = frechet_distance(
        *gaussian_stats(i3d_features(detector, real)), *gaussian_stats(i3d_features(detector, fake))
    )
    _, frames, _, height, width = real.shape
    return FVDResult(
        score,
        len(real),
        len(fake),
        frames,
        height,
        width,
        fps,
        detector_name,
        detector_sha256,
        min_videos=min_videos,
        below_min_videos=few,
    )


def _frame_embeds(clip, preprocess, videos: torch.Tensor) -> torch.Tensor:
    """(B, F, D) CLIP embeddings of videos (B, F, 3, H, W) in [0, 1], as curation embeds frames."""
    from pipeline.models import clip_image_embeds

    b, f = videos.shape[:2]
    frames = (videos.flatten(0, 1).float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B F, 3, H, W)
    device = next(clip.parameters()).device
    return clip_image_embeds(clip, preprocess, frames.permute(0, 2, 3, 1).cpu().numpy(), device).view(
        b, f, -1
    )


@torch.no_grad()
def clipsim(clip, preprocess, tokenizer, videos: torch.Tensor, prompts: list[str]) -> float:
    """CLIPSIM: mean over videos and frames of cos(CLIP(frame), CLIP(prompt)); videos `(B, F, 3, H, W)`.

    Frames go through CLIP's own preprocessing (`preprocess` of `pipeline.models.load_clip`), the same
    embedding function as curation's CLIP score."""
    from pipeline.models import clip_text_embeds

    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts for {len(videos)} videos")
    img = _frame_embeds(clip, preprocess, videos)  # (B, F, D)
    txt = clip_text_embeds(clip, tokenizer, prompts, img.device)  # (B, D)
    return float((img * txt[:, None]).sum(-1).mean())


@torch.no_grad()
def frame_consistency(clip, preprocess, videos: torch.Tensor) -> float:
    """Mean CLIP cosine similarity of consecutive frames; videos `(B, F, 3, H, W)`."""
    img = _frame_embeds(clip, preprocess, videos)  # (B, F, D)
    return float((img[:, 1:] * img[:, :-1]).sum(-1).mean())


def latent_flicker(latents: torch.Tensor) -> float:
    """Mean |z_f - z_(f-1)| over a latent video `(B, C, F, H, W)`, divided by the latents' std."""
    if latents.dim() != 5 or latents.shape[2] < 2:
        raise ValueError(f"latents must be (B, C, F>=2, H, W), got {tuple(latents.shape)}")
    x = latents.float()
    return float((x[:, :, 1:] - x[:, :, :-1]).abs().mean() / x.std().clamp_min(1e-12))
