"""The tiny model zoo: seeded, CPU-fast stand-ins saved in the real on-disk formats.

    python -m pipeline.zoo --out runs/tiny-zoo

builds
- `sd/`: a Stable Diffusion directory (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
  `model_index.json`) that `StableDiffusionPipeline.from_pretrained` and each component's
  `from_pretrained(path, subfolder=...)` load exactly like SD 1.5 (or SD 2.1 with `flavor="sd21"`);
- `clip/`: an open_clip model directory (`open_clip_config.json` + safetensors weights) loaded with
  `open_clip.create_model_and_transforms("local-dir:<path>")`;
- `aesthetic/tiny-linearMSE.pth`: an aesthetic MLP state dict with the key layout of LAION's
  `sac+logos+ava1-l14-linearMSE.pth`, sized for the tiny CLIP's embedding width.

The tokenizers are the real CLIP BPE (49,408 tokens) built from the vocabulary open_clip ships
inside its package, so nothing is downloaded. Weights are random (seeded): the zoo exercises the
machinery, it generates nothing meaningful.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ZOO_VERSION = 1
DEFAULT_ZOO_DIR = Path(os.environ.get("T2V_TINY_ZOO", "runs/tiny-zoo"))

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@dataclass(frozen=True)
class ZooPaths:
    root: Path

    @property
    def sd(self) -> Path:
        """diffusers Stable Diffusion directory (SD 1.5 layout)."""
        return self.root / "sd"

    @property
    def sd21(self) -> Path:
        """diffusers Stable Diffusion directory (SD 2.1 layout: v-prediction, linear projections)."""
        return self.root / "sd21"

    @property
    def clip(self) -> str:
        """open_clip model name for the tiny CLIP."""
        return f"local-dir:{self.root / 'clip'}"

    @property
    def aesthetic(self) -> Path:
        return self.root / "aesthetic" / "tiny-linearMSE.pth"

    @property
    def complete_marker(self) -> Path:
        return self.root / f".complete-v{ZOO_VERSION}"


def write_clip_tokenizer_files(out: Path) -> None:
    """vocab.json + merges.txt of OpenAI CLIP's BPE, from the vocabulary file open_clip ships.

    Same construction as `open_clip.tokenizer.SimpleTokenizer`, so both tokenizers agree token for
    token (tested).
    """
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


def build_tiny_sd(out: Path, flavor: str = "sd15", seed: int = 0) -> Path:
    """A tiny Stable Diffusion directory loadable by `StableDiffusionPipeline.from_pretrained`."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if flavor not in ("sd15", "sd21"):
        raise ValueError(f"flavor must be 'sd15' or 'sd21', not {flavor!r}")
    sd21 = flavor == "sd21"
    text_width = 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=(2, 4) if sd21 else 8,
        use_linear_projection=sd21,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    # Four blocks, like SD's VAE, so latents are 4 x H/8 x W/8 as with the real model.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=text_width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=text_width,
            hidden_act="gelu" if sd21 else "quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if sd21 else 49407,
        )
    )
    # vocab.json + merges.txt as in the real SD tokenizer/ folder (save_pretrained adds tokenizer.json).
    tok_dir = out / "tokenizer"
    write_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"),
        str(tok_dir / "merges.txt"),
        pad_token="!" if sd21 else "<|endoftext|>",
        model_max_length=77,
    )
    sched_kwargs = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    if sd21:
        scheduler = DDIMScheduler(
            **sched_kwargs,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
    else:
        scheduler = PNDMScheduler(**sched_kwargs, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
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
    return out


def build_tiny_clip(out: Path, seed: int = 0) -> str:
    """A tiny open_clip model directory; returns its `local-dir:` model name."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {
            "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return f"local-dir:{out}"


def build_tiny_aesthetic(path: Path, embed_dim: int, seed: int = 0) -> Path:
    """An aesthetic-head state dict with the LAION key layout, input width `embed_dim`."""
    from pipeline.models import AestheticMLP

    torch.manual_seed(seed)
    head = AestheticMLP(embed_dim=embed_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


def build_tiny_zoo(root: str | Path = DEFAULT_ZOO_DIR, seed: int = 0) -> ZooPaths:
    """Build every tiny model under `root` (overwriting) and mark it complete."""
    paths = ZooPaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.complete_marker.unlink(missing_ok=True)
    build_tiny_sd(paths.sd, "sd15", seed)
    build_tiny_sd(paths.sd21, "sd21", seed)
    build_tiny_clip(paths.root / "clip", seed)
    build_tiny_aesthetic(paths.aesthetic, TINY_CLIP_CFG["embed_dim"], seed)
    paths.complete_marker.write_text(json.dumps({"version": ZOO_VERSION, "seed": seed}))
    return paths


def ensure_tiny_zoo(root: str | Path = DEFAULT_ZOO_DIR, seed: int = 0) -> ZooPaths:
    """The zoo under `root`, built on first use. Safe when several processes race to build it."""
    import fcntl

    paths = ZooPaths(Path(root))
    if paths.complete_marker.exists():
        return paths
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the loser of the race waits, then finds it built
        if not paths.complete_marker.exists():
            log.info("building the tiny model zoo under %s", paths.root)
            build_tiny_zoo(paths.root, seed)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.zoo", description="Build the tiny model zoo.")
    p.add_argument("--out", default=str(DEFAULT_ZOO_DIR))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = build_tiny_zoo(a.out, a.seed)
    print(
        f"tiny zoo written to {paths.root}:\n  sd: {paths.sd}\n  sd21: {paths.sd21}\n  clip: {paths.clip}\n"
        f"  aesthetic: {paths.aesthetic}"
    )


if __name__ == "__main__":
    main()
