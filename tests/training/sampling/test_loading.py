"""Loading a sampling pipeline: what a checkpoint may be combined with."""

from __future__ import annotations

import pytest

from fixtures.checkpoints import tiny_checkpoint
from pipeline.configlib import load_config
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline

JVID = {"jvid.enabled": True, "output.device": "cpu", "sampler.steps": 2}


def test_jvid_refuses_a_base_on_another_noise_schedule(tiny_zoo, tmp_path):
    """The tiny base was trained on 'scaled_linear'; a video model on HARIVO's 'linear' cannot be mixed with it
    step by step (every timestep would be read at the wrong noise level)."""
    linear = tiny_checkpoint(tiny_zoo.sd, tmp_path / "linear", **{"diffusion.beta_schedule": "linear"})
    with pytest.raises(ValueError, match=r"diffusion.beta_schedule='linear' vs 'scaled_linear'.*image_mode"):
        load_pipeline(linear, load_config(SampleConfig, None, JVID))
    # the video model's own image mode shares its schedule; so does a model trained on the base's
    assert load_pipeline(linear, load_config(SampleConfig, None, {**JVID, "jvid.image_model": "image_mode"}))
    same = tiny_checkpoint(tiny_zoo.sd, tmp_path / "same")
    assert load_pipeline(same, load_config(SampleConfig, None, JVID)).image_model is not None
