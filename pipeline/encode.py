"""Encode stage: decoded frames -> Stable Diffusion VAE latents (x vae.config.scaling_factor), per view.

Frames of a batch of clips are folded into one frame batch `(N F) 3 H W`, encoded `frames_per_batch`
at a time, and unfolded to `(N, F, C, H/8, W/8)`. `latent_dist` "mean" stores the posterior mean;
"sample" draws with a generator seeded by (key, clip) so re-runs give the same latents. Optionally the SD
text encoder's last hidden states of the caption are stored as `prompt_embeds` (77 x D).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np

from pipeline import stream
from pipeline.config import EncodeConfig
from pipeline.filters import frames_of
from pipeline.schema import Reason, Stage


def model_info(cfg: EncodeConfig) -> dict:
    """What the output metadata records about the VAE (and text encoder), without loading weights.

    Local directory: sha256 over the VAE folder's files. Hub id: the resolved commit of its config.
    The configs are read as JSON files: importing diffusers / transformers to read them would cost the driver
    about 4 CPU-seconds before Ray starts (`_vae_config`, `_text_config`).
    """
    local = Path(cfg.model)
    revision, digest = "", hashlib.sha256()
    if local.is_dir():
        folder = local / cfg.vae_subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"encode.model {cfg.model} has no {cfg.vae_subfolder}/ folder")
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f.relative_to(folder).as_posix().encode())
            digest.update(f.read_bytes())
        config_file = folder / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(
            hf_hub_download(cfg.model, f"{cfg.vae_subfolder}/config.json", revision=cfg.revision or None)
        )
        revision = path.parent.parent.name  # .../snapshots/<commit>/vae/config.json
        digest.update(path.read_bytes())
        config_file = path
    config = _vae_config(cfg, config_file)
    info = {
        "vae": cfg.model,
        "vae_revision": revision,
        "vae_hash": digest.hexdigest(),
        "scaling_factor": float(
            config["scaling_factor"] if "scaling_factor" in config else _default_scaling_factor()
        ),
        "latent_channels": int(config["latent_channels"]),
        "downsample": 2 ** (len(config["block_out_channels"]) - 1),
        "prompt_embeds_shape": None,
    }
    if cfg.text_embeds:
        info["prompt_embeds_shape"] = _text_config(cfg)
    return info


def _read_json(path: Path) -> dict | None:
    """A config file's JSON object; None when it is missing or not a JSON object (the library then says why)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _vae_config(cfg: EncodeConfig, config_file: Path) -> dict:
    """The VAE's config.json as `AutoencoderKL.load_config` returns it (the same file, read as JSON); a missing or
    damaged one goes to diffusers, which finds another or raises as it always did."""
    config = _read_json(config_file)
    if config is not None:
        return config
    from diffusers import AutoencoderKL

    return AutoencoderKL.load_config(cfg.model, subfolder=cfg.vae_subfolder, revision=cfg.revision or None)


