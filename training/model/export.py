"""Exports: the trained weights on their own, with the config they were trained with (writer and reader).

An export directory (`RUN_DIR/export/`):

    trainable.safetensors              temporal layers + HARIVO modules, config and kind in the file metadata
    config.yaml                        the resolved TrainConfig (base model id, noise schedule, ...)
    motion_adapter/                    the temporal layers as a diffusers MotionAdapter (AnimateDiffPipeline)
    unet/                              only when the base's own layers trained (model.trainable_spatial): the
                                       whole trained UNet as a diffusers UNet2DConditionModel

`export_weights` writes one (the training runner calls it once at the end); `resolve_checkpoint` and
`read_train_config` find and read one (sampling, evaluation, tuning). A frozen base is never stored.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.configlib import from_dict, to_yaml
from training.config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TRAINABLE_FILE = "trainable.safetensors"
MOTION_ADAPTER_DIR = "motion_adapter"
UNET_DIR = "unet"
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
        copy_tree(out, destination)
    return destination


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
    shutil.copytree(source, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # readers see the old export or the new one, never half of one


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
