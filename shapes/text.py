"""The base's text encoder and what it tells apart.

SD 1.5's UNet reads the 77 token states of a frozen text encoder (OpenAI CLIP's text tower); this world's base reads
the text tower of its own open_clip model (`text_encoder_from_open_clip`) or a seeded random one
(`random_text_encoder`). A UNet can only draw a difference its text states carry: `word_sensitivity` measures, for
each attribute a caption names (size, colour, shape, position, background, and the direction of a motion), how far
the token states move when only that word changes, as a fraction of how far they move between two random
captions of the world.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shapes.world import BACKGROUNDS, COLOURS, HORIZONTAL, SHAPES, SIZES, VERTICAL, Scene, still_words

RANDOM_TEXT_WIDTH = 64
WHERE = tuple(f"at the {w}" for w in (*HORIZONTAL[::2], *VERTICAL[::2])) + ("in the centre",)
"""The position phrases of one-axis placements ("at the left", ..., "in the centre"; `placement_words`)."""
OPPOSITE_MOTIONS = {
    "left_right": ("moves from left to right", "moves from right to left"),
    "up_down": ("moves up", "moves down"),
    "grows_shrinks": ("grows", "shrinks"),
}
"""Pairs of video captions' motion phrases that only the order or one word tells apart."""


def text_encoder_from_open_clip(model):
    """A transformers `CLIPTextModel` holding the text tower of open_clip `model` (as SD 1.5 holds OpenAI CLIP's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = model.state_dict()
    width = sd["token_embedding.weight"].shape[1]
    layers = len(model.transformer.resblocks)
    block = model.transformer.resblocks[0]
    act = "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    config = CLIPTextConfig(
        vocab_size=sd["token_embedding.weight"].shape[0],
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=layers,
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=sd["positional_embedding"].shape[0],
        projection_dim=sd["text_projection"].shape[1],
        hidden_act=act,
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    names["attn.out_proj"] = "self_attn.out_proj"
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p, cat in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            q, k, v = sd[src + "attn." + cat].chunk(3, dim=0)
            for name, t in zip("qkv", (q, k, v)):
                out[f"{dst}self_attn.{name}_proj.{p}"] = t
    encoder = CLIPTextModel(config)
    # transformers 4 names the keys text_model.*, transformers 5 drops the prefix from the state dict
    prefixed = any(k.startswith("text_model.") for k in encoder.state_dict())
    out = {(k if prefixed else k.removeprefix("text_model.")): v.clone() for k, v in out.items()}
    missing, unexpected = encoder.load_state_dict(out, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIPTextModel: missing {missing}, unexpected {unexpected}")
    return encoder.eval()


def random_text_encoder(seed: int = 0):
    """A seeded random `CLIPTextModel` (when no world CLIP is given): the UNet learns to read its states."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    w = RANDOM_TEXT_WIDTH
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=w,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()


def token_identity_loss(states: torch.Tensor, ids: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """Cross-entropy of naming each caption's word at each position from the text tower's state there: (B, L, W)
    states, (B, L) token ids (start-of-text first, end-of-text the highest id, padding 0), `head` a Linear from W to
    the vocabulary. Positions 1 to end-of-text count; the logits are over the ids the batch holds (its few dozen
    words, not the 49k of the vocabulary). A causal tower can meet it by keeping each token in its residual
    stream: the words stay readable, and so does their order ("from left to right" against "from right to left")."""
    eot = ids.argmax(-1, keepdim=True)  # (B, 1)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, L)
    keep = (pos >= 1) & (pos <= eot)  # (B, L)
    vocab, target = torch.unique(ids[keep], return_inverse=True)  # (V,), (N,)
    logits = states[keep] @ head.weight[vocab].T + head.bias[vocab]  # (N, V)
    return torch.nn.functional.cross_entropy(logits, target)


def sd_tokenizer():
    """The tokenizer SD 1.5's pipeline (and `write_base`) pairs with the encoder: the real CLIP BPE, padded with
    end-of-text to 77 positions (offline: the vocabulary open_clip ships)."""
    import tempfile

    from pipeline.models import clip_tokenizer

    with tempfile.TemporaryDirectory() as d:
        return clip_tokenizer(Path(d))


@torch.no_grad()
def word_sensitivity(text_encoder, tokenizer, n: int = 64, seed: int = 0) -> dict[str, float]:
    """{attribute: mean |H(c) - H(c')| / mean |H(c) - H(r)|} over `n` still captions c: H the encoder's token
    states as SD's pipeline feeds the UNet (`last_hidden_state`, 77 positions, padded to max length), c' the caption
    with that attribute's word(s) changed, r another random caption. 0: the UNet cannot read the attribute; about
    the attribute's share of the words: it changes the states as much as any word does. Motion pairs
    (`OPPOSITE_MOTIONS`) are video captions "a <colour> <shape> <motion> on a <background> background" of the same
    draws."""
    rng = np.random.default_rng(seed)
    slots = dict(size=SIZES, colour=tuple(COLOURS), shape=SHAPES, where=WHERE, background=tuple(BACKGROUNDS))

    def draw() -> dict[str, str]:
        return {k: str(rng.choice(v)) for k, v in slots.items()}

    def states(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return text_encoder(ids.input_ids).last_hidden_state.flatten(1)  # (n, 77 W)

    def dist(a: list[str], b: list[str]) -> float:
        return float((states(a) - states(b)).norm(dim=1).mean())

    base = [draw() for _ in range(n)]
    captions = [still_words(**d) for d in base]
    ref = dist(captions, [still_words(**draw()) for _ in range(n)])
    out = {}
    for k, words in slots.items():
        other = [d | {k: str(rng.choice([w for w in words if w != d[k]]))} for d in base]
        out[k] = round(dist(captions, [still_words(**d) for d in other]) / ref, 4)
    for name, (a, b) in OPPOSITE_MOTIONS.items():

        def video(d: dict[str, str], motion: str) -> str:
            return Scene(d["shape"], d["colour"], d["background"], motion, d["colour"], False).caption

        out[name] = round(dist([video(d, a) for d in base], [video(d, b) for d in base]) / ref, 4)
    return out