def _text_config(cfg: EncodeConfig) -> list[int]:
    """[positions, width] of the text encoder's last hidden states, from its config.json when that is a CLIP text
    model's declaring both (SD 1.5 / 2.1); anything else goes to transformers' `AutoConfig`, as before."""
    keys = ("max_position_embeddings", "hidden_size")
    if Path(cfg.model).is_dir():
        config = _read_json(Path(cfg.model) / "text_encoder" / "config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(cfg.model, "text_encoder/config.json", revision=cfg.revision or None)
            config = _read_json(Path(path))
        except Exception:  # transformers gets to say what is wrong
            config = None
    if (
        config
        and config.get("model_type") == "clip_text_model"
        and all(type(config.get(k)) is int for k in keys)
    ):
        return [config[k] for k in keys]
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(cfg.model, subfolder="text_encoder", revision=cfg.revision or None)
    return [int(text.max_position_embeddings), int(text.hidden_size)]


def _default_scaling_factor() -> float:
    """diffusers' own default, for old VAE configs that do not spell it out (imports diffusers: only then)."""
    import inspect

    from diffusers import AutoencoderKL

    return inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default


def _clip_seed(key: str, clip_index: int) -> int:
    return zlib.crc32(f"{key}#{clip_index}".encode()) & 0x7FFFFFFF


class VaeEncoder(stream.RowStage):
    """Ray Data actor: `frames__<view>` -> `latents__<view>` ((F, C, h, w) bytes); frames are dropped."""

    name = Stage.ENCODE

    def added_columns(self) -> list[str]:
        cols = [f"latents__{v}" for v in self.cfg.views]
        return cols + (["prompt_embeds"] if self.cfg.encode.text_embeds else []) + [f"t_{self.name}"]

    def dropped_columns(self) -> tuple[str, ...]:
        return ("frames__",)

    def setup(self) -> None:
        import torch
        from diffusers import AutoencoderKL

        from pipeline.models import TextEncoder, torch_dtype

        e = self.cfg.encode
        self.device = "cuda" if e.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(e.torch_threads)
        self.dtype = torch_dtype(e.compute_dtype, self.device)
        revision = e.revision or None
        self.vae = (
            AutoencoderKL.from_pretrained(
                e.model, subfolder=e.vae_subfolder, revision=revision, torch_dtype=self.dtype
            )
            .to(self.device)
            .eval()
        )
        self.scaling_factor = self.vae.config.scaling_factor
        self.text_encoder = (
            TextEncoder.from_pretrained(e.model, self.device, revision, self.dtype) if e.text_embeds else None
        )

    def encode_frames(self, frames: np.ndarray, seeds: list[int], per_clip: int) -> np.ndarray:
        """(N*F, H, W, 3) uint8 -> (N*F, C, H/8, W/8) float32 latents x scaling_factor."""
        import torch

        e, out = self.cfg.encode, []
        with torch.inference_mode():
            for i in range(0, len(frames), e.frames_per_batch):
                x = torch.from_numpy(frames[i : i + e.frames_per_batch]).to(self.device)
                x = x.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
                dist = self.vae.encode(x).latent_dist
                out.append(
                    dist.mean.float().cpu()
                    if e.latent_dist == "mean"
                    else torch.stack([dist.mean.float().cpu(), dist.std.float().cpu()])
                )
        if e.latent_dist == "mean":
            z = torch.cat(out)
        else:  # one generator per clip, so a clip's latents do not depend on its batch
            mean, std = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
            noise = torch.cat(
                [
                    torch.randn(
                        mean[j * per_clip : (j + 1) * per_clip].shape,
                        generator=torch.Generator().manual_seed(s),
                    )
                    for j, s in enumerate(seeds)
                ]
            )
            z = mean + std * noise
        return (z * self.scaling_factor).numpy()

    def encode_rows(self, rows: list[dict]) -> None:

        e = self.cfg.encode
        for view, v in self.cfg.views.items():
            by_len: dict[int, list[dict]] = {}  # images (1 frame) and videos do not share a frame batch
            for row in rows:
                by_len.setdefault(len(row[f"frames__{view}"]) // (v.height * v.width * 3), []).append(row)
            for f, group in by_len.items():
                frames = np.concatenate(
                    [frames_of(r, view, v.height, v.width) for r in group]
                )  # (N*F, H, W, 3)
                seeds = [_clip_seed(r["key"], r["clip_index"]) for r in group]
                z = self.encode_frames(frames, seeds, f).astype(e.latents_dtype)
                z = z.reshape(len(group), f, *z.shape[1:])  # (N, F, C, h, w)
                for r, zi in zip(group, z):
                    r[f"latents__{view}"] = zi.tobytes()
        if self.text_encoder is not None:
            h = self.text_encoder([r["caption"] for r in rows])  # (N, 77, D)
            for r, hi in zip(rows, h.float().cpu().numpy().astype(np.float16)):
                r["prompt_embeds"] = hi.tobytes()

    def process(self, rows: list[dict]) -> list[dict]:
        live = [r for r in rows if stream.alive(r)]
        if live:
            try:
                self.encode_rows(live)
            except Exception:  # find the clip that fails; the others are encoded
                for row in live:
                    try:
                        self.encode_rows([row])
                    except Exception as exc:
                        stream.reject(row, self.name, Reason.ENCODE_ERROR, f"{type(exc).__name__}: {exc}")
        for row in rows:
            for view in self.cfg.views:
                row.pop(f"frames__{view}", None)
        return rows
