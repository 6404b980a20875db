"""The shapes world's I3D: a small video network trained on rendered clips (and, in `make shapes`, half of them
through the world's VAE and back) to predict each scene label.

    python -m shapes.evaluator --out runs/shapes/evaluator          # 10k clips, 1500 steps; prints held-out accuracy

Its uses (issue 18): the heads say whether a generated video shows its prompt (motion and attribute accuracy
against the prompt's scene); the penultimate video features are a domain FVD's features and the per-frame
features a domain FID's (visual quality of frames, JVID). It is saved as TorchScript with a card, as a real
I3D is distributed (`evaluator.pt` + `evaluator.json`: the file's SHA-256, the label vocabulary, the input
protocol and the held-out accuracy), and `load` refuses a file whose checksum differs.

Input: videos `(B, F, 3, H, W)` in [0, 1], any F >= 2 and size; the network takes `FRAMES` evenly spaced
frames resized to `SIZE` x `SIZE` itself, so generated and real clips go through one protocol.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shapes.world import ATTRIBUTES, held_out, labels, render, sample_scene
from training.evaluation.metrics import file_sha256

log = logging.getLogger(__name__)

FRAMES, SIZE = 8, 64
FRAME_ATTRIBUTES = ("shape", "colour", "background")
"""What the per-frame head predicts (colour only on clips whose colour does not change)."""
MODEL_FILE, CARD_FILE = "evaluator.pt", "evaluator.json"


class ShapesEvaluator(nn.Module):
    """Frame encoder (2D convs, shared over frames) -> temporal convs -> video features -> one head per label."""

    def __init__(self, width: int = 32, frame_dim: int = 128, video_dim: int = 256):
        super().__init__()
        self.frames, self.size = FRAMES, SIZE  # attributes, so TorchScript keeps them
        w = width
        self.frame_net = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1),  # 64 -> 32
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1),  # -> 16
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1),  # -> 8
            nn.GELU(),
            nn.AdaptiveAvgPool2d(4),  # a 4x4 map keeps where the shape is
            nn.Flatten(),
            nn.Linear(2 * w * 16, frame_dim),
            nn.GELU(),
        )
        self.time_net = nn.Sequential(
            nn.Conv1d(frame_dim, frame_dim, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(frame_dim, frame_dim, 3, padding=1),
            nn.GELU(),
        )
        self.video_net = nn.Sequential(nn.Flatten(), nn.Linear(frame_dim * FRAMES, video_dim), nn.GELU())
        self.video_heads = nn.ModuleDict({k: nn.Linear(video_dim, len(v)) for k, v in ATTRIBUTES.items()})
        self.frame_heads = nn.ModuleDict(
            {k: nn.Linear(frame_dim, len(ATTRIBUTES[k])) for k in FRAME_ATTRIBUTES}
        )

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """videos (B, F, 3, H, W) in [0, 1] -> {label: logits (B, classes), 'frame.<label>': (B, FRAMES, classes),
        'features': (B, video_dim), 'frame_features': (B, FRAMES, frame_dim)}."""
        b, f = videos.shape[0], videos.shape[1]
        pick = torch.linspace(0, f - 1, self.frames, device=videos.device).round().long()
        x = videos[:, pick].flatten(0, 1)  # (B * FRAMES, 3, H, W)
        x = F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
        )
        frames = self.frame_net(x * 2 - 1).view(b, self.frames, -1)  # (B, FRAMES, frame_dim)
        video = self.video_net(self.time_net(frames.transpose(1, 2)))  # (B, video_dim)
        out: dict[str, torch.Tensor] = {"features": video, "frame_features": frames}
        for name, head in self.video_heads.items():
            out[name] = head(video)
        for name, head in self.frame_heads.items():
            out["frame." + name] = head(frames)
        return out


def make_clips(
    n: int, seed: int, frames: int = FRAMES, size: int = SIZE, split: str = "any"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` random scenes rendered as videos (n, frames, 3, size, size) uint8 and their labels {label: (n,)};
    `split` 'train' / 'val' keeps only scenes outside / inside the `held_out` combinations."""
    rng = np.random.default_rng(seed)
    videos = np.empty((n, frames, size, size, 3), np.uint8)
    y: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
    for i in range(n):
        scene = sample_scene(rng)
        while split != "any" and held_out(scene) != (split == "val"):
            scene = sample_scene(rng)
        videos[i] = render(scene, frames, size, size)
        for k, v in labels(scene).items():
            y[k].append(v)
    return torch.from_numpy(videos).permute(0, 1, 4, 2, 3), {k: torch.tensor(v) for k, v in y.items()}


