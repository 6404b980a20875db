"""Fixtures for the sweep tests: the demo presets pointed at the test zoo."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def zoo_env(tiny_zoo, monkeypatch):
    """The demo presets find the zoo through ${oc.env:T2V_TINY_ZOO}."""
    monkeypatch.setenv("T2V_TINY_ZOO", str(Path(tiny_zoo.root).resolve()))
    return tiny_zoo
