"""Sampling the PYoCo cascade chain (base -> interpolation -> SR) from tiny stage checkpoints, and the refusal of
wrong-kind checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.checkpoints import CONFIGS, stage_model
from fixtures.checkpoints import perturb_trainable as perturb
from pipeline.configlib import load_config
from training.diffusion import cascade

# ---- the sampling chain -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_checkpoints(tiny_zoo, tmp_path_factory):
    """{stage: RUN_DIR} as training.run leaves them, from the demo presets with "trained" weights."""
    from training.model.export import export_weights

    runs = {}
    for k, stage in enumerate(cascade.STAGES):
        model, cfg = stage_model(tiny_zoo.sd, stage)
        perturb(model, seed=k + 1)
        run = tmp_path_factory.mktemp(f"pyoco-{stage}")
        export_weights(
            model.trainable_state_dict(),
            dict(model.motion_adapter.config),
            cfg,
            str(run / "export"),
            kind=cascade.stage_kind(stage),
        )
        runs[stage] = run
    return runs


def _cascade_args(checkpoints: dict, out: Path, *extra: str) -> list[str]:
    spec = ",".join(f"{s}={p}" for s, p in checkpoints.items())
    return [
        "--cascade",
        spec,
        "--prompt",
        "a red ball moves right",
        "--output",
        str(out),
        "--config",
        str(CONFIGS / "sample_pyoco.yaml"),
        "sampler.steps=3",
        "output.device=cpu",
        "output.gif=false",
        *extra,
    ]


def test_cascade_cli_samples_the_chain_to_the_final_frames_and_size(stage_checkpoints, tmp_path):
    from training import sample
    from training.sampling.video_io import read_video

    out = tmp_path / "out"
    (record,) = sample.main(_cascade_args(stage_checkpoints, out))
    latents = load_file(str(out / record["files"]["latents"]))
    # base: 4 keyframes at 4x4 -> interp: (4 - 1) * 5 + 1 = 16 frames -> sr: 16 frames at 8x8 latents.
    assert latents["base"].shape == (1, 4, 4, 4, 4)
    assert latents["interp"].shape == (1, 4, 16, 4, 4)
    assert latents["sr"].shape == (1, 4, 16, 8, 8)
    assert torch.allclose(latents["interp"][:, :, ::5], latents["base"], atol=1e-4)  # keyframes kept
    video = read_video(out / record["files"]["mp4"])
    assert video.shape == (16, 3, 64, 64)  # 16 frames of 8x8-latent pixels
    saved = json.loads((out / f"{record['name']}.json").read_text())
    assert set(saved["checkpoints"]) == {"base", "interp", "sr"} and saved["frames_shape"] == [16, 3, 64, 64]
    assert len({s["seed"] for s in saved["stages"].values()}) == 3
    # The JSON alone regenerates the chain exactly.
    (again,) = sample.main(
        ["--replay", str(out / f"{record['name']}.json"), "--output", str(tmp_path / "again")]
    )
    assert torch.equal(load_file(str(tmp_path / "again" / again["files"]["latents"]))["sr"], latents["sr"])


def test_cascade_without_keyframe_replacement_still_conditions(stage_checkpoints, tmp_path):
    from training.sampling.cascade import load_cascade, parse_cascade
    from training.sampling.config import SampleConfig

    cfg = load_config(
        SampleConfig,
        CONFIGS / "sample_pyoco.yaml",
        ["sampler.steps=2", "output.device=cpu", "cascade.keyframe_replacement=false"],
    )
    pipe = load_cascade(
        parse_cascade(f"base={stage_checkpoints['base']},interp={stage_checkpoints['interp']}"), cfg
    )
    result = pipe.sample("x", 0)
    assert list(result.latents) == ["base", "interp"] and result.latents["interp"].shape == (1, 4, 16, 4, 4)
    assert pipe.decode(result.latents["interp"]).shape == (16, 3, 32, 32)


def test_wrong_kind_checkpoints_are_refused(stage_checkpoints, tiny_checkpoint, tmp_path):
    from training import sample
    from training.sampling.cascade import parse_cascade

    swapped = {**stage_checkpoints, "base": stage_checkpoints["interp"]}
    with pytest.raises(ValueError, match=r"'pyoco_interp' checkpoint; --cascade base= needs pyoco_base"):
        sample.main(_cascade_args(swapped, tmp_path / "a"))
    with pytest.raises(ValueError, match=r"'pyoco_base' checkpoint; --cascade sr= needs pyoco_sr"):
        sample.main(_cascade_args({**stage_checkpoints, "sr": stage_checkpoints["base"]}, tmp_path / "b"))
    with pytest.raises(ValueError, match=r"'harivo' checkpoint; --cascade base= needs pyoco_base"):
        sample.main(_cascade_args({**stage_checkpoints, "base": tiny_checkpoint}, tmp_path / "c"))
    # A conditioned stage cannot be sampled on its own; the base can.
    with pytest.raises(ValueError, match=r"'pyoco_sr' checkpoint; .*use --cascade"):
        sample.main(
            ["--checkpoint", str(stage_checkpoints["sr"]), "--prompt", "x", "--output", str(tmp_path)]
        )
    with pytest.raises(ValueError, match="no base=CHECKPOINT"):
        parse_cascade("interp=a,sr=b")
    with pytest.raises(ValueError, match="'up' is not one of"):
        parse_cascade("base=a,up=b")
    assert list(parse_cascade("sr=c, base=a")) == ["base", "sr"]


def test_sr_samples_a_longer_clip_in_windows_of_its_trained_length(stage_checkpoints):
    """The SR stage trained on 8 frames, asked for 20: every model call sees at most 8 frames (positions and
    attention lengths it was trained on), overlaps are averaged, and at its trained length nothing changes."""
    from training.model.frames import frame_windows
    from training.sampling.config import SampleConfig
    from training.sampling.loading import load_pipeline

    assert frame_windows(20, 8, 4) == [(0, 8), (4, 12), (8, 16), (12, 20)]
    assert frame_windows(8, 8, 4) == [(0, 8)] and frame_windows(76, 16, 4)[-1] == (60, 76)
    over = {"sampler.kind": "euler", "sampler.steps": 2, "output.device": "cpu", "guidance.mg_alpha": 0.0}
    sizes = {"output.height": 64, "output.width": 64}
    long = load_pipeline(
        stage_checkpoints["sr"],
        load_config(SampleConfig, CONFIGS / "sample_pyoco.yaml", {**over, **sizes, "output.num_frames": 20}),
        ("pyoco_sr",),
    )
    seen = []
    forward = long.video.forward
    long.video.forward = lambda x, *a, **k: seen.append(x.shape[2]) or forward(x, *a, **k)
    low = torch.randn(1, 4, 20, 4, 4, generator=torch.Generator().manual_seed(0))
    condition = cascade.sr_stage_condition(low, 0.1, 2, "bilinear")
    out = long.sample("a red ball", 0, condition).latents
    assert out.shape == (1, 4, 20, 8, 8) and torch.isfinite(out).all()
    assert seen and max(seen) == 8
    # At the trained length the windowed path is the plain one: one window, the same numbers.
    short = load_pipeline(
        stage_checkpoints["sr"],
        load_config(SampleConfig, CONFIGS / "sample_pyoco.yaml", {**over, **sizes, "output.num_frames": 8}),
        ("pyoco_sr",),
    )
    cond8 = cascade.sr_stage_condition(low[:, :, :8], 0.1, 2, "bilinear")
    a = short.sample("a red ball", 0, cond8).latents
    short.cfg.cascade.window_overlap = 7  # would change the windows if there were more than one
    assert torch.equal(a, short.sample("a red ball", 0, cond8).latents)
