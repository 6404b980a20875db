"""Exports (`training/model/export.py`): the trained weights on their own, found again, read back, and
loadable by diffusers as a MotionAdapter, a scheduler on the training schedule and a pipeline folder (sampled in
tests/training/sampling/test_diffusers_pipeline.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.configlib import from_dict
from training.config import TrainConfig
from training.model.export import (
    CONFIG_FILE,
    HARIVO_DIR,
    HARIVO_PREFIXES,
    KIND_METADATA,
    MOTION_ADAPTER_DIR,
    PIPELINE_INDEX,
    SCHEDULER_DIR,
    TEMPORAL_TEXT_DIR,
    TRAINABLE_FILE,
    HarivoModules,
    export_weights,
    read_train_config,
    resolve_checkpoint,
)
from training.model.text import TemporalTextModules

TINY = {"harivo.mapping_heads": 2, "harivo.mapping_head_dim": 16}


def perturb_all(model, seed: int) -> None:
    """Give every trainable weight seeded values, so a fresh model differs from the trained one everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("unet."):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def trained(make_video_model):
    model, cfg = make_video_model(**TINY)
    perturb_all(model, seed=1)
    return model, cfg


def export(model, cfg, destination, kind: str = "harivo") -> str:
    return export_weights(
        model.trainable_state_dict(), dict(model.motion_adapter.config), cfg, str(destination), kind
    )


def test_export_layout_and_weights(trained, tmp_path):
    model, cfg = trained
    out = tmp_path / "run" / "export"
    assert export(model, cfg, out) == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [TRAINABLE_FILE, CONFIG_FILE, MOTION_ADAPTER_DIR, SCHEDULER_DIR, HARIVO_DIR, PIPELINE_INDEX]
    )
    stored = load_file(str(out / TRAINABLE_FILE))
    expected = model.trainable_state_dict()
    assert stored.keys() == expected.keys() and not any(
        k.startswith("unet.") for k in stored
    )  # no frozen base
    prefixes = {k.split(".")[0] for k in stored}
    assert {"motion_adapter", "mapping_network", "frame_tokens", "contrastive_head"} <= prefixes
    for key, value in expected.items():
        assert torch.equal(stored[key], value), key


