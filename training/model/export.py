"""Exports: the trained weights on their own, with the config they were trained with (writer and reader).

An export directory (`RUN_DIR/export/`):

    trainable.safetensors              temporal layers + HARIVO modules, config and kind in the file metadata
    config.yaml                        the resolved TrainConfig (base model id, noise schedule, ...)
    motion_adapter/                    the temporal layers as a diffusers MotionAdapter (AnimateDiffPipeline)
    unet/                              only when the base's own layers trained (model.trainable_spatial): the
                                       whole trained UNet as a diffusers UNet2DConditionModel
    scheduler/                         DDIM on the training noise schedule (diffusers DDIMScheduler): what an
                                       AnimateDiffPipeline needs besides the adapter to sample the model as trained
    harivo/                            the mapping network and frame tokens as a diffusers model (`HarivoModules`)
    temporal_text/                     only with model.text_conditioning: the temporal layers' text path as a
                                       diffusers model (`training.model.text.TemporalTextModules`)
    model_index.json                   the directory as a diffusers pipeline folder: `T2VRayPipeline`
                                       (`training/sampling/diffusers_pipeline.py`) loads it in one call

motion_adapter/ is a plain diffusers MotionAdapter, and with model.text_conditioning=none (HARIVO) it is the
whole of the temporal layers. With 'cross_attention' or 'film' it is not: AnimateDiff's motion modules take no
text, so the text layers that run beside them are in temporal_text/ (and trainable.safetensors) alone, and an
AnimateDiffPipeline given motion_adapter/ samples another model (the text path dropped); `T2VRayPipeline` and
`training.sample` load both.

scheduler/, harivo/, temporal_text/ and model_index.json are written for DDPM-trained video models
(diffusion.objective=ddpm, no cascade stage), the ones diffusers' discrete schedulers sample. `export_weights`
writes one (the training runner calls it once at the end); `resolve_checkpoint` and `read_train_config` find
and read one (sampling, evaluation, tuning). A frozen base is never stored: the pipeline folder names its VAE, text encoder, tokenizer
(and UNet, unless unet/ is there) as null, and `T2VRayPipeline` loads them from `model.pretrained`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import diffusers
import pyarrow.fs as pafs
import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.configlib import from_dict, to_dict, to_json, to_yaml
from training.config import DiffusionConfig, HarivoConfig, TrainConfig
from training.model.harivo import harivo_modules
from training.model.text import PREFIX as TEMPORAL_TEXT_PREFIX
from training.model.text import TemporalTextModules

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TRAINABLE_FILE = "trainable.safetensors"
MOTION_ADAPTER_DIR = "motion_adapter"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
HARIVO_DIR = "harivo"
TEMPORAL_TEXT_DIR = "temporal_text"
PIPELINE_INDEX = "model_index.json"
PIPELINE_CLASS = "T2VRayPipeline"
"""The diffusers pipeline class `model_index.json` names (`training/sampling/diffusers_pipeline.py`)."""
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet")
"""Pipeline components an export leaves to its base (null in model_index.json), the UNet unless unet/ is there."""
HARIVO_PREFIXES = ("mapping_network.", "frame_tokens.")
"""The `VideoUNet` state-dict keys `HarivoModules` holds (the contrastive head only trains)."""
KIND_METADATA = "t2v.kind"
CONFIG_METADATA = "t2v.config"
SAMPLEABLE_KINDS = ("harivo", "pyoco_base")
"""Kinds `training.sample --checkpoint` samples on their own; the conditioned cascade stages run only in `--cascade`."""


def export_weights(
    state_dict: dict[str, torch.Tensor],
    motion_adapter_config: dict,
    cfg: TrainConfig,
    destination: str,
    kind: str = "harivo",
) -> str:
    """Write the trained weights, their config and a diffusers MotionAdapter to `destination` (dir or URI).

    `kind` names the model stage (e.g. "harivo", "pyoco_base") so a checkpoint of the wrong kind can be
    refused when loaded.
    """
    from diffusers import MotionAdapter

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        metadata = {CONFIG_METADATA: to_yaml(cfg), KIND_METADATA: kind, "format": "pt"}
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()}, str(out / TRAINABLE_FILE), metadata=metadata
        )
        (out / CONFIG_FILE).write_text(to_yaml(cfg))
        adapter_state = {
            k[len("motion_adapter.") :]: v for k, v in state_dict.items() if k.startswith("motion_adapter.")
        }
        if adapter_state:
            adapter = MotionAdapter.from_config(motion_adapter_config)
            adapter.load_state_dict(adapter_state)
            adapter.save_pretrained(out / MOTION_ADAPTER_DIR)
        unet_state = {k[len("unet.") :]: v for k, v in state_dict.items() if k.startswith("unet.")}
        if unet_state:
            trained_unet(cfg, unet_state).save_pretrained(out / UNET_DIR)
        if adapter_state and cfg.diffusion.objective == "ddpm" and cfg.cascade.stage == "none":
            harivo_state = {k: v for k, v in state_dict.items() if k.startswith(HARIVO_PREFIXES)}
            text_state = {k: v for k, v in state_dict.items() if k.startswith(TEMPORAL_TEXT_PREFIX)}
            write_pipeline_folder(
                out, cfg, harivo_state, trained_unet=bool(unet_state), text_state=text_state
            )
            if text_state:
                log.info(
                    "export %s: the temporal text layers (model.text_conditioning=%s) are in %s/, beside "
                    "motion_adapter/: an AnimateDiffPipeline given motion_adapter/ alone drops them",
                    destination,
                    cfg.model.text_conditioning,
                    TEMPORAL_TEXT_DIR,
                )
        else:
            log.info(
                "export %s: no diffusers scheduler/ or pipeline (diffusion.objective=%s, cascade.stage=%s: "
                "diffusers' discrete schedulers do not sample it as trained; use python -m training.sample)",
                destination,
                cfg.diffusion.objective,
                cfg.cascade.stage,
            )
        copy_tree(out, destination)
    return destination


def schedule_kwargs(d: DiffusionConfig, spacing: str = "leading", steps_offset: int = 1) -> dict:
    """diffusers scheduler arguments of the training noise schedule (config keys = DiffusionConfig fields).

    The one copy: `training.diffusion.samplers` builds its DDIM / DDPM from these (this room may not import
    that one). 'leading' with offset 1: SD 1.5's pipelines, and the project's sampler defaults."""
    return dict(
        num_train_timesteps=d.num_train_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        beta_schedule=d.beta_schedule,
        prediction_type=d.prediction_type,
        rescale_betas_zero_snr=d.zero_terminal_snr,
        clip_sample=False,  # latents are not bounded to [-1, 1]
        timestep_spacing=spacing,
        steps_offset=steps_offset,
    )


def default_spacing(d: DiffusionConfig) -> tuple[str, int]:
    """(timestep_spacing, steps_offset) a written scheduler file samples with: SD 1.5's ('leading', 1), or for a
    zero-terminal-SNR schedule ('trailing', 0), whose first step is t = T - 1 (Lin et al. 2024, sec. 3.3)."""
    return ("trailing", 0) if d.zero_terminal_snr else ("leading", 1)


def training_scheduler(d: DiffusionConfig, spacing: str = "leading", steps_offset: int = 1) -> DDIMScheduler:
    """The DDIM the project samples with by default (HARIVO), on the schedule the model was trained with (SD
    pipelines: set_alpha_to_one=False). Not the SD folder's own scheduler: HARIVO trains on 'linear' betas, SD
    1.5 on 'scaled_linear', and sampling at the wrong noise levels gives another video."""
    return DDIMScheduler(**schedule_kwargs(d, spacing, steps_offset), set_alpha_to_one=False)


class HarivoModules(ModelMixin, ConfigMixin):
    """HARIVO's sampling-time modules besides the temporal layers, the mapping network l^M and the frame-token
    generator t_theta, as a diffusers model: a `MotionAdapter` has no place for them. State-dict keys as in
    `VideoUNet` (`mapping_network.*`, `frame_tokens.*`); `T2VRayPipeline` runs these very modules in its video
    model. (diffusers finds the loader of a component from another library by the `ModelMixin` name in the
    component's module: hence the import above.)"""

    @register_to_config
    def __init__(
        self,
        use_mapping_network: bool = True,
        in_channels: int = 4,
        mapping_heads: int = 8,
        mapping_head_dim: int = 64,
        mapping_kernel_size: int = 3,
        use_frame_tokens: bool = True,
        cross_attention_dim: int = 768,
        max_text_len: int = 77,
        tokens_per_frame: int = 3,
        num_frames: int = 24,
        frame_text: str = "tokens",
        frame_text_previous: bool = False,
    ):
        super().__init__()
        harivo = HarivoConfig(
            mapping_network=use_mapping_network,
            mapping_heads=mapping_heads,
            mapping_head_dim=mapping_head_dim,
            mapping_kernel_size=mapping_kernel_size,
            frame_tokens=use_frame_tokens,
            tokens_per_frame=tokens_per_frame,
            frame_text=frame_text,
            frame_text_previous=frame_text_previous,
        )
        self.mapping_network, self.frame_tokens = harivo_modules(
            harivo, in_channels, cross_attention_dim, max_text_len, num_frames
        )

    @classmethod
    def from_state_dict(cls, cfg: TrainConfig, state_dict: dict[str, torch.Tensor]) -> HarivoModules:
        """The modules of a `VideoUNet` trainable state dict (its `mapping_network.*` / `frame_tokens.*` keys);
        widths are read off the weights, the rest from `cfg`; every key must fit (strict load)."""
        h = cfg.harivo
        mapping = "mapping_network.proj_out.weight"  # Linear(C, C), C the latent channels
        residual = "frame_tokens.state.weight" in state_dict  # harivo.frame_text=residual or basis
        tokens = "frame_tokens.state.weight" if residual else "frame_tokens.layers.0.0.weight"  # Linear(D, D)
        modules = cls(
            use_mapping_network=mapping in state_dict,
            in_channels=state_dict[mapping].shape[0] if mapping in state_dict else 4,
            mapping_heads=h.mapping_heads,
            mapping_head_dim=h.mapping_head_dim,
            mapping_kernel_size=h.mapping_kernel_size,
            use_frame_tokens=tokens in state_dict,
            cross_attention_dim=state_dict[tokens].shape[0] if tokens in state_dict else 768,
            max_text_len=cfg.model.max_text_len,
            tokens_per_frame=h.tokens_per_frame,
            num_frames=cfg.model.num_frames,
            frame_text="basis"
            if "frame_tokens.basis" in state_dict
            else "residual"
            if residual
            else "tokens",
            frame_text_previous="frame_tokens.previous.weight" in state_dict,
        )
        modules.load_state_dict(state_dict)
        return modules


def write_pipeline_folder(
    out: Path,
    cfg: TrainConfig,
    harivo_state: dict[str, torch.Tensor],
    trained_unet: bool,
    text_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """scheduler/, harivo/ and temporal_text/ (if the model has those modules) and model_index.json into the
    export `out`, which already holds motion_adapter/ (and unet/ when `trained_unet`)."""
    training_scheduler(cfg.diffusion, *default_spacing(cfg.diffusion)).save_pretrained(out / SCHEDULER_DIR)
    if harivo_state:
        HarivoModules.from_state_dict(cfg, harivo_state).save_pretrained(out / HARIVO_DIR)
    if text_state:
        TemporalTextModules.from_state_dict(cfg.model, text_state).save_pretrained(out / TEMPORAL_TEXT_DIR)
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        **{name: [None, None] for name in BASE_COMPONENTS},  # the frozen base: loaded from model.pretrained
        "motion_adapter": ["diffusers", "MotionAdapter"],
        "harivo": [HarivoModules.__module__, HarivoModules.__name__] if harivo_state else [None, None],
        "temporal_text": (
            [TemporalTextModules.__module__, TemporalTextModules.__name__] if text_state else [None, None]
        ),
        "scheduler": ["diffusers", "DDIMScheduler"],
        "train_config": to_dict(cfg),
    }
    if trained_unet:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (out / PIPELINE_INDEX).write_text(to_json(index, indent=2, sort_keys=True) + "\n")


def trained_unet(cfg: TrainConfig, unet_state: dict[str, torch.Tensor]):
    """The base UNet with its trained parameters (model.trainable_spatial) put in: a plain diffusers
    `UNet2DConditionModel` (from its config alone when model.from_scratch, whose every weight trained)."""
    from diffusers import UNet2DConditionModel

    m = cfg.model
    if m.from_scratch:
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(m.pretrained, subfolder=m.subfolder, revision=m.revision)
        )
    else:
        unet = UNet2DConditionModel.from_pretrained(m.pretrained, subfolder=m.subfolder, revision=m.revision)
    missing, unexpected = unet.load_state_dict(unet_state, strict=False)
    if unexpected or (m.from_scratch and missing):
        raise KeyError(
            f"trained UNet weights do not fit the base: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return unet


def copy_tree(source: Path, destination: str) -> None:
    """Copy a local directory to a local path or a URI (s3://, gs://), replacing what was there."""
    if "://" in destination:
        fs, path = pafs.FileSystem.from_uri(destination)
        pafs.copy_files(str(source), path, destination_filesystem=fs)
        return
    dest = Path(destination)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=shutil.copyfile)  # files: the umask's modes, not the temp's
    _default_modes(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # readers see the old export or the new one, never half of one


def _default_modes(root: Path) -> None:
    """Directories as `mkdir` makes them (0777 minus the umask: 0755 by default): the export is built in a
    private temp dir (0700), and others on a shared filesystem must be able to read it."""
    umask = os.umask(0)
    os.umask(umask)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        d.chmod(0o777 & ~umask)


def resolve_checkpoint(path: str | Path) -> Path:
    """The trainable.safetensors of an export dir, of RUN_DIR/export, or the file itself."""
    p = Path(path)
    for candidate in (p, p / TRAINABLE_FILE, p / "export" / TRAINABLE_FILE):
        if candidate.is_file():
            return candidate
    if p.is_dir() and any(p.glob("checkpoint_*")):
        raise FileNotFoundError(
            f"{p} has training checkpoints but no export/{TRAINABLE_FILE}: DeepSpeed shards are not for "
            "sampling; let the run finish (it exports at the end)"
        )
    raise FileNotFoundError(
        f"--checkpoint {p}: expected an export dir, a run dir with export/, or {TRAINABLE_FILE}"
    )


def read_train_config(
    trainable: Path, kinds: tuple[str, ...] = SAMPLEABLE_KINDS, role: str = "training.sample"
) -> tuple[TrainConfig, str]:
    """(TrainConfig, kind) recorded with a checkpoint (file metadata, else config.yaml beside it).

    A checkpoint whose kind is not in `kinds` is refused, naming both (`role` says who needs which)."""
    with safe_open(str(trainable), framework="pt") as f:
        meta = f.metadata() or {}
    text = meta.get(CONFIG_METADATA)
    if text is None and (trainable.parent / "config.yaml").is_file():
        text = (trainable.parent / "config.yaml").read_text()
    if text is None:
        raise ValueError(f"{trainable} records no training config (no t2v.config metadata, no config.yaml)")
    tree = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    kind = meta.get(KIND_METADATA, "harivo")
    if kind not in kinds:
        hint = (
            " (a cascade stage: use --cascade base=...,interp=...,sr=...)"
            if kind.startswith("pyoco_")
            else ""
        )
        raise ValueError(f"{trainable} is a {kind!r} checkpoint; {role} needs {' or '.join(kinds)}{hint}")
    return from_dict(TrainConfig, tree), kind
