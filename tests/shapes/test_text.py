"""The base's text encoder: `word_sensitivity` (what its token states tell apart) and the CLIP's
`token_identity_loss` (what keeps every word in them)."""

from __future__ import annotations

import pytest
import torch

from shapes.text import random_text_encoder, sd_tokenizer, token_identity_loss, word_sensitivity
from shapes.world import SHAPES


@pytest.fixture(scope="module")
def tokenizer():
    return sd_tokenizer()


def test_an_encoder_that_cannot_tell_the_shapes_apart_scores_zero_for_shape(tokenizer):
    encoder = random_text_encoder(0)
    plain = word_sensitivity(encoder, tokenizer, n=16)
    assert all(v > 0.05 for v in plain.values()), plain
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in SHAPES]
    assert all(len(i) == 1 for i in ids), ids  # each shape is one token: one embedding row
    emb = encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[[i[0] for i in ids[1:]]] = emb[ids[0][0]].clone()  # every shape word now reads as the first
    blind = word_sensitivity(encoder, tokenizer, n=16)
    assert blind["shape"] == 0.0
    assert blind["colour"] == pytest.approx(
        plain["colour"], rel=0.3
    )  # the others unaffected (up to the reference)


def test_the_token_identity_loss_is_cross_entropy_over_the_batchs_words():
    torch.manual_seed(0)
    ids = torch.tensor([[49406, 320, 736, 49407, 0, 0], [49406, 736, 1000, 320, 500, 49407]])
    states = torch.randn(2, 6, 8)
    head = torch.nn.Linear(8, 49408)
    got = token_identity_loss(states, ids, head)
    vocab = sorted({320, 736, 49407, 1000, 500})  # positions 1..end-of-text of both rows
    terms = []
    for b, last in ((0, 3), (1, 5)):
        for i in range(1, last + 1):
            logits = torch.stack([head(states[b, i])[v] for v in vocab])
            terms.append(-torch.log_softmax(logits, 0)[vocab.index(int(ids[b, i]))])
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
