"""`python -m training.evaluate` end to end on the tiny models, with the tiny TorchScript I3D stand-in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fixtures.tiny_i3d import build_tiny_i3d
from training import evaluate
from training.evaluation.metrics import load_i3d
from training.sampling.video_io import write_mp4
from training.sampling.write import read_prompts

PROMPTS = Path(__file__).parents[2] / "training" / "prompts" / "harivo_a3.txt"


def test_harivo_prompt_file_has_the_100_prompts():
    prompts = read_prompts(PROMPTS)
    assert len(prompts) == 100 and len(set(prompts)) == 100
    assert prompts[0] == "A black man is walking left to right."
    assert prompts[99] == "The cat is transforming into a human."


def test_a_prompt_file_with_bad_bytes_exits_2_naming_the_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a dog runs\n\xc3\x28 is not UTF-8\n")
    with pytest.raises(SystemExit) as exit:
        evaluate.main(
            ["--checkpoint", str(tmp_path), "--prompts", str(prompts), "--output", str(tmp_path / "o")]
        )
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "prompts.txt, line 2: not UTF-8 text" in err and "Traceback" not in err


def test_tiny_i3d_has_the_stylegan_v_signature(tmp_path):
    detector = load_i3d(build_tiny_i3d(tmp_path / "i3d.pt"))
    x = torch.rand(3, 3, 4, 64, 64) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
    feats = detector(x, rescale=False, resize=True, return_features=True)
    assert feats.shape == (3, 32)


def test_evaluate_cli_writes_its_report(tiny_zoo, tiny_checkpoint, tmp_path):
    i3d = build_tiny_i3d(tmp_path / "i3d.pt")
    reference = tmp_path / "real"
    reference.mkdir()
    gen = torch.Generator().manual_seed(0)
    for k in range(3):  # real videos may be longer and larger: random windows, resized and centre-cropped
        frames = torch.rand(8, 3, 96, 128, generator=gen)
        write_mp4(frames, reference / f"real{k}.mp4", fps=6)
    out = tmp_path / "eval"
    report = evaluate.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--prompts",
            str(PROMPTS),
            "--output",
            str(out),
            "sampler.steps=2",
            "eval.max_prompts=2",
            "output.mp4=false",
            "output.device=cpu",
            f"eval.clip_model={tiny_zoo.clip}",
            f"eval.i3d_path={i3d}",
            f"eval.reference={reference}",
            "eval.allow_few_videos=true",
            "eval.fvd_frames=4",
        ]
    )
    saved = json.loads((out / "report.json").read_text())
    assert saved["num_videos"] == 2 and saved["frames"] == 4 and (saved["height"], saved["width"]) == (64, 64)
    assert saved["fps"] == 6.0
    assert set(saved["metrics"]) == {"latent_flicker", "clipsim", "frame_consistency", "fvd"}
    assert saved["fvd"]["num_videos_real"] == 3 and saved["fvd"]["num_videos_fake"] == 2
    assert saved["fvd"]["frames"] == 4 and saved["fvd"]["fps"] == 6.0
    real = saved["fvd"]["real"]  # random 4-frame windows of the decoded files at the generated videos' fps
    assert (real["kind"], real["frames"], real["fps"], real["stride"], real["window"]) == (
        "files",
        4,
        6.0,
        None,
        "random",
    )
    assert saved["clip"]["model"] == str(tiny_zoo.clip) and saved["clip"]["pinned_vit_b_32"] is False
    # the protocol travels with the score: N below StyleGAN-V's 2048 is recorded, the I3D file is named by hash
    assert saved["fvd"]["below_min_videos"] is True and saved["fvd"]["min_videos"] == 2048
    assert saved["fvd"]["covariance"] == "biased"
    assert saved["fvd"]["detector_sha256"] == hashlib.sha256(i3d.read_bytes()).hexdigest()
    assert report["metrics"] == saved["metrics"]
    assert len(list((out / "videos").glob("*.gif"))) == 2


def test_fvd_below_the_protocols_n_is_refused_unless_asked_for():
    from training.evaluation.metrics import fvd

    real, fake = torch.rand(3, 4, 3, 16, 16), torch.rand(2, 4, 3, 16, 16)
    with pytest.raises(
        ValueError, match=r"3 real and 2 generated videos.*eval.min_videos=2048.*allow_few_videos"
    ):
        fvd(None, real, fake)


def test_fvd16_needs_16_generated_frames(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="FVD16 needs 16 frames, the generated videos have 4"):
        evaluate.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--output",
                str(tmp_path),
                "sampler.steps=1",
                "eval.max_prompts=1",
                "output.mp4=false",
                "output.gif=false",
                "eval.i3d_path=x.pt",
                f"eval.reference={tmp_path}",
            ]
        )


def test_clipsim_is_pinned_to_vit_b_32_and_never_downloads():
    from training.sampling.config import EvalConfig

    e = EvalConfig()
    assert e.clip_model == "ViT-B-32" and not e.clipsim_enabled  # no weights named: skipped, nothing fetched
    assert EvalConfig(clip_pretrained="/weights/vit_b_32_openai.bin").clipsim_enabled
    assert EvalConfig(clip_model="local-dir:/zoo/clip").clipsim_enabled
