"""`training.evaluate` with a domain evaluator (issue 18): the shapes world's captions parse to their scenes'
labels, a changed evaluator file is refused, a trained evaluator's accuracy sees whether a clip shows its prompt,
its domain FVD tells real clips from shuffled or noise ones through the I3D FVD's own Frechet code, and the frozen
image model can be scored frame by frame on the same prompts."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.configlib import load_config
from shapes.evaluator import ShapesEvaluator, save, train
from shapes.world import ATTRIBUTES, COLOURS, MOTIONS, Scene, labels, render, sample_scene
from training import evaluate
from training.diffusion.jvid import p_video
from training.evaluation import domain, metrics
from training.sampling.config import SampleConfig, frame_baseline

VOCAB = {k: list(v) for k, v in ATTRIBUTES.items()}
PROMPTS = Path(__file__).parents[2] / "training" / "prompts" / "harivo_a3.txt"


def every_scene():
    """Every scene of the world up to shading (a colour change to each other colour)."""
    for shape, colour, background, motion in itertools.product(*ATTRIBUTES.values()):
        ends = [c for c in COLOURS if c != colour] if motion == "changes colour" else [colour]
        for end in ends:
            yield Scene(shape, colour, background, motion, end, False)


def clips(scenes: list[Scene], frames: int = 8, size: int = 64) -> torch.Tensor:
    """Rendered scenes as uint8 videos (N, F, 3, H, W)."""
    return torch.from_numpy(np.stack([render(s, frames, size, size) for s in scenes])).permute(0, 1, 4, 2, 3)


def scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save(ShapesEvaluator(), tmp_path_factory.mktemp("untrained-evaluator"), {"trained": False})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> domain.DomainEvaluator:
    """An evaluator trained as tests/shapes/test_evaluator.py trains one, shorter (~30 s on 2 cores)."""
    torch.set_num_threads(2)
    model, record = train(clips=600, steps=150, batch=32, val_clips=100)
    out = save(model, tmp_path_factory.mktemp("trained-evaluator"), record)
    return domain.load_evaluator(out)


# ---- prompts -> labels ----------------------------------------------------------------------------------


def test_every_caption_of_the_world_parses_to_its_scenes_labels():
    grammar = domain.prompt_grammar(VOCAB)
    n = 0
    for scene in every_scene():
        want = labels(scene)  # 'colour' is the first frame's: a colour change's first colour
        assert domain.parse_prompt(scene.caption, VOCAB, grammar) == want, scene.caption
        assert domain.parse_prompt(" " + scene.caption.capitalize() + ".", VOCAB, grammar) == want
        motionless = f"a {scene.colour} {scene.shape} on a {scene.background} background"
        assert domain.parse_prompt(motionless, VOCAB, grammar) == {**want, "motion": None}
        n += 1
    assert n == 3 * 8 * 6 * (6 + 7)


def test_a_prompt_states_only_what_it_says_and_another_worlds_nothing():
    none = dict.fromkeys(VOCAB)
    assert domain.parse_prompt("a purple square", VOCAB) == {**none, "shape": 1, "colour": 4}
    assert domain.parse_prompt("a triangle grows", VOCAB) == {**none, "shape": 2, "motion": 4}
    said = domain.parse_prompt("an orange circle moves up on a dark blue background", VOCAB)
    assert said == {"shape": 0, "colour": 5, "background": 1, "motion": 2}
    for prompt in [
        *PROMPTS.read_text().splitlines(),
        "a red circle moves up on a grey background while a dog barks",
        "a red circle moves up to blue on a grey background",  # only a colour change names a second colour
        "a black circle",  # black is a background of this world, not a colour
        "",
    ]:
        assert domain.parse_prompt(prompt, VOCAB) == none, prompt


# ---- the evaluator file ---------------------------------------------------------------------------------


def test_an_evaluator_whose_checksum_differs_is_refused(untrained, tmp_path):
    ev = domain.load_evaluator(untrained)
    assert ev.vocabulary == VOCAB and len(ev.sha256) == 64
    assert domain.load_evaluator(untrained, sha256=ev.sha256).sha256 == ev.sha256
    with pytest.raises(ValueError, match="pinned eval.domain_sha256"):
        domain.load_evaluator(untrained, sha256="0" * 64)
    with pytest.raises(ValueError, match="pinned eval.domain_sha256"):  # before any checkpoint is loaded
        cfg = load_config(
            SampleConfig, None, {"eval.domain_evaluator": str(untrained), "eval.domain_sha256": "0" * 64}
        )
        evaluate.evaluate("no-such-checkpoint", ["a red circle"], tmp_path, cfg)
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "evaluator.json").write_text((untrained / "evaluator.json").read_text())
    (changed / "evaluator.pt").write_bytes((untrained / "evaluator.pt").read_bytes() + b"x")
    with pytest.raises(ValueError, match="differs from its card"):
        domain.load_evaluator(changed)


# ---- scores on rendered clips ---------------------------------------------------------------------------


def swapped(scene: Scene, rng: np.random.Generator) -> Scene:
    other = str(rng.choice([m for m in MOTIONS if m != scene.motion]))
    return Scene(scene.shape, scene.colour, scene.background, other, scene.end_colour, scene.gradient)


@pytest.mark.slow
def test_accuracy_is_high_on_clips_of_the_prompt_and_low_when_their_motion_is_swapped(trained):
    shown = scenes(160, seed=11)
    prompts = [s.caption for s in shown]
    right = domain.domain_report(trained, clips(shown).float() / 255, prompts, None, fps=6.0)
    rng = np.random.default_rng(0)
    wrong = domain.domain_report(
        trained, clips([swapped(s, rng) for s in shown]).float() / 255, prompts, None, 6.0
    )
    acc = {k: v["accuracy"] for k, v in right["labels"].items()}
    assert acc["motion"] >= 0.6 and right["attribute_accuracy"] >= 0.6, acc
    assert all(v["stated"] == 160 for v in right["labels"].values())
    confusion = np.array(right["labels"]["motion"]["confusion"])  # (prompt motion, predicted)
    assert confusion.sum() == 160 and np.trace(confusion) / 160 == acc["motion"]
    # the same prompts on clips whose motion is another: the motion is wrong, what the frames show still right
    assert wrong["labels"]["motion"]["accuracy"] <= 0.25, wrong["labels"]["motion"]["accuracy"]
    assert wrong["attribute_accuracy"] >= right["attribute_accuracy"] - 0.15


@pytest.mark.slow
def test_domain_fvd_of_real_clips_is_far_below_shuffled_frames_or_noise(trained):
    a, b = clips(scenes(500, seed=1)), clips(scenes(500, seed=2))  # two independent samples of real clips
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(8, generator=g) for _ in range(len(b))])  # (N, F)
    shuffled = b[torch.arange(len(b))[:, None], order]  # same frames, another order
    noise = torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8)
    backwards = b.flip(
        1
    )  # played backwards: a real clip of the opposite motion (left <-> right, grows <-> shrinks)
    sets = dict(a=a, b=b, shuffled=shuffled, backwards=backwards, noise=noise)
    out = {k: domain.evaluator_outputs(trained, v) for k, v in sets.items()}

    def score(feature: str, other: str) -> float:
        real, fake = out["a"][feature], out[other][feature]
        if feature == "frame_features":  # (N, 8, 128): every frame one sample
            real, fake = real.flatten(0, 1), fake.flatten(0, 1)
        n = len(a)
        return domain.feature_frechet(real, fake, trained, n, n, 8, 64, 64, None, 512, allow_few=True).fvd

    fvd = {k: score("features", k) for k in ("b", "shuffled", "backwards", "noise")}
    fid = {k: score("frame_features", k) for k in ("b", "shuffled", "noise")}
    # measured (150-step evaluator, N = 500): real 1x, shuffled ~2.7x, noise ~40x; N = 300 gives ~2.1x, as the
    # real-vs-real score is mostly the estimate's own bias, falling as 1 / N
    assert 2 * fvd["b"] < fvd["shuffled"] and 10 * fvd["b"] < fvd["noise"], fvd
    assert fvd["backwards"] < 1.5 * fvd["b"], fvd  # the world's motions come in reversed pairs: still real
    # per-frame features do not see the order: shuffled frames are the same frames to a domain FID
    assert math.isclose(fid["shuffled"], fid["b"], rel_tol=1e-4) and 10 * fid["b"] < fid["noise"], fid


def test_domain_fvd_goes_through_the_i3d_fvds_frechet_code(untrained, monkeypatch, tmp_path):
    from fixtures.tiny_i3d import build_tiny_i3d

    calls = []
    frechet, stats = metrics.frechet_distance, metrics.gaussian_stats
    monkeypatch.setattr(metrics, "frechet_distance", lambda *a: calls.append("frechet") or frechet(*a))
    monkeypatch.setattr(metrics, "gaussian_stats", lambda x: calls.append("stats") or stats(x))
    videos = torch.rand(6, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    i3d = metrics.fvd(
        metrics.load_i3d(build_tiny_i3d(tmp_path / "i3d.pt")), videos[:3], videos[3:], allow_few=True
    )
    assert calls == ["stats", "stats", "frechet"] and isinstance(i3d, metrics.FVDResult)
    ev = domain.load_evaluator(untrained)
    feats = domain.evaluator_outputs(ev, videos)["features"]  # (6, 256)
    result = domain.feature_frechet(feats[:3], feats[3:], ev, 3, 3, 4, 32, 32, 6.0, 512, allow_few=True)
    assert calls == ["stats", "stats", "frechet"] * 2 and isinstance(result, metrics.FVDResult)
    assert result.fvd == frechet(*stats(feats[:3]), *stats(feats[3:]))
    assert (result.detector_sha256, result.below_min_videos, result.covariance) == (ev.sha256, True, "biased")
    with pytest.raises(ValueError, match=r"3 real and 3 generated videos.*domain_min_videos=512.*allow_few"):
        domain.feature_frechet(feats[:3], feats[3:], ev, 3, 3, 4, 32, 32, 6.0, 512, allow_few=False)


# ---- training.evaluate ----------------------------------------------------------------------------------


def test_the_frame_baseline_samples_the_image_model_alone():
    cfg = load_config(SampleConfig, None, {"guidance.mg_alpha": 40.0, "noise.prior": "progressive"})
    base = frame_baseline(cfg)
    j = base.jvid
    assert j.enabled and j.image_model == "base" and j.smooth_threshold == 0 and (j.r, j.gamma) == (0, 1)
    assert all(p_video(i / 10, j.t_v, j.t_e, j.p_e, j.p_f) == 0 for i in range(11))  # never the video model
    assert base.noise.prior == "iid"  # no correlated noise couples the frames
    assert base.guidance == cfg.guidance  # the same CFG and MG as the video model: one judge for both
    assert (cfg.jvid.enabled, cfg.noise.prior, cfg.guidance.mg_alpha) == (False, "progressive", 40.0)
    base.validate()


def test_evaluate_scores_with_the_domain_evaluator(tiny_checkpoint, untrained, tmp_path):
    """The tiny random model and an untrained evaluator: the fields exist and are in range, not good."""
    from training.sampling.video_io import write_mp4

    reference = tmp_path / "real"
    reference.mkdir()
    for k, scene in enumerate(scenes(3, seed=5)):
        write_mp4(clips([scene], frames=8, size=64)[0].float() / 255, reference / f"real{k}.mp4", fps=6)
    prompts = [s.caption for s in scenes(2, seed=6)]
    overrides = {
        "sampler.steps": 1,
        "output.mp4": False,
        "output.gif": False,
        "output.device": "cpu",
        "eval.domain_evaluator": str(untrained),
        "eval.reference": str(reference),
        "eval.allow_few_videos": True,
    }
    cfg = load_config(SampleConfig, None, overrides)
    runs = {
        b: evaluate.evaluate(str(tiny_checkpoint), prompts, tmp_path / str(b), cfg, baseline=b)
        for b in (None, "frames")
    }
    for baseline, report in runs.items():
        m, d = report["metrics"], report["domain"]
        assert report["baseline"] == baseline and report["num_videos"] == 2
        for k in (
            "motion_accuracy",
            "attribute_accuracy",
            "shape_accuracy",
            "colour_accuracy",
            "background_accuracy",
        ):
            assert 0 <= m[k] <= 1, (k, m[k])
        assert math.isfinite(m["domain_fvd"]) and math.isfinite(m["domain_fid"]) and m["domain_fid"] >= 0
        assert d["sha256"] == domain.load_evaluator(untrained).sha256 and d["protocol"]["frames"] == 8
        assert d["fvd"]["below_min_videos"] and d["fvd"]["min_videos"] == 512
        assert (d["fvd"]["fvd"], d["fid"]["fid"]) == (m["domain_fvd"], m["domain_fid"])
        assert (d["fvd"]["num_videos_real"], d["fvd"]["num_videos_fake"], d["fid"]["samples_fake"]) == (
            3,
            2,
            16,
        )
        real = d["real"]  # windows of the generated length at the generated fps
        assert (real["kind"], real["frames"], real["fps"], real["seed"]) == (
            "files",
            report["frames"],
            6.0,
            0,
        )
        assert len(d["labels"]["motion"]["confusion"]) == len(MOTIONS)
        assert "fvd" not in m and report["fvd"] is None
    assert runs["frames"]["config"]["jvid"]["enabled"] and not runs[None]["config"]["jvid"]["enabled"]
