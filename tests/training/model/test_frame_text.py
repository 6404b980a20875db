"""Our per-frame text modules read each caption state with the one before it (harivo.frame_text_previous)."""

from __future__ import annotations

import pytest
import torch

from training.model.harivo import FrameTextBasis, FrameTextResidual


def trained(module: torch.nn.Module) -> torch.nn.Module:
    torch.nn.init.normal_(module.mlp[-1].weight, std=0.1, generator=torch.Generator().manual_seed(1))
    return module


@torch.no_grad()
@pytest.mark.parametrize("kind", [FrameTextResidual, FrameTextBasis])
def test_with_the_previous_state_word_order_reaches_the_words_after_the_moved_ones(kind):
    torch.manual_seed(0)
    e = torch.randn(2, 10, 16)  # (B, M, D)
    swapped = e.clone()
    swapped[:, [3, 5]] = e[:, [5, 3]]  # the same states, two of them in each other's place: the mean is kept
    for previous, changed in ((False, {3, 5}), (True, {3, 4, 5, 6})):
        module = trained(kind(16, 4, previous=previous))
        out, out_swapped = module(e), module(swapped)  # (B, F, M, D)
        moved = {m for m in range(10) if not torch.allclose(out[:, :, m], out_swapped[:, :, m], atol=1e-6)}
        assert moved == changed, (
            previous
        )  # with it, the state after each moved one is read with another neighbour
        zero = kind(16, 4, previous=previous)(e)
        assert not zero.any()  # zero-initialised last layer: the base's own text at init, with or without it


@torch.no_grad()
def test_the_previous_state_enters_as_a_linear_term_before_the_mlp():
    module = trained(FrameTextBasis(16, 4, previous=True))
    e = torch.randn(1, 6, 16)
    before = torch.cat([torch.zeros(1, 1, 16), e[:, :-1]], 1)  # e_(m-1), zeros before the first
    x = module.state(e) + module.context(e.mean(1, keepdim=True)) + module.previous(before)
    h = module.mlp(x).unflatten(-1, (4, 16))  # (B, M, K, D)
    assert torch.allclose(module(e), torch.einsum("fk,bmkd->bfmd", module.basis, h), atol=1e-6)


def test_previous_needs_one_of_our_modules(tiny_zoo):
    from pipeline.configlib import load_config
    from training.config import TrainConfig

    with pytest.raises(
        ValueError, match="frame_text_previous=true needs harivo.frame_text=residual or basis"
    ):
        load_config(TrainConfig, None, {"model.pretrained": tiny_zoo.sd, "harivo.frame_text_previous": True})
