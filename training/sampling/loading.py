"""Loading a sampling pipeline: the exported video model, its base (or a swapped one), JVID's image model,
LoRA and ControlNet. `load_pipeline(checkpoint, cfg)` -> `VideoPipeline`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.models import TextEncoder, torch_dtype
from training.config import TrainConfig
from training.diffusion.samplers import base_scheduler_config, schedule_mismatch
from training.model.export import SAMPLEABLE_KINDS, read_train_config, resolve_checkpoint
from training.model.frames import fold_frames, per_frame, unfold_frames
from training.model.unet import VideoUNet
from training.sampling.config import SampleConfig
from training.sampling.personalize import ControlNetHook, load_unet, merge_lora
from training.sampling.pipeline import VideoPipeline
from training.sampling.video_io import VIDEO_SUFFIXES, read_image, read_video, resize_frames

log = logging.getLogger(__name__)


def _schedule_of(cfg: TrainConfig) -> tuple:
    d = cfg.diffusion
    return (d.objective, d.num_train_timesteps, d.beta_start, d.beta_end, d.beta_schedule)


# ---- loading ----------------------------------------------------------------------------------------------


def _device_dtype(cfg: SampleConfig) -> tuple[torch.device, torch.dtype]:
    o = cfg.output
    device = torch.device(
        "cuda"
        if o.device == "auto" and torch.cuda.is_available()
        else ("cpu" if o.device == "auto" else o.device)
    )
    return device, torch_dtype(o.dtype, device)


def _per_frame(unet):
    """The image model as JVID uses it: frames folded into the batch, `(B, C, F, h, w)` in and out."""

    def fn(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        sample = fold_frames(x)  # (B F, C, h, w)
        t = per_frame(torch.as_tensor(t, device=x.device).reshape(-1).expand(b), f)  # (B F,)
        out = unet(sample, t, encoder_hidden_states=per_frame(text, f)).sample
        return unfold_frames(out, f)  # (B, C, F, h, w)

    return fn


def _build_video_model(trainable: Path, train_cfg: TrainConfig, base_unet, device, dtype) -> VideoUNet:
    if base_unet is not None and train_cfg.model.trainable_spatial:
        raise ValueError(
            f"{trainable} fine-tuned the base's own layers (model.trainable_spatial="
            f"{train_cfg.model.trainable_spatial}): a swapped base.unet or base.lora would be mixed with them"
        )
    model = (
        VideoUNet(base_unet, train_cfg.model, train_cfg.harivo, cascade=train_cfg.cascade)
        if base_unet is not None
        else VideoUNet.from_pretrained(train_cfg.model, train_cfg.harivo, cascade=train_cfg.cascade)
    )
    model.load_trainable(trainable)
    return model.to(device, dtype).eval().requires_grad_(False)


def _check_base_schedule(path: str, train_cfg: TrainConfig) -> None:
    """JVID mixes two denoisers step by step: both must have been trained on one noise schedule (refused, not
    warned about: a mismatch reads every timestep at the wrong noise level)."""
    base = base_scheduler_config(path)
    diff = schedule_mismatch(train_cfg.diffusion, base) if base is not None else {}
    if diff:  # e.g. SD 1.5's 'scaled_linear' vs HARIVO's 'linear' fine-tuning schedule
        fields = ", ".join(f"diffusion.{k}={mine!r} vs {theirs!r}" for k, (mine, theirs) in diff.items())
        raise ValueError(
            f"JVID image model {path} was trained on another noise schedule than the video model ({fields}); "
            "use jvid.image_model=image_mode (the video model with its temporal layers off), or train the "
            "video model with the base's schedule (training/configs/jvid_video.yaml)"
        )


def _image_model(cfg: SampleConfig, video: VideoUNet, train_cfg: TrainConfig, device, dtype):
    """JVID's image denoiser fn(x, t, text) on `(B, C, F, h, w)`."""
    spec = cfg.jvid.image_model
    if spec == "image_mode":
        return lambda x, t, text: video(x, t, text, image_mode=True)
    if spec == "base":
        if train_cfg.diffusion.objective == "edm" and train_cfg.edm.kind != "sd21":
            raise ValueError(
                f"jvid.image_model=base is an eps model, but this checkpoint is EDM kind "
                f"{train_cfg.edm.kind!r}; use jvid.image_model=image_mode"
            )
        _check_base_schedule(cfg.base.unet or train_cfg.model.pretrained, train_cfg)
        return _per_frame(video.unet)
    p = Path(spec)
    try:
        trainable = resolve_checkpoint(p)
    except FileNotFoundError:
        trainable = None
    if trainable is not None:
        other_cfg, _ = read_train_config(trainable)
        if _schedule_of(other_cfg) != _schedule_of(train_cfg):
            raise ValueError(
                f"jvid.image_model={spec} was trained with schedule {_schedule_of(other_cfg)}, the "
                f"video model with {_schedule_of(train_cfg)}; JVID needs one shared schedule"
            )
        other = _build_video_model(trainable, other_cfg, None, device, dtype)
        return lambda x, t, text: other(x, t, text, image_mode=True)
    _check_base_schedule(spec, train_cfg)
    return _per_frame(load_unet(spec).to(device, dtype).eval().requires_grad_(False))


