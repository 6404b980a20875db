"""`python -m training.sample` end to end: mp4 + gif + latents + JSON per video; exact regeneration from the JSON."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.configlib import ConfigError
from training import sample
from training.model.export import resolve_checkpoint
from training.sampling.video_io import read_video


def _refuse(token: str):
    raise ValueError(f"not JSON: {token}")


def test_cli_writes_videos_and_regenerates_exactly_from_the_json(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nA dog is running left to right.\n\nThe kite is flying.\n")
    out = tmp_path / "out"
    records = sample.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--prompts",
            str(prompts),
            "--prompt",
            "A cat jumps.",
            "--output",
            str(out),
            "sampler.steps=3",
            "output.fps=8",
            "output.device=cpu",
            "noise.prior=progressive",
            "noise.alpha=1.0",
        ]
    )
    assert [r["prompt"] for r in records] == [
        "A cat jumps.",
        "A dog is running left to right.",
        "The kite is flying.",
    ]
    assert [r["seed"] for r in records] == [0, 1, 2]
    first = records[0]
    for suffix in (".mp4", ".gif", ".json", ".latents.safetensors"):
        assert (out / f"{first['name']}{suffix}").is_file()
    video = read_video(out / f"{first['name']}.mp4")
    assert video.shape == (4, 3, 64, 64)  # F frames of 8 x 8-latent pixels
    assert read_video(out / f"{first['name']}.gif").shape == (4, 3, 64, 64)
    # Strict JSON, readable by any tool (the sampler's s_tmax = inf is written "inf", not Infinity).
    record = json.loads((out / f"{first['name']}.json").read_text(), parse_constant=_refuse)
    assert record["config"]["sampler"]["s_tmax"] == "inf"
    assert record["config"]["sampler"]["steps"] == 3 and record["config"]["output"]["fps"] == 8
    assert record["resolved"]["noise_prior"] == "progressive" and record["resolved"]["noise_alpha"] == 1.0
    assert record["resolved"]["train_diffusion"]["beta_schedule"] == "scaled_linear"  # the checkpoint's own
    assert len(record["resolved"]["levels"]) == 3
    index = json.loads((out / "samples.json").read_text(), parse_constant=_refuse)
    assert len(index["videos"]) == 3

    # Regenerate the second video from its JSON alone: identical latents.
    second = records[1]
    again = sample.main(
        ["--replay", str(out / f"{second['name']}.json"), "--output", str(tmp_path / "again")]
    )[0]
    want = load_file(str(out / second["files"]["latents"]))["latents"]
    got = load_file(str(tmp_path / "again" / again["files"]["latents"]))["latents"]
    assert again["seed"] == 1 and torch.equal(got, want)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"a dog runs\n\na cat \xff\xfe jumps\n", "prompts.txt, line 3: not UTF-8 text"),
        (b"\n   \n\t\n", "prompts.txt: no prompts in it"),
    ],
)
def test_a_prompt_file_with_bad_bytes_or_no_prompt_exits_2_naming_it(data, message, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(data)
    args = ["--checkpoint", str(tmp_path), "--prompts", str(prompts), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit:
        sample.main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_errors_name_the_problem(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="sampler.stepz"):
        sample.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--prompt",
                "x",
                "--output",
                str(tmp_path),
                "sampler.stepz=3",
            ]
        )
    with pytest.raises(ConfigError, match="sampler.kind"):
        sample.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--prompt",
                "x",
                "--output",
                str(tmp_path),
                "sampler.kind=plms",
            ]
        )
    (tmp_path / "run" / "checkpoint_00000010").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not for sampling"):
        resolve_checkpoint(tmp_path / "run")
    export = tiny_checkpoint / "export"
    assert resolve_checkpoint(export) == resolve_checkpoint(tiny_checkpoint)
    assert resolve_checkpoint(export / "trainable.safetensors") == export / "trainable.safetensors"