def test_resolve_checkpoint_finds_the_trainable_file(trained, tmp_path):
    model, cfg = trained
    run = tmp_path / "run"
    export(model, cfg, run / "export")
    file = run / "export" / TRAINABLE_FILE
    assert resolve_checkpoint(run / "export") == file
    assert resolve_checkpoint(run) == file
    assert resolve_checkpoint(str(file)) == file
    # A run that has only DeepSpeed checkpoints (not finished, or killed) is explained, not just "not found".
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint_00000003" / "deepspeed").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"training checkpoints but no export/{TRAINABLE_FILE}"):
        resolve_checkpoint(unfinished)
    with pytest.raises(FileNotFoundError, match="expected an export dir"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected an export dir"):
        resolve_checkpoint(tmp_path / "empty")


def test_read_train_config_returns_the_config_and_kind(trained, tmp_path):
    model, cfg = trained
    export(model, cfg, tmp_path / "harivo")
    got, kind = read_train_config(tmp_path / "harivo" / TRAINABLE_FILE)
    assert got == cfg and kind == "harivo"
    export(model, cfg, tmp_path / "base", kind="pyoco_base")
    assert read_train_config(tmp_path / "base" / TRAINABLE_FILE) == (cfg, "pyoco_base")


def test_a_kind_not_asked_for_is_refused_naming_both(trained, tmp_path):
    model, cfg = trained
    export(model, cfg, tmp_path / "sr", kind="pyoco_sr")
    with pytest.raises(
        ValueError, match=r"is a 'pyoco_sr' checkpoint; training.sample needs harivo or pyoco_base"
    ):
        read_train_config(tmp_path / "sr" / TRAINABLE_FILE)
    with pytest.raises(
        ValueError, match=r"'pyoco_sr' checkpoint; the cascade needs pyoco_interp \(a cascade"
    ):
        read_train_config(tmp_path / "sr" / TRAINABLE_FILE, ("pyoco_interp",), role="the cascade")
    export(model, cfg, tmp_path / "h")
    with pytest.raises(ValueError, match=r"is a 'harivo' checkpoint; x needs pyoco_sr$"):
        read_train_config(tmp_path / "h" / TRAINABLE_FILE, ("pyoco_sr",), role="x")


def test_config_falls_back_to_config_yaml(trained, tmp_path):
    model, cfg = trained
    export(model, cfg, tmp_path / "e")
    # A weights file without metadata (written by hand / another tool) next to the export's config.yaml.
    bare = tmp_path / "e" / "bare.safetensors"
    save_file(load_file(str(tmp_path / "e" / TRAINABLE_FILE)), str(bare))
    with safe_open(str(bare), framework="pt") as f:
        assert KIND_METADATA not in (f.metadata() or {})
    assert read_train_config(bare) == (cfg, "harivo")  # no recorded kind: a HARIVO model
    lone = tmp_path / "lone" / "w.safetensors"
    lone.parent.mkdir()
    save_file({"x": torch.zeros(1)}, str(lone))
    with pytest.raises(ValueError, match="records no training config"):
        read_train_config(lone)


@pytest.mark.parametrize(
    "text_conditioning, frame_text, previous",
    [
        ("none", "tokens", False),
        ("cross_attention", "tokens", False),
        ("film", "tokens", False),
        ("none", "residual", False),
        ("none", "basis", False),
        ("none", "basis", True),
    ],
)
def test_loaded_weights_are_the_exported_ones(
    make_video_model, tmp_path, text_conditioning, frame_text, previous
):
    overrides = {
        **TINY,
        "model.text_conditioning": text_conditioning,
        "harivo.frame_text": frame_text,
        "harivo.frame_text_previous": previous,
    }
    model, cfg = make_video_model(**overrides)
    perturb_all(model, seed=1)
    export(
        model, cfg, tmp_path / "e"
    )  # the pipeline folder's HarivoModules: read off the keys, loaded strictly
    harivo = HarivoModules.from_pretrained(tmp_path / "e" / HARIVO_DIR)
    assert (getattr(harivo.frame_tokens, "previous", None) is not None) == previous
    fresh, _ = make_video_model(**overrides)
    expected, before = model.trainable_state_dict(), fresh.trainable_state_dict()
    assert any(not torch.equal(before[k], expected[k]) for k in expected)
    fresh.load_trainable(resolve_checkpoint(tmp_path / "e"))
    after = fresh.trainable_state_dict()
    assert after.keys() == expected.keys()
    for key in expected:
        assert torch.equal(after[key], expected[key]) and after[key].dtype == expected[key].dtype, key
    # And the model computes the same function (the frozen base is the same pretrained one).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, cfg.model.num_frames, 8, 8, generator=g)
    text = torch.randn(1, cfg.model.max_text_len, fresh.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert torch.equal(fresh(x, 10, text), model(x, 10, text))


def test_motion_adapter_dir_loads_in_diffusers(trained, tmp_path):
    from diffusers import MotionAdapter

    model, cfg = trained
    export(model, cfg, tmp_path / "e")
    adapter = MotionAdapter.from_pretrained(tmp_path / "e" / MOTION_ADAPTER_DIR)
    expected = model.motion_adapter.state_dict()
    got = adapter.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert any(v.abs().sum() > 0 for v in got.values())  # trained weights, not a fresh adapter's zeros
    for key, value in model.motion_adapter.config.items():
        if not key.startswith("_"):  # diffusers' bookkeeping; tuples come back from JSON as lists
            assert adapter.config[key] == (list(value) if isinstance(value, tuple) else value), key


def test_a_new_export_replaces_the_old_one(trained, make_video_model, tmp_path):
    model, cfg = trained
    out = tmp_path / "e"
    export(model, cfg, out)
    (out / "stale.txt").write_text("from an earlier export")
    other, _ = make_video_model(**TINY)
    perturb_all(other, seed=2)
    export(other, cfg, out, kind="pyoco_base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no half-written temp dir left behind
    assert not (out / "stale.txt").exists()
    stored = load_file(str(out / TRAINABLE_FILE))
    for key, value in other.trainable_state_dict().items():
        assert torch.equal(stored[key], value), key
    assert read_train_config(out / TRAINABLE_FILE)[1] == "pyoco_base"


@pytest.mark.parametrize(
    "overrides",
    [{}, {"diffusion.beta_schedule": "scaled_linear", "diffusion.prediction_type": "v_prediction"}],
)
def test_scheduler_dir_is_the_training_schedule(make_video_model, tmp_path, overrides):
    """scheduler/ is the DDIM the project samples with (`training.diffusion.samplers.ddim_scheduler` at the
    sampler's defaults), on the schedule the model trained with, not the SD folder's."""
    from diffusers import DDIMScheduler

    from training.diffusion.samplers import ddim_scheduler
    from training.sampling.config import SamplerConfig

    model, cfg = make_video_model(**TINY, **overrides)
    export(model, cfg, tmp_path / "e")
    got = DDIMScheduler.from_pretrained(tmp_path / "e" / SCHEDULER_DIR).config
    s = SamplerConfig()
    want = ddim_scheduler(cfg.diffusion, s.timestep_spacing, s.steps_offset).config
    assert {k: v for k, v in got.items() if not k.startswith("_")} == {
        k: v for k, v in want.items() if not k.startswith("_")
    }
    assert (
        got.beta_schedule == cfg.diffusion.beta_schedule
        and got.prediction_type == cfg.diffusion.prediction_type
    )


def test_pipeline_folder_records_the_config_and_holds_the_harivo_modules(trained, tmp_path):
    import json

    model, cfg = trained
    export(model, cfg, tmp_path / "e")
    index = json.loads((tmp_path / "e" / PIPELINE_INDEX).read_text())
    assert index["_class_name"] == "T2VRayPipeline"
    assert from_dict(TrainConfig, index["train_config"]) == cfg
    assert index["harivo"] == ["training.model.export", "HarivoModules"]
    assert index["temporal_text"] == [
        None,
        None,
    ]  # model.text_conditioning=none: motion_adapter/ is all of it
    modules = HarivoModules.from_pretrained(tmp_path / "e" / HARIVO_DIR)
    expected = {k: v for k, v in model.trainable_state_dict().items() if k.startswith(HARIVO_PREFIXES)}
    got = modules.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("kind", ["cross_attention", "film"])
def test_temporal_text_layers_export_beside_the_motion_adapter(make_video_model, tmp_path, kind):
    """model.text_conditioning: the text layers have no place in a MotionAdapter; they go to temporal_text/, a
    diffusers model the pipeline folder names, and motion_adapter/ stays a plain MotionAdapter."""
    import json

    from diffusers import MotionAdapter

    model, cfg = make_video_model(**TINY, **{"model.text_conditioning": kind})
    perturb_all(model, seed=1)
    export(model, cfg, tmp_path / "e")
    index = json.loads((tmp_path / "e" / PIPELINE_INDEX).read_text())
    assert index["temporal_text"] == ["training.model.text", "TemporalTextModules"]
    modules = TemporalTextModules.from_pretrained(tmp_path / "e" / TEMPORAL_TEXT_DIR)
    assert modules.config.kind == kind
    assert list(modules.config.channels) == list(model.temporal_text.config.channels)
    got, want = modules.state_dict(), model.temporal_text.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    adapter = MotionAdapter.from_pretrained(tmp_path / "e" / MOTION_ADAPTER_DIR)
    assert adapter.state_dict().keys() == model.motion_adapter.state_dict().keys()


def test_models_without_the_extras_or_trained_as_edm_export_accordingly(make_video_model, tmp_path):
    import json

    model, cfg = make_video_model(**{"harivo.mapping_network": False, "harivo.frame_tokens": False})
    export(model, cfg, tmp_path / "plain")
    assert not (tmp_path / "plain" / HARIVO_DIR).exists()
    assert json.loads((tmp_path / "plain" / PIPELINE_INDEX).read_text())["harivo"] == [None, None]
    # An EDM-trained model: diffusers' discrete schedulers do not sample it as trained, so no pipeline folder.
    model, cfg = make_video_model(**TINY, **{"diffusion.objective": "edm"})
    export(model, cfg, tmp_path / "edm")
    names = {p.name for p in (tmp_path / "edm").iterdir()}
    assert MOTION_ADAPTER_DIR in names and not names & {SCHEDULER_DIR, HARIVO_DIR, PIPELINE_INDEX}


def test_export_is_readable_by_others_as_the_umask_allows(trained, tmp_path):
    """Built in a private temp dir, the export still gets the modes `mkdir` / `open` give (umask 022: 0755 /
    0644), so a teammate or a serving job on a shared filesystem can read it."""
    import os
    import stat

    model, cfg = trained
    old = os.umask(0o022)
    try:
        out = tmp_path / "export"
        export(model, cfg, out)
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {0o755}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o644}
