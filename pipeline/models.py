"""The pretrained models curation, training and evaluation share: open_clip (and the one CLIP embedding
rule), the LAION aesthetic head, the base's CLIP text encoder, the precision names, and the writer of a Stable
Diffusion directory with the real CLIP BPE tokenizer (offline, from the vocabulary open_clip ships).

Production code loads weights only through these functions (and diffusers' `from_pretrained`), with a
hub id, a named open_clip tag or a local path. The tiny model zoo (`fixtures.zoo`) is just another
local path, so tests exercise exactly the code a user runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.raysession import LOCAL_DIR

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
"""Precision names of every config (`fp16` / `float16`, ...) -> torch dtypes."""


def torch_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype of a precision name; 'auto' is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}, expected 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[name]


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

    if model.startswith(LOCAL_DIR) and not Path(model[len(LOCAL_DIR) :]).is_dir():
        raise FileNotFoundError(f"open_clip model directory not found: {model}")
    clip, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=pretrained or None, device=device
    )
    tokenizer = open_clip.get_tokenizer(model)
    return clip.eval().requires_grad_(False), preprocess, tokenizer


@torch.no_grad()
def clip_image_embeds(
    clip, preprocess, frames: np.ndarray, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """L2-normalised CLIP embeddings (N, D), float32, of uint8 frames (N, H, W, 3) through CLIP's own
    preprocessing (`preprocess`: resize the short side, centre crop, normalise). Curation's CLIP score and
    aesthetic score and evaluation's CLIPSIM all embed frames here."""
    from PIL import Image

    x = torch.stack([preprocess(Image.fromarray(frame)) for frame in frames]).to(device)  # (N, 3, S, S)
    img = clip.encode_image(x).float()
    return img / img.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_text_embeds(clip, tokenizer, texts: list[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised CLIP text embeddings (N, D), float32."""
    txt = clip.encode_text(tokenizer(texts).to(device)).float()
    return txt / txt.norm(dim=-1, keepdim=True)


class TextEncoder:
    """The base's frozen CLIP text encoder and tokenizer: captions -> (B, 77, D) last hidden states, as SD
    conditions on. The one place it is loaded: curation (precomputed prompt embeddings), training (stores
    without them) and sampling (prompts)."""

    def __init__(self, tokenizer, model, device: torch.device | str):
        self.device = torch.device(device)
        self.tokenizer, self.model = tokenizer, model.requires_grad_(False).eval().to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        device: torch.device | str,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TextEncoder:
        """`tokenizer/` and `text_encoder/` of a diffusers SD directory or hub id."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision)
        model = CLIPTextModel.from_pretrained(
            pretrained, subfolder="text_encoder", revision=revision, dtype=dtype
        )
        return cls(tokenizer, model, device)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.model(ids)[0]  # (B, 77, D) in the model's dtype


def write_clip_tokenizer_files(out: Path) -> None:
    """vocab.json + merges.txt of OpenAI CLIP's BPE, from the vocabulary file open_clip ships.

    Same construction as `open_clip.tokenizer.SimpleTokenizer`, so both tokenizers agree token for
    token (tested).
    """
    import gzip
    import json

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def clip_tokenizer(directory: Path, pad_token: str = "<|endoftext|>"):
    """A transformers `CLIPTokenizer` of the real CLIP BPE (files written to `directory`), 77 positions, padded with
    `pad_token` (SD 1.5: `<|endoftext|>`, SD 2.1: `!`)."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(directory)
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def save_sd_directory(
    out: Path, vae, text_encoder, unet, scheduler, pad_token: str = "<|endoftext|>"
) -> Path:
    """`out` as a Stable Diffusion directory (`vae/`, `text_encoder/`, `tokenizer/`, `unet/`, `scheduler/`,
    `model_index.json`) with the real CLIP BPE tokenizer (SD 1.5 pads with `<|endoftext|>`, SD 2.1 with `!`)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = clip_tokenizer(Path(out) / "tokenizer", pad_token)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return Path(out)
