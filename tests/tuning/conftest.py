"""Fixtures for the sweep tests: a tiny checkpoint to sample from, the demo presets pointed at the test zoo."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sweep_checkpoint(tiny_zoo, tmp_path_factory):
    """A run dir with a tiny 4-frame HARIVO export (like tests/training's `tiny_checkpoint`)."""
    from tuning.bench import tiny_checkpoint

    return tiny_checkpoint(tiny_zoo.sd, tmp_path_factory.mktemp("sweep-ckpt"))


@pytest.fixture
def zoo_env(tiny_zoo, monkeypatch):
    """The demo presets find the zoo through ${oc.env:T2V_TINY_ZOO}."""
    monkeypatch.setenv("T2V_TINY_ZOO", str(Path(tiny_zoo.root).resolve()))
    return tiny_zoo
