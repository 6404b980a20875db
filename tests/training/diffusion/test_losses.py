"""HARIVO loss terms (eq. 1-4) as pure functions, and through the tiny video model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.diffusion.losses import (
    NegativeQueue,
    attention_frame_distances,
    dc_loss_from_hspace,
    decoupled_contrastive_loss,
    frame_distances,
    positive_frames,
    reg_loss,
    reg_weight,
    trs_loss,
)
from training.model.harivo import ContrastiveHead


def attention_maps(b: int, f: int, heads: int = 2, n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, f, heads, n, n, generator=g).softmax(dim=-1)  # (B, F, heads, HW, HW)


def trs(maps: list[torch.Tensor], reduction: str = "sum") -> torch.Tensor:
    """L_TRS of whole maps (B, F, heads, HW, HW) per layer."""
    return trs_loss([frame_distances(m) for m in maps], reduction)


def test_trs_zero_for_identical_frames_positive_otherwise():
    frame = attention_maps(2, 1)
    identical = [frame.expand(2, 5, 2, 16, 16), frame.expand(2, 5, 2, 16, 16)]
    assert trs(identical) == 0
    assert trs([attention_maps(2, 5, seed=1), attention_maps(2, 5, seed=2)]) > 0


def test_trs_layer_weights_are_i_over_n():
    still, moving = attention_maps(1, 1).expand(1, 3, 2, 16, 16), attention_maps(1, 3, seed=3)
    per_layer = trs([moving])  # N = 1: lambda_1 = 1
    expected = (moving[:, 1:] - moving[:, :-1]).abs().sum(-1).mean(dim=(0, 2, 3)).sum()
    assert torch.allclose(per_layer, expected)
    assert torch.allclose(trs([moving, still]), 0.5 * per_layer)  # first of N = 2 layers: 1/2
    assert torch.allclose(trs([still, moving]), per_layer)  # last layer: 2/2
    with pytest.raises(ValueError, match="captured"):
        trs_loss([])


def test_reg_loss_weights_by_one_minus_t_over_t():
    assert reg_weight(torch.tensor([0, 500, 1000]), 1000).tolist() == [1.0, 0.5, 0.0]
    a, b = torch.ones(3, 4, 2, 2, 2), torch.zeros(3, 4, 2, 2, 2)
    assert reg_loss(a, b, torch.tensor([0, 500, 1000]), 1000).item() == pytest.approx(0.5)
    assert reg_loss(a, a, torch.tensor([0, 1, 2]), 1000).item() == 0


def test_decoupled_contrastive_loss_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2, negatives = (
        torch.randn(3, 8, generator=g),
        torch.randn(3, 8, generator=g),
        torch.randn(5, 8, generator=g),
    )
    n1, n2, nq = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), F.normalize(negatives, dim=-1)
    # The positive is not in the denominator (decoupled contrastive learning).
    expected = (-(n1 * n2).sum(-1) / 0.1 + torch.log(torch.exp(n1 @ nq.T / 0.1).sum(-1))).mean()
    assert torch.allclose(decoupled_contrastive_loss(z1, z2, negatives, tau=0.1), expected, atol=1e-5)
    assert torch.allclose(
        decoupled_contrastive_loss(z1, z2, torch.empty(0, 8)), (-(n1 * n2).sum(-1) / 0.1).mean()
    )


def test_dc_lower_when_frames_share_content():
    torch.manual_seed(0)
    head = ContrastiveHead(channels=16, spatial_size=4)
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(4, 1, 16, 4, 4, generator=g).expand(4, 6, 16, 4, 4)  # (B, F, ch, h, w)
    unrelated = torch.randn(4, 6, 16, 4, 4, generator=g)
    losses = {}
    for name, hspace in (("shared", shared), ("unrelated", unrelated)):
        queue = NegativeQueue(size=32, dim=16)
        queue.push(head(torch.randn(32, 16, 4, 4, generator=torch.Generator().manual_seed(2))))
        losses[name] = dc_loss_from_hspace(
            head, hspace, queue, tau=0.1, generator=torch.Generator().manual_seed(3)
        )
    assert losses["shared"] < losses["unrelated"]


def test_positive_frames_are_distinct():
    pairs = positive_frames(1000, 3, torch.Generator().manual_seed(0))
    assert pairs.shape == (1000, 2) and bool((pairs[:, 0] != pairs[:, 1]).all())
    assert set(pairs.flatten().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="got 1"):
        positive_frames(2, 1)


def test_negative_queue_is_fifo():
    queue = NegativeQueue(size=4, dim=2)
    assert queue.negatives().shape == (0, 2)
    queue.push(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert queue.negatives()[:, 0].tolist() == [1, 2, 3]
    queue.push(torch.tensor([[4.0, 4.0], [5.0, 5.0]]))  # overwrites the oldest
    assert sorted(queue.negatives()[:, 0].tolist()) == [2, 3, 4, 5]
    state = queue.state_dict()
    assert {"items", "ptr", "count"} <= set(state)


@torch.no_grad()
def test_trs_through_the_model_zero_for_a_still_video(make_video_model):
    # At init (temporal layers are identity, no frame tokens) a still video has equal attention maps;
    # trained temporal layers add frame positions, so then only training can make them agree.
    model, _ = make_video_model(**{"harivo.frame_tokens": False})
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(1, 4, 1, 8, 8, generator=g)
    text, timesteps = torch.randn(1, 77, 32, generator=g), torch.tensor([300])
    values = {}
    for name, latents in (
        ("still", frame.expand(1, 4, 4, 8, 8)),
        ("moving", torch.randn(1, 4, 4, 8, 8, generator=g)),
    ):
        with model.capture(hspace=False) as captured:
            model(latents.contiguous(), timesteps, text)
        assert captured.hspace is None
        values[name] = trs(captured.attention_maps)
    assert values["still"] <= 1e-6 < values["moving"]


def test_trs_mean_is_the_sum_over_its_terms():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 6, 2, 4, 4, generator=g).softmax(-1) for _ in range(3)]  # N = 3 layers, F = 6
    assert torch.allclose(trs(maps, "mean"), trs(maps) / (3 * 5))
    with pytest.raises(ValueError, match="reduction"):
        trs(maps, "max")


def test_dc_without_in_batch_negatives_is_eq_4_on_the_queue():
    from torch import nn

    from training.diffusion.losses import NegativeQueue, dc_loss_from_hspace, decoupled_contrastive_loss

    g = torch.Generator().manual_seed(0)
    hspace = torch.randn(3, 4, 2, 2, 2, generator=g)  # (B, F, ch, h, w)
    head = nn.Flatten()
    queue = NegativeQueue(16, 8)
    queue.push(torch.randn(5, 8, generator=g))
    queued = queue.negatives().clone()
    pairs_g = torch.Generator().manual_seed(1)
    got = dc_loss_from_hspace(head, hspace, queue, 0.1, pairs_g, in_batch_negatives=False)
    from training.diffusion.losses import positive_frames

    pairs = positive_frames(3, 4, torch.Generator().manual_seed(1))
    rows = torch.arange(3)
    want = decoupled_contrastive_loss(
        head(hspace[rows, pairs[:, 0]]), head(hspace[rows, pairs[:, 1]]), queued, 0.1
    )
    torch.testing.assert_close(got, want)
    with_batch = dc_loss_from_hspace(
        head, hspace, NegativeQueue(16, 8), 0.1, torch.Generator().manual_seed(1)
    )
    assert not torch.allclose(with_batch, got)


@pytest.mark.parametrize("chunks", [(0, 0), (1, 0), (2, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("upcast", [False, True])
def test_chunked_trs_has_the_value_and_gradient_of_the_whole_maps(chunks, upcast):
    # Reference: softmax(q k^T scale) held whole, then frame_distances. 5 frames, 4 heads: the chunks do
    # not divide either evenly.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 9, 6, generator=g, requires_grad=True)  # (B, F, heads, HW, d)
    k = torch.randn(2, 5, 4, 9, 6, generator=g, requires_grad=True)
    weights = torch.rand(4, generator=g)  # per frame pair: the gradient of a weighted sum checks each term
    whole = frame_distances(((q @ k.transpose(-1, -2)) * 0.4).softmax(dim=-1))
    chunked = attention_frame_distances(q, k, 0.4, upcast, *chunks)
    assert chunked.shape == (4,)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    grads_whole = torch.autograd.grad((weights * whole).sum(), (q, k))
    grads_chunked = torch.autograd.grad((weights * chunked).sum(), (q, k))
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_trs_keeps_queries_and_keys_not_the_maps():
    # What autograd saves for the backward: the whole maps path holds (B, F, heads, HW, HW) probabilities
    # (several copies); the chunked path only the q/k it was given.
    q = torch.randn(1, 4, 4, 64, 8, requires_grad=True)  # HW 64 >> d 8: maps are 8x the size of q
    k = torch.randn(1, 4, 4, 64, 8, requires_grad=True)

    def saved_bytes(fn) -> int:
        sizes = {}

        def pack(t):
            sizes[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return sum(sizes.values())

    maps_bytes = 1 * 4 * 4 * 64 * 64 * 4
    whole = saved_bytes(lambda: frame_distances(((q @ k.transpose(-1, -2)) * 0.3).softmax(dim=-1)))
    chunked = saved_bytes(lambda: attention_frame_distances(q, k, 0.3, False, 1, 1))
    assert whole >= maps_bytes  # at least one full copy of the maps
    assert chunked <= 2 * (q.numel() + k.numel()) * 4 + maps_bytes // 8  # q, k and one chunk at most
