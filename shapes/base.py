"""The shapes world's text-to-image base, laid out as Stable Diffusion 1.5 is (`vae/`, `text_encoder/`, `tokenizer/`,
`unet/`, `scheduler/`), so `model.pretrained=runs/shapes/base` loads it exactly as it loads SD 1.5.

    python -m shapes.base --out runs/shapes/base --clip runs/shapes/clip    # VAE + text encoder + untrained UNet

- VAE: an `AutoencoderKL` in SD's latent layout (4 channels, four blocks: 8x downsampling), trained here on stills
  of the world (L1 + MSE reconstruction, a small KL term); its `scaling_factor` is 1 / std of its latents measured
  on stills, as SD's 0.18215 was.
- Text encoder: the text tower of the world's own open_clip model (`shapes.clip`), converted to a transformers
  `CLIPTextModel` as SD 1.5's is OpenAI CLIP's (`text_encoder_from_open_clip`; the hidden states agree with
  open_clip's to fp32 rounding, tested); the real CLIP BPE tokenizer (offline). Without a CLIP: a seeded random one.
- UNet: `UNET_CONFIG`, written untrained; `training.run` trains it from scratch on an image store
  (`training/configs/shapes_base.yaml`: model.from_scratch, data.image_only, caption dropout for CFG) and
  `install_unet` puts the trained one in place (`shapes.build` runs the stages in order).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shapes.world import sample_still, still_caption

log = logging.getLogger(__name__)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=16,
)
RANDOM_TEXT_WIDTH = 64
SIZE = 64
"""Frame size of the world's videos and stills (the latents are SIZE / 8)."""
CARD_FILE = "shapes_base.json"


def stills(
    n: int, rng: np.random.Generator, size: int = SIZE, split: str = "train"
) -> tuple[torch.Tensor, list[str]]:
    """`n` stills of the world as (n, 3, size, size) in [-1, 1] and their captions (`sample_still`'s split)."""
    frames, captions = [], []
    for _ in range(n):
        scene, frame = sample_still(rng, size, size, split)
        frames.append(frame)
        captions.append(still_caption(scene))
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, captions