def _control_images(cfg: SampleConfig, frames: list[int], height: int, width: int) -> torch.Tensor:
    """(len(frames), 3, H, W) in [0, 1] from controlnet.images."""
    files = cfg.controlnet.images
    if len(files) == 1 and Path(files[0]).suffix.lower() in VIDEO_SUFFIXES:
        video = read_video(files[0])
        if max(frames) >= len(video):
            raise ValueError(
                f"controlnet.images={files[0]} has {len(video)} frames, frame {max(frames)} needed"
            )
        images = video[frames]
    else:
        images = torch.stack([read_image(f) for f in files])
        if len(images) == 1:
            images = images.expand(len(frames), -1, -1, -1)
        elif len(images) != len(frames):
            raise ValueError(f"{len(images)} controlnet.images for {len(frames)} controlled frames")
    return resize_frames(images, height, width)


def load_pipeline(
    checkpoint: str | Path,
    cfg: SampleConfig,
    kinds: tuple[str, ...] = SAMPLEABLE_KINDS,
    role: str = "training.sample --checkpoint",
) -> VideoPipeline:
    """Load the video model of `checkpoint` with its base (or the swapped one) and the sampler's extras.

    `kinds`: the checkpoint kinds accepted (a cascade loads each stage with its own)."""
    from diffusers import AutoencoderKL, ControlNetModel

    trainable = resolve_checkpoint(checkpoint)
    train_cfg, _ = read_train_config(trainable, kinds, role)
    device, dtype = _device_dtype(cfg)
    base_dir = cfg.base.pretrained or train_cfg.model.pretrained
    if cfg.base.pretrained is None and train_cfg.model.subfolder is None:
        raise ValueError(
            f"model.pretrained={base_dir} is a bare UNet dir; set base.pretrained to an SD dir "
            "for the VAE, text encoder and tokenizer"
        )
    rev = train_cfg.model.revision if cfg.base.pretrained is None else None
    text = TextEncoder.from_pretrained(base_dir, device, rev, dtype)
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae", revision=rev, torch_dtype=dtype)
    base_unet = load_unet(cfg.base.unet) if cfg.base.unet else None  # DreamBooth-style swap
    if cfg.base.lora:
        if base_unet is None:
            from diffusers import UNet2DConditionModel

            m = train_cfg.model
            base_unet = UNet2DConditionModel.from_pretrained(
                m.pretrained, subfolder=m.subfolder, revision=m.revision
            )
        merge_lora({"unet": base_unet, "text_encoder": text.model}, cfg.base.lora, cfg.base.lora_scale)
    video = _build_video_model(trainable, train_cfg, base_unet, device, dtype)
    vae.to(device).eval().requires_grad_(False)
    image_model = _image_model(cfg, video, train_cfg, device, dtype) if cfg.jvid.enabled else None
    pipe = VideoPipeline(
        video,
        train_cfg,
        cfg,
        vae,
        text,
        image_model,
        device,
        dtype,
        str(trainable.resolve()),
    )
    if cfg.controlnet.path:
        c = cfg.controlnet
        frames = list(range(pipe.num_frames)) if c.frames is None else [f % pipe.num_frames for f in c.frames]
        controlnet = ControlNetModel.from_pretrained(c.path).to(device, dtype).eval().requires_grad_(False)
        cond = _control_images(cfg, frames, pipe.height, pipe.width)
        pipe.controlnet = ControlNetHook(controlnet, cond, pipe.num_frames, frames, c.scale).attach(
            video.unet
        )
    return pipe