def augment(videos: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What a generated video differs by from a rendered one: noise, blur, contrast and brightness shifts.
    videos (B, F, 3, H, W) float in [0, 1]."""
    b = videos.shape[0]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    blurred = F.avg_pool2d(videos.flatten(0, 1), 3, 1, 1, count_include_pad=False).view_as(videos)
    videos = torch.where((u(b) < 0.3).view(b, 1, 1, 1, 1), blurred, videos)
    gain, shift = 0.85 + 0.3 * u(b, 1, 1, 1, 1), 0.1 * (u(b, 1, 1, 1, 1) - 0.5)
    noise = 0.08 * u(b, 1, 1, 1, 1) * torch.randn(videos.shape, generator=g)
    return (videos * gain + shift + noise).clamp(0, 1)


def loss_of(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every video head, plus the frame heads (colour only where it stays the same)."""
    loss = sum(F.cross_entropy(out[k], y[k]) for k in ATTRIBUTES)
    still = y["motion"] != ATTRIBUTES["motion"].index("changes colour")
    for k in FRAME_ATTRIBUTES:
        logits, target = out["frame." + k], y[k][:, None].expand(-1, FRAMES)
        keep = (
            still[:, None].expand(-1, FRAMES) if k == "colour" else torch.ones_like(target, dtype=torch.bool)
        )
        loss = loss + F.cross_entropy(logits[keep], target[keep]) / len(FRAME_ATTRIBUTES)
    return loss


@torch.no_grad()
def accuracy(
    model: nn.Module, videos: torch.Tensor, y: dict[str, torch.Tensor], batch: int = 128
) -> dict[str, float]:
    """Held-out accuracy of each video head on uint8 `videos` (N, F, 3, H, W)."""
    model.eval()
    hits = {k: 0 for k in ATTRIBUTES}
    for i in range(0, len(videos), batch):
        out = model(videos[i : i + batch].float() / 255)
        for k in ATTRIBUTES:
            hits[k] += int((out[k].argmax(1) == y[k][i : i + batch]).sum())
    return {k: hits[k] / len(videos) for k in ATTRIBUTES}


def vae_round_trip(vae_dir: str | Path, chunk: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 videos (N, F, 3, H, W) -> the same through the diffusers `AutoencoderKL` at `vae_dir` (encode, the
    latent distribution's mode, decode): what the world's decoder shows of a clip whose latents are exactly right."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()

    @torch.no_grad()
    def codec(videos: torch.Tensor) -> torch.Tensor:
        x = videos.flatten(0, 1)
        out = torch.empty_like(x)
        for i in range(0, len(x), chunk):
            z = vae.encode(x[i : i + chunk].float() / 127.5 - 1).latent_dist.mode()
            out[i : i + chunk] = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
        return out.view_as(videos)

    return codec


def train(
    clips: int = 10_000,
    steps: int = 1500,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    val_clips: int = 1000,
    codec: Callable[[torch.Tensor], torch.Tensor] | None = None,
    decoded_fraction: float = 0.5,
) -> tuple[ShapesEvaluator, dict]:
    """A trained evaluator and its record: accuracy on `val_clips` clips of the `held_out` combinations.

    `codec` (e.g. `vae_round_trip` of the world's VAE): the first `decoded_fraction` of the training clips are
    replaced by their round trip, so the heads read shapes as the decoder draws them (through the world's 4x VAE
    alone the heads of an evaluator trained on rendered clips called 81 of 87 held-out circles squares:
    pilots.md J2); the record then also holds the accuracy on the round trip of the held-out clips."""
    torch.manual_seed(seed)
    videos, y = make_clips(clips, seed, split="train")
    val_videos, val_y = make_clips(val_clips, seed + 1_000_003, split="val")
    n_decoded = round(clips * decoded_fraction) if codec else 0
    t_codec = time.perf_counter()
    if n_decoded:
        videos[:n_decoded] = codec(videos[:n_decoded])
    codec_s = time.perf_counter() - t_codec
    model = ShapesEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))
    )
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        idx = torch.randint(0, clips, (batch,), generator=g)
        out = model(augment(videos[idx].float() / 255, g))
        loss = loss_of(out, {k: v[idx] for k, v in y.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log.info(
                "evaluator step %d/%d loss %.4f [%.0f s]",
                step + 1,
                steps,
                loss.item(),
                time.perf_counter() - t0,
            )
    acc = accuracy(model, val_videos, val_y)
    record = dict(
        heldout_accuracy=acc,
        **({"heldout_accuracy_decoded": accuracy(model, codec(val_videos), val_y)} if codec else {}),
        train=dict(
            clips=clips,
            steps=steps,
            batch=batch,
            lr=lr,
            seed=seed,
            val_clips=val_clips,
            decoded_clips=n_decoded,
        ),
        heldout="val clips: the held_out tenth of (shape, colour, background, motion) combinations",
        seconds=round(time.perf_counter() - t0, 1),  # training and the held-out accuracies
        codec_s=round(codec_s, 1),  # the training clips' round trip, before them
    )
    return model.eval(), record


def save(model: ShapesEvaluator, out: str | Path, record: dict) -> Path:
    """`out/evaluator.pt` (TorchScript) and `out/evaluator.json` (checksum, vocabulary, protocol, record)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model.eval()).save(str(out / MODEL_FILE))
    card = dict(
        sha256=file_sha256(out / MODEL_FILE),
        attributes={k: list(v) for k, v in ATTRIBUTES.items()},
        protocol=dict(
            frames=FRAMES, size=SIZE, input="(B, F, 3, H, W) in [0, 1]; FRAMES evenly spaced frames"
        ),
        **record,
    )
    (out / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    return out


def load(
    path: str | Path, sha256: str | None = None, device: str = "cpu"
) -> tuple[torch.jit.ScriptModule, dict]:
    """(evaluator, card) from a directory `save` wrote; refused if the file's SHA-256 differs from the card's or
    from `sha256` (the checksum a user pins, as for a downloaded I3D)."""
    path = Path(path)
    card = json.loads((path / CARD_FILE).read_text())
    actual = file_sha256(path / MODEL_FILE)
    for expected, what in ((card["sha256"], "its card"), (sha256, "the pinned checksum")):
        if expected is not None and actual != expected:
            raise ValueError(
                f"{path / MODEL_FILE}: SHA-256 {actual} differs from {what} ({expected}): refused"
            )
    if card["attributes"] != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ValueError(f"{path / CARD_FILE}: its label vocabulary is not this shapes world's")
    return torch.jit.load(str(path / MODEL_FILE), map_location=device).eval(), card


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m shapes.evaluator", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for evaluator.pt + evaluator.json")
    p.add_argument("--clips", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vae", help="a diffusers AutoencoderKL dir: half the training clips go through it and back"
    )
    a = p.parse_args(argv)
    if a.vae and not (Path(a.vae) / "config.json").is_file():
        p.error(
            f"--vae {a.vae}: not a diffusers AutoencoderKL directory (no config.json), e.g. runs/shapes/base/vae"
        )
    model, record = train(a.clips, a.steps, seed=a.seed, codec=vae_round_trip(a.vae) if a.vae else None)
    save(model, a.out, record)
    print(json.dumps({"out": a.out, **record}, indent=1))
    return record


if __name__ == "__main__":
    main()