def train_vae(
    steps: int = 800, batch_size: int = 16, lr: float = 2e-3, kl_weight: float = 1e-6, seed: int = 0
):
    """An `AutoencoderKL` trained on stills; returns (vae, record with the reconstruction error on held-out stills)."""
    from diffusers import AutoencoderKL

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    vae.train()
    for step in range(steps):
        x, _ = stills(batch_size, rng)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        loss = (y - x).abs().mean() + F.mse_loss(y, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info(
                "vae step %d/%d loss %.4f (%.0fs)", step + 1, steps, loss.item(), time.perf_counter() - t0
            )
    vae.eval()
    with torch.no_grad():
        x, _ = stills(256, np.random.default_rng([seed, 12]), split="val")
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample.clamp(-1, 1)
        err = (y - x).abs().mul(127.5).mean().item()  # mean absolute error in 8-bit levels
        scaling = 1.0 / z.flatten().std().item()
    read = reconstruction_read(x, y)
    vae.register_to_config(scaling_factor=round(scaling, 5))
    record = dict(
        steps=steps,
        batch_size=batch_size,
        heldout_mae_8bit=round(err, 2),
        heldout_read=read,
        scaling_factor=round(scaling, 5),
        seconds=round(time.perf_counter() - t0, 1),
    )
    return vae, record


def text_encoder_from_open_clip(model):
    """A transformers `CLIPTextModel` holding the text tower of open_clip `model` (as SD 1.5 holds OpenAI CLIP's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = model.state_dict()
    width = sd["token_embedding.weight"].shape[1]
    layers = len(model.transformer.resblocks)
    block = model.transformer.resblocks[0]
    act = "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    config = CLIPTextConfig(
        vocab_size=sd["token_embedding.weight"].shape[0],
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=layers,
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=sd["positional_embedding"].shape[0],
        projection_dim=sd["text_projection"].shape[1],
        hidden_act=act,
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    names["attn.out_proj"] = "self_attn.out_proj"
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p, cat in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            q, k, v = sd[src + "attn." + cat].chunk(3, dim=0)
            for name, t in zip("qkv", (q, k, v)):
                out[f"{dst}self_attn.{name}_proj.{p}"] = t
    encoder = CLIPTextModel(config)
    # transformers 4 names the keys text_model.*, transformers 5 drops the prefix from the state dict
    prefixed = any(k.startswith("text_model.") for k in encoder.state_dict())
    out = {(k if prefixed else k.removeprefix("text_model.")): v.clone() for k, v in out.items()}
    missing, unexpected = encoder.load_state_dict(out, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIPTextModel: missing {missing}, unexpected {unexpected}")
    return encoder.eval()


def random_text_encoder(seed: int = 0):
    """A seeded random `CLIPTextModel` (when no world CLIP is given): the UNet learns to read its states."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    w = RANDOM_TEXT_WIDTH
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=w,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()


def reconstruction_read(x: torch.Tensor, y: torch.Tensor) -> dict:
    """How often `shapes.pixels.read_frame` reads the same colour and shape from reconstructions `y` as from the
    originals `x` (both (N, 3, H, W) in [-1, 1]): the VAE must not be what fails the base's check."""
    from shapes.pixels import read_frame

    def to_u8(t: torch.Tensor) -> np.ndarray:
        return ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    same = {"colour": [], "shape": []}
    for a, b in zip(to_u8(x), to_u8(y)):
        ra, rb = read_frame(a), read_frame(b)
        same["colour"].append(ra.colour == rb.colour)
        same["shape"].append(ra.shape == rb.shape)
    return {k: round(float(np.mean(v)), 4) for k, v in same.items()}


def write_base(out: str | Path, vae, text_encoder, seed: int = 0, record: dict | None = None) -> Path:
    """A Stable Diffusion 1.5-layout directory with `vae`, `text_encoder`, the real CLIP tokenizer, SD 1.5's
    scheduler and an untrained UNet (`UNET_CONFIG`, cross-attention as wide as the text encoder)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel

    from pipeline.models import save_sd_directory

    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG, cross_attention_dim=text_encoder.config.hidden_size)
    scheduler = PNDMScheduler(  # SD 1.5's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    scheduler.register_to_config(clip_sample=False)  # as SD 1.5's file: a DDIM made from it must not clip
    save_sd_directory(out, vae, text_encoder, unet, scheduler)
    (out / CARD_FILE).write_text(json.dumps(record or {}, indent=1) + "\n")
    return out


def install_unet(base: str | Path, unet_dir: str | Path) -> None:
    """Replace `base/unet` by the trained UNet in `unet_dir` (a diffusers UNet2DConditionModel directory)."""
    base, unet_dir = Path(base), Path(unet_dir)
    tmp = base / "unet.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(unet_dir, tmp)
    old = base / "unet.old"
    shutil.rmtree(old, ignore_errors=True)
    (base / "unet").rename(old)
    tmp.rename(base / "unet")
    shutil.rmtree(old)


@torch.no_grad()
def check_base(
    base: str | Path, n: int = 64, steps: int = 25, guidance: float = 5.0, seed: int = 0, batch: int = 16
) -> dict:
    """The base's check (issue 18): `n` captions of held-out still combinations (`held_out_still`, never
    trained on) drawn by diffusers' `StableDiffusionPipeline` from `base` as from SD 1.5 (DDIM, CFG), and read
    back by `shapes.pixels.read_frame`: how often the prompt's colour, shape (and both) are the frame's.
    Chance: 1/8 for the colour, 1/3 for the shape."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from shapes.pixels import read_frame

    pipe = StableDiffusionPipeline.from_pretrained(
        str(base), safety_checker=None, requires_safety_checker=False
    )
    # clip_sample off as SD 1.5's scheduler config says: DDIM's default clips x0 to [-1, 1], latents are not
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng([seed, 21])
    scenes = [sample_still(rng, SIZE, SIZE, split="val")[0] for _ in range(n)]
    captions = [still_caption(s) for s in scenes]
    images = []
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(
            captions[i : i + batch],
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=g,
            output_type="np",
        )
        images += [(im * 255).round().astype(np.uint8) for im in out.images]
    rows = []
    for caption, image in zip(captions, images):
        r = read_frame(image)
        rows.append(dict(caption=caption, colour=r.colour, shape=r.shape, background=r.background, iou=r.iou))
    hit = lambda k: float(np.mean([r[k] == getattr(s, k) for r, s in zip(rows, scenes)]))  # noqa: E731
    both = float(np.mean([r["colour"] == s.colour and r["shape"] == s.shape for r, s in zip(rows, scenes)]))
    summary = dict(
        colour=round(hit("colour"), 4),
        shape=round(hit("shape"), 4),
        colour_and_shape=round(both, 4),
        background=round(hit("background"), 4),
        n=n,
        steps=steps,
        guidance=guidance,
        target="colour and shape >= 0.90 (issue 18)",
    )
    return dict(summary=summary, rows=rows)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m shapes.base", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the Stable Diffusion directory to write")
    p.add_argument(
        "--clip", help="the world's open_clip directory (shapes.clip); its text tower is the encoder"
    )
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    vae, record = train_vae(a.vae_steps, seed=a.seed)
    if a.clip:
        from pipeline.models import load_clip

        model, _, _ = load_clip(f"local-dir:{a.clip}", "")
        text_encoder, text = text_encoder_from_open_clip(model), f"open_clip text tower of {a.clip}"
    else:
        text_encoder, text = random_text_encoder(a.seed), "seeded random CLIPTextModel"
    card = {"vae": record, "text_encoder": text, "unet": "untrained (training.run trains it)"}
    write_base(a.out, vae, text_encoder, a.seed, card)
    print(json.dumps(card, indent=1))
    return card


if __name__ == "__main__":
    main()
