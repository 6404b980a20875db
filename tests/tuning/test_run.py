"""Real sweeps on the session's local Ray: a 3-trial sampling sweep, a 2-trial training sweep, and a
sweep whose driver is SIGKILLed mid-way and then resumed. Each writes best.yaml + trials.csv, and the
best preset is then accepted by the training / sampling CLIs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.configlib import load_config
from training.config import TrainConfig
from training.sampling.config import SampleConfig
from tuning.config import SweepConfig
from tuning.run import run_sweep

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tuning" / "configs"


def _rows(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_sweep_preset_or_prompt_list_with_bad_bytes_is_refused_naming_the_file_and_line(tmp_path):
    from tuning.run import main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_bytes((CONFIGS / "demo_sampling.yaml").read_bytes() + b"# r\xe9sum\xe9\n")
    lines = len(sweep.read_bytes().splitlines())
    with pytest.raises(SystemExit, match=rf"tuning.run: .*sweep.yaml, line {lines}: not UTF-8 text"):
        main(["--config", str(sweep), "--check"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle moves left\n\n  \nthe \xff square\n")
    sweep.write_bytes((CONFIGS / "demo_sampling.yaml").read_bytes())
    args = ["--config", str(sweep), f"sampling.prompts={prompts}", "--checkpoint", str(tmp_path), "--check"]
    with pytest.raises(SystemExit, match=r"tuning.run: .*prompts.txt, line 4: not UTF-8 text"):
        main(args)


@pytest.mark.slow
def test_sampling_sweep_writes_a_best_preset_that_samples(ray_local, zoo_env, tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    sweep = load_config(
        SweepConfig,
        CONFIGS / "demo_sampling.yaml",
        [f"sampling.checkpoint={tiny_checkpoint}", f"output.dir={out}", "budget.sampler.steps=2"],
    )
    summary = run_sweep(sweep)

    rows = _rows(out)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"TERMINATED"}
    assert sorted(float(r["jvid.gamma"]) for r in rows) == [0.02, 0.1, 1.0]
    assert all(r["clipsim"] for r in rows)
    assert len(json.loads((out / "trials.json").read_text())) == 3
    assert (out / "objective.png").stat().st_size > 0
    # Tune's per-trial TensorBoard events under the storage path.
    assert len(list((out / "tune").glob("*/events.out.tfevents.*"))) == 3
    best = summary["best"]["params"]
    assert best["jvid.gamma"] in (0.02, 0.1, 1.0)
    assert summary["best"]["clipsim"] == max(float(r["clipsim"]) for r in rows)

    cfg = load_config(SampleConfig, out / "best.yaml")
    assert cfg.jvid.gamma == best["jvid.gamma"]
    assert cfg.guidance.mg_alpha == pytest.approx(best["guidance.mg_alpha"])
    assert cfg.sampler.steps == 50  # the budget (2 steps) stays out of the preset
    from training.sample import main as sample_main

    videos = tmp_path / "videos"
    records = sample_main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--prompt",
            "a red ball",
            "--output",
            str(videos),
            "--config",
            str(out / "best.yaml"),
            "sampler.steps=2",
            "output.mp4=false",
        ]
    )
    assert len(records) == 1 and (videos / f"{records[0]['name']}.gif").is_file()
    assert records[0]["config"]["jvid"]["gamma"] == best["jvid.gamma"]


@pytest.mark.slow
def test_training_sweep_writes_a_best_preset_that_trains(ray_local, zoo_env, demo_latents, tmp_path):
    out = tmp_path / "sweep"
    sweep = load_config(
        SweepConfig,
        CONFIGS / "demo_train.yaml",
        [
            f"data={demo_latents[0]}",
            f"output.dir={out}",
            "budget.optim.max_steps=2",
            "budget.run.val_every=1",
        ],
    )
    summary = run_sweep(sweep)

    rows = _rows(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert sorted(float(r["noise.alpha"]) for r in rows) == [0.0, 1.0]
    assert all(r["val_loss"] and r["step"] for r in rows)
    for r in rows:  # each trial is a Ray Train run with its own checkpoints, export and TensorBoard
        run_dir = out / "train-runs" / r["trial_id"]
        assert (run_dir / "export" / "trainable.safetensors").is_file()
        assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))

    cfg = load_config(TrainConfig, out / "best.yaml")
    assert cfg.noise.alpha == summary["best"]["params"]["noise.alpha"]
    assert cfg.noise.prior == "progressive"
    assert cfg.optim.max_steps == 200 and cfg.run.num_workers == 2  # the demo preset's, not the budget's
    from training.run import main as train_main

    train_main(
        ["--config", str(out / "best.yaml"), "--data", str(demo_latents[0]), "--output", str(tmp_path / "r")]
        + ["--print-config"]
    )


def _experiment_done_trials(exp: Path) -> int:
    """Trials the latest experiment snapshot records as TERMINATED."""
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        text = states[-1].read_text()
    except OSError:
        return 0
    return text.count('\\"status\\": \\"TERMINATED\\"') + text.count('"status": "TERMINATED"')


@pytest.mark.slow
def test_killed_sweep_resumes_with_every_trial_accounted_for(zoo_env, tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, killed with it
    # Snapshot the experiment state after every event, so the kill lands after a recorded trial.
    env.update(TUNE_GLOBAL_CHECKPOINT_S="0", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tuning.run", "--config", str(CONFIGS / "demo_sampling.yaml")]
    cmd += ["--checkpoint", str(tiny_checkpoint), "--output", str(out)]
    cmd += ["search.max_concurrent_trials=1", "budget.sampler.steps=2"]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while _experiment_done_trials(out / "tune") < 1:
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    assert not (out / "trials.csv").exists()  # killed mid-sweep

    resumed = subprocess.run(
        [sys.executable, "-m", "tuning.run", "--output", str(out), "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 3, rows
    assert len({r["trial_id"] for r in rows}) == 3
    assert {r["status"] for r in rows} == {"TERMINATED"}
    assert sorted(float(r["jvid.gamma"]) for r in rows) == [0.02, 0.1, 1.0]
    assert (out / "best.yaml").is_file()


@pytest.mark.parametrize(
    "metric,overrides,words",
    [
        ("motion_accuracy", [], "needs eval.domain_evaluator in evaluation.overrides"),
        ("clipsim", [], "needs eval.clip_model"),
        ("domain_fvd", ["evaluation.overrides.eval.domain_evaluator=ev"], "needs eval.reference"),
    ],
)
def test_an_evaluated_training_sweep_checks_its_evaluation_before_training(
    zoo_env, demo_latents, tmp_path, metric, overrides, words
):
    from tuning.run import SweepError, prepare

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\n")
    sweep = load_config(
        SweepConfig,
        CONFIGS / "demo_train.yaml",
        [f"data={demo_latents[0]}", f"output.dir={tmp_path / 'sweep'}", f"metric={metric}", "mode=max"]
        + ["scheduler.kind=fifo", f"evaluation.prompts={prompts}", *overrides],
    )
    with pytest.raises(SweepError, match=words):
        prepare(sweep)


@pytest.mark.slow
def test_a_training_sweep_ranks_trials_by_their_generated_videos(zoo_env, demo_latents, tmp_path):
    # Each trial trains, then samples its final weights on the fixed prompts and seeds; the objective is a
    # metric of those videos (latent flicker: computed with no external weights), val_loss rides along.
    # Through the CLI on a fresh local Ray: in the session's shared Ray, the Train runs of earlier sweep
    # tests leave placement groups holding its CPUs, and a later Train run waits for them forever.
    out, prompts = tmp_path / "sweep", tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\na blue square moves up\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "tuning.run", "--config", str(CONFIGS / "demo_train.yaml")]
    cmd += ["--data", str(demo_latents[0]), "--output", str(out), "budget.optim.max_steps=2"]
    cmd += ["budget.run.val_every=2", "metric=latent_flicker", "mode=min", "scheduler.kind=fifo"]
    cmd += [f"evaluation.prompts={prompts}", "evaluation.overrides.sampler.steps=2"]
    cmd += ["evaluation.overrides.output.mp4=false", "evaluation.cpus=0.5"]
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, start_new_session=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rows = _rows(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert all(r["latent_flicker"] and r["val_loss"] and r["num_videos"] == "2" for r in rows)
    for r in rows:  # every trial's videos and scores are kept in its run
        report = json.loads((out / "train-runs" / r["trial_id"] / "samples" / "report.json").read_text())
        assert report["metrics"]["latent_flicker"] == pytest.approx(float(r["latent_flicker"]))
        assert [v["seed"] for v in report["videos"]] == [0, 1]  # the same seeds in every trial
    best = min(rows, key=lambda r: float(r["latent_flicker"]))
    assert load_config(TrainConfig, out / "best.yaml").noise.alpha == float(best["noise.alpha"])
