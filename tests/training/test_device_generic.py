"""Device-generic code paths on a CPU-only machine.

On a GPU the worker's random stream is a CUDA generator, and a draw that forgets `device=` defaults to
the CPU: torch raises at the first batch. `CudaLabelled` is a CPU generator that reports the CUDA device,
and `audit` fails any draw from it that does not name a device (so would run on the CPU), then makes the
named device the CPU so the rest runs here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import schema
from training.config import OptimConfig
from training.diffusion.objective import HarivoObjective
from training.distributed.data import StoreInfo, collate_stage
from training.distributed.engine import adamw
from training.distributed.progress import clock

DRAWS = ("randn", "rand", "randint", "randperm", "normal", "multinomial", "bernoulli", "randn_like")


class CudaLabelled(torch.Generator):
    """What the worker holds on a GPU machine, as far as the code under test can tell."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")


@pytest.fixture
def audit(monkeypatch):
    """The list of checked draws; a draw from a `CudaLabelled` without `device=` raises."""
    checked = []
    for name in DRAWS:
        original = getattr(torch, name)

        def draw(*args, _original=original, _name=name, **kwargs):
            g = kwargs.get("generator")
            if isinstance(g, CudaLabelled):
                if kwargs.get("device") is None:
                    raise AssertionError(
                        f"torch.{_name} from a {g.device} generator without device=: runs on the CPU"
                    )
                if torch.device(kwargs["device"]).type == "cuda":
                    kwargs["device"] = "cpu"
                checked.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, draw)
    return checked


def test_the_audit_catches_a_draw_without_device(audit):
    with pytest.raises(AssertionError, match="without device"):
        torch.randint(0, 4, (1,), generator=CudaLabelled())
    torch.randint(0, 4, (1,), generator=CudaLabelled(), device="cuda")
    assert audit == ["randint"]


def test_collate_draws_the_window_start_on_the_generators_device(audit):
    # A stored clip longer than the trained one (pyoco_sr.yaml as shipped): the start is drawn.
    info = StoreInfo("clips", "latents", [6, 4, 2, 2], False, {})
    batch = {"latents": np.zeros((2, 6, 4, 2, 2), np.float32), schema.CAPTION: np.array(["a", "b"])}
    latents, *_ = collate_stage(batch, info, 3, 1, CudaLabelled().manual_seed(0), torch.device("cpu"))
    assert latents.shape == (2, 4, 3, 2, 2) and audit == ["randint"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # HARIVO: noise, timesteps, L_DC positives, caption-free
        {"diffusion.objective": "edm", "edm.kind": "sd21", "noise.prior": "mixed", "noise.alpha": 1.0},
        {"diffusion.noise_offset": 0.1, "noise.prior": "progressive", "noise.alpha": 2.0},
    ],
)
def test_the_objective_draws_everything_on_the_generators_device(make_video_model, audit, overrides):
    model, cfg = make_video_model(**overrides)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    images = torch.randn(2, 4, 2, 8, 8, generator=g)  # joint training's images, (B, C, N, h, w)
    objective = HarivoObjective.for_model(cfg, model)
    terms = objective(
        model,
        latents,
        text,
        CudaLabelled().manual_seed(0),
        images=images,
        image_text=text[:, None].expand(2, 2, 77, 32),
    )
    assert torch.isfinite(terms.total) and len(audit) >= 3


def test_fused_adamw_on_gpu_only():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw([{"params": p}], OptimConfig(), use_gpu=True).defaults["fused"] is True
    assert not adamw([{"params": p}], OptimConfig(), use_gpu=False).defaults["fused"]


def test_the_step_clock_needs_no_device_sync_on_cpu():
    a = clock(torch.device("cpu"))
    assert clock(torch.device("cpu")) >= a
