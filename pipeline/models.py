"""Loaders for the pretrained models the pipeline uses: open_clip and the LAION aesthetic head.

Production code loads weights only through these functions (and diffusers' `from_pretrained`), with a
hub id, a named open_clip tag or a local path. The tiny model zoo (`pipeline.zoo`) is just another
local path, so tests exercise exactly the code a user runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Hidden widths of the LAION "improved aesthetic predictor" MLP (sac+logos+ava1-l14-linearMSE.pth).
AESTHETIC_HIDDEN = (1024, 128, 64, 16)


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor: MLP on L2-normalised CLIP image embeddings -> score.

    Same module layout as the public `sac+logos+ava1-l14-linearMSE.pth` (keys `layers.{0,2,4,6,7}`),
    so that state dict loads as is; `embed_dim` is 768 for CLIP ViT-L/14.
    """

    def __init__(self, embed_dim: int = 768, hidden: tuple[int, ...] = AESTHETIC_HIDDEN):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.2),
            nn.Linear(h2, h3),
            nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, D) CLIP image embeddings (any norm) -> (N,) aesthetic scores."""
        x = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        return self.layers(x).squeeze(-1)


def load_aesthetic_head(path: str | Path, device: str | torch.device = "cpu") -> AestheticMLP:
    """Load an aesthetic head from a state-dict file (the LAION `.pth` layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head not found: {path} (download sac+logos+ava1-l14-linearMSE.pth from "
            "github.com/christophschuhmann/improved-aesthetic-predictor, or build the tiny zoo)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    missing = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")} - set(state)
    if missing:
        raise ValueError(f"{path} is not an aesthetic-head state dict: missing keys {sorted(missing)}")
    hidden = tuple(state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6))
    head = AestheticMLP(embed_dim=state["layers.0.weight"].shape[1], hidden=hidden)  # type: ignore[arg-type]
    head.load_state_dict(state)
    return head.eval().requires_grad_(False).to(device)


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) from open_clip.

    `model` is an open_clip name ("ViT-L-14", with `pretrained` a tag such as "openai" or a
    checkpoint file), "hf-hub:org/repo", or "local-dir:/path" (open_clip_config.json + weights).
    """
    import open_clip

    if model.startswith("local-dir:") and not Path(model[len("local-dir:") :]).is_dir():
        raise FileNotFoundError(f"open_clip model directory not found: {model}")
    clip, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=pretrained or None, device=device
    )
    tokenizer = open_clip.get_tokenizer(model)
    return clip.eval().requires_grad_(False), preprocess, tokenizer
