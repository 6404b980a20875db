"""The step benchmark (`python -m training.bench --device ...`): the GPU check's code paths, run on CPU."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from training import bench_step


def args(**kw) -> argparse.Namespace:
    base = dict(device="cpu", unet="tiny", mode="no ckpt", frames=4, latent=8, batch=1, steps=1)
    return argparse.Namespace(**{**base, "bf16": False, "peak_tflops": None, **kw})


def test_mfu_is_achieved_flops_over_the_peak():
    assert bench_step.mfu(2e12, 0.5, 8.0) == pytest.approx(0.5)  # 4 TFLOP/s of 8
    assert bench_step.mfu(2e12, 0.5, None) is None
    assert bench_step.peak_tflops(torch.device("cpu"), None) is None
    assert bench_step.peak_tflops(torch.device("cpu"), 3.5) == 3.5


@pytest.mark.parametrize("bf16", [False, True])
def test_one_row_on_the_tiny_unet(bf16):
    row = bench_step.run_one(args(bf16=bf16))
    assert row["bf16"] is bf16 and row["s_per_step"] > 0 and row["gflop_per_step"] > 0
    assert set(row["params_trainable"]) == {
        "motion_adapter",
        "mapping_network",
        "frame_tokens",
        "contrastive_head",
    }
    assert row["act_mib"]["video"] > 0 and row["act_mib"]["reg"] > 0
    assert row["mfu"] is None  # no peak known for a CPU


@pytest.mark.slow
def test_the_sd15_layout_at_reduced_size_takes_a_step_and_checkpointing_saves_activations():
    # SD 1.5's UNet layout (4 levels, 2 layers per block, 8 heads, 768-d text) at 1/10 width with every
    # HARIVO module and loss of harivo_sd15.yaml: one step each way; checkpointing must hold less.
    rows = {
        mode: bench_step.run_one(args(unet="sd15-mini", mode=mode, frames=4, latent=16))
        for mode in ("no ckpt", "unet ckpt + reg recompute")
    }
    plain, lean = rows["no ckpt"], rows["unet ckpt + reg recompute"]
    assert plain["params_total"] == lean["params_total"] > 5e6
    assert math.isfinite(plain["s_per_step"]) and plain["gflop_per_step"] > 1
    assert lean["act_mib"]["video"] < 0.5 * plain["act_mib"]["video"]
    assert lean["act_mib"]["reg"] < 0.1 * plain["act_mib"]["reg"]
    assert lean["gflop_per_step"] > plain["gflop_per_step"]  # the recomputation is counted


def test_the_cli_prints_a_row_per_configuration_from_fresh_processes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench_step.main(
        ["--device", "cpu", "--unets", "tiny", "--modes", "no ckpt", "--frames", "4", "--latent", "8"]
        + ["--steps", "1", "--skip-vae", "--json", str(out)]
    )
    text = capsys.readouterr().out
    assert "tiny      no ckpt" in text and "failed" not in text
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "no ckpt" and row["peak_mib"] > 0


def test_vae_encode_throughput_through_the_pipelines_encoder():
    row = bench_step.vae_encode(torch.device("cpu"), "mini", frames=2, size=32, batch=2)
    assert row["clips_per_s"] > 0 and row["gflop_per_clip"] > 0 and row["mfu"] is None


def test_an_unknown_mode_or_unet_is_refused_naming_it(capsys):
    for bad in (["--modes", "no ckpt,bogus"], ["--unets", "sd14"]):
        with pytest.raises(SystemExit):
            bench_step.main(["--device", "cpu", *bad])
        assert "unknown mode or UNet" in capsys.readouterr().err
