"""The shapes world's CLIP and aesthetic head, trained from scratch so that curation's filters filter.

    python -m shapes.clip --out runs/shapes/clip      # CLIP + aesthetic head + card; minutes on 2 CPU cores

writes under OUT
- `clip/`: an open_clip model directory (`open_clip_config.json` + `open_clip_model.safetensors`, as
  `fixtures.zoo` writes its tiny CLIP), loaded as any checkpoint: `pipeline.models.load_clip("local-dir:OUT/clip")`;
- `aesthetic.pth`: a LAION-layout aesthetic head (`pipeline.models.AestheticMLP`) on this CLIP's image embeddings;
- `card.json`: the thresholds for `clip.min_score` and `aesthetic.min_score`, the held-out score distributions
  they come from, held-out accuracy, retrieval and training seconds.

CLIP: contrastive (symmetric InfoNCE, learnable logit scale clamped at 100 as open_clip's) on clips of scenes
outside `shapes.world.held_out` with their video captions and stills with their still captions ("a small red circle
at the left on a grey background"), with hard negatives and a quality probe (`train_clip`; the clips and stills are
`shapes.filter_data`'s). Its text tower becomes the base's text encoder, which so learns the stills' size and
position words. A clip's embedding is the pipeline's: the normalised mean of the normalised embeddings
of `CLIP_FRAMES` frames, so a motion's kind shows (where the shape is, how big) but not its direction: a mean has
no frame order, and "moves up" passes through the frames "moves down" does.

Aesthetic head: regression (MSE, as LAION's linearMSE) to `AESTHETIC_TARGETS` on clean frames (some mildly
JPEG-compressed, as a codec leaves them) and frames degraded by `shapes.degrade`, through the frozen CLIP.

Thresholds (`equal_error_threshold`): the equal-error point between held-out good and bad clips' scores (CLIP:
true caption vs another scene's; aesthetic: clean vs degraded clips, mean over `CLIP_FRAMES` frames as the
pipeline scores), from one held-out set; accuracy is measured on a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models import AestheticMLP, clip_image_embeds, clip_text_embeds
from shapes.degrade import DEGRADATIONS, other_scene, random_degrade
from shapes.filter_data import (
    CLIP_FRAMES,
    SIZE,
    aesthetic_clips,
    clip_frames,
    draw,
    make_batch,
    other_moment,
    twin,
)
from shapes.text import sd_tokenizer, text_encoder_from_open_clip, token_identity_loss, word_sensitivity
from shapes.world import sample_still, still_caption

log = logging.getLogger(__name__)

CLIP_CFG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
"""Vision: open_clip's ModifiedResNet (RN50's layout, one bottleneck per stage, attention pooling) on 64x64
frames, the demo view's size, so the pipeline's resize and crop change nothing. A ResNet rather than a ViT: on 2
cores a ViT (patch 8 or 16, width 128, 3 layers) learned the scenes less well in as many steps, and image
quality not at all (noise, blur, JPEG blocks are local statistics a convolution sees at once). Text: open_clip's standard
transformer, the tower a Stable Diffusion text encoder is converted from."""
TRAIN_TEXT_LENGTH = 32
"""Token positions the text tower runs on in training (every caption of the world ends before; see
`encode_text_prefix`)."""
AESTHETIC_TARGETS = {"clean": 7.0, "degraded": 3.0}
"""Regression targets on LAION's 1-10 scale."""
CLIP_DIR, AESTHETIC_FILE, CARD_FILE = "clip", "aesthetic.pth", "card.json"


def preprocess_cfg() -> dict:
    """What `open_clip_config.json` records as the preprocessing: OpenAI's mean / std, bicubic, shortest side."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def new_clip(seed: int = 0):
    """(untrained open_clip CLIP, its eval preprocess, its tokenizer): what `load_clip` builds from the saved dir."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(seed)
    model = open_clip.CLIP(**CLIP_CFG)
    c = preprocess_cfg()
    preprocess = open_clip.image_transform(
        SIZE, False, tuple(c["mean"]), tuple(c["std"]), c["resize_mode"], c["interpolation"]
    )
    return model, preprocess, SimpleTokenizer(context_length=CLIP_CFG["text_cfg"]["context_length"])


# --- the contrastive model -------------------------------------------------------------------------------------


def pixels(preprocess, frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> CLIP input (N, 3, SIZE, SIZE) through CLIP's own preprocessing."""
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(f)) for f in frames])


def clip_embeds(frame_embeds: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised per-frame embeddings (N k, D) -> clip embeddings (N, D): the normalised mean over each clip's
    k frames, as `pipeline.filters.ClipScorer.scores` takes it."""
    return F.normalize(frame_embeds.view(-1, k, frame_embeds.shape[-1]).mean(1), dim=-1)


def encode_text_prefix(
    model, ids: torch.Tensor, length: int = TRAIN_TEXT_LENGTH, states: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`model.encode_text(ids)` computed on the first `length` token positions: the text transformer is causal and
    pools at the end-of-text token, so the result is the same whenever every caption ends before `length`
    (tested), for 77 / `length` less text compute. `states`: also return the token states (B, length, W) after
    the final layer norm, what the base's UNet reads from the converted tower."""
    eot = ids.argmax(-1)  # the end-of-text token has the highest id, as open_clip pools
    if (eot >= length).any():
        raise ValueError(f"a caption is {int(eot.max()) + 1} tokens, over {length}; raise TRAIN_TEXT_LENGTH")
    ids = ids[:, :length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]  # (B, L, W)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    pooled = x[torch.arange(len(ids)), eot] @ model.text_projection  # end-of-text feature -> (B, D)
    return (pooled, x) if states else pooled


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, captions: list[str]):
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, fig. 3) on normalised (B, D) embeddings, every pair with the
    same caption a positive (scenes differing only in shading share one)."""
    logits = logit_scale.exp() * img @ txt.T  # (B, B)
    codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([codes[c] for c in captions])
    neg = ids[:, None] != ids[None, :]  # (B, B) True where the captions differ
    per_image = -(logits.log_softmax(1).masked_fill(neg, -math.inf).logsumexp(1))
    per_text = -(logits.log_softmax(0).masked_fill(neg, -math.inf).logsumexp(0))
    return (per_image.mean() + per_text.mean()) / 2


def train_clip(
    steps: int = 300,
    scenes: int = 64,
    stills: int = 8,
    lr: float = 2e-3,
    quality_weight: float = 1.0,
    token_weight: float = 1.0,
    seed: int = 0,
) -> tuple[object, dict]:
    """A trained CLIP (eval mode) and its training record.

    Web captions sometimes say "blurry" or "low quality", which is how a web CLIP's embeddings come to carry image
    quality for the LAION head to read; this world's captions never do. So a linear probe on the image embedding
    learns to tell degraded clips (`spoil`) while the contrastive loss pairs them with their captions as well: the
    embedding carries quality beside content, and the CLIP score stays about content. The probe is not saved.
    The contrastive loss reads only the end-of-text token and soon folds the other words' states (what the base's
    UNet reads) into colour and background; `token_weight` x `shapes.text.token_identity_loss` keeps every word
    (pilots.md D2, C1). Each log line measures the tower's `word_sensitivity` (~2 s): the record's `text_states`.
    """
    model, preprocess, tokenizer = new_clip(seed)
    probe = torch.nn.Linear(CLIP_CFG["embed_dim"], 1)
    words = torch.nn.Linear(CLIP_CFG["text_cfg"]["width"], CLIP_CFG["text_cfg"]["vocab_size"])
    named = [*model.named_parameters()]
    named += [
        (f"{h}.{n}", p) for h, m in (("probe", probe), ("words", words)) for n, p in m.named_parameters()
    ]
    flat = {
        n for n, p in named if p.ndim < 2 or "logit_scale" in n
    }  # as open_clip: no decay on gains, biases
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n not in flat], "weight_decay": 0.1},
            {"params": [p for n, p in named if n in flat], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))
    )
    rng = np.random.default_rng(seed)
    sd_tok, curve = sd_tokenizer(), []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        # a batch of twins (hard negatives), some degraded, and a few stills
        frames, captions, degraded = make_batch(rng, scenes, stills)
        n = len(captions) - stills  # clips; the stills follow
        e = F.normalize(model.encode_image(pixels(preprocess, frames)), dim=-1)  # (n k + stills, D)
        img = torch.cat([clip_embeds(e[: n * CLIP_FRAMES], CLIP_FRAMES), e[n * CLIP_FRAMES :]])  # (B, D)
        ids = tokenizer(captions)
        pooled, states = encode_text_prefix(model, ids, states=True)
        txt = F.normalize(pooled, dim=-1)  # (B, D)
        # content: InfoNCE over the batch; quality: the probe on the same image embeddings
        # (unit embeddings have entries ~1/sqrt(D): scaled to ~1, as a linear layer's init expects)
        logits = probe(img * img.shape[-1] ** 0.5).squeeze(-1)  # (B,)
        quality = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(degraded).float())
        loss = contrastive_loss(img, txt, model.logit_scale, captions) + quality_weight * quality
        if token_weight:
            loss = loss + token_weight * token_identity_loss(states, ids[:, : states.shape[1]], words)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "clip step %d/%d loss %.4f (quality %.4f) logit scale %.1f [%.0f s]",
                step + 1,
                steps,
                loss.item(),
                quality.item(),
                model.logit_scale.exp().item(),
                time.perf_counter() - t0,
            )
            curve.append([step + 1, word_sensitivity(text_encoder_from_open_clip(model), sd_tok)])
    record = dict(steps=steps, scenes=scenes, stills=stills, lr=lr, quality_weight=quality_weight)
    record |= dict(token_weight=token_weight, seed=seed, text_states=curve)
    return model.eval().requires_grad_(False), dict(train=record, seconds=round(time.perf_counter() - t0, 1))


def train_aesthetic(
    model, preprocess, clips: int = 2000, steps: int = 1500, lr: float = 1e-3, seed: int = 0
) -> tuple[AestheticMLP, dict]:
    """An aesthetic head on the frozen CLIP's frame embeddings (eval mode) and its training record."""
    t0 = time.perf_counter()
    frames, bad, _ = aesthetic_clips(np.random.default_rng([seed, 1]), clips, "train")
    x = torch.cat(
        [clip_image_embeds(model, preprocess, frames[i : i + 256]) for i in range(0, len(frames), 256)]
    )
    target = torch.where(
        torch.from_numpy(bad).repeat_interleave(CLIP_FRAMES),
        AESTHETIC_TARGETS["degraded"],
        AESTHETIC_TARGETS["clean"],
    )
    torch.manual_seed(seed)
    head = AestheticMLP(embed_dim=x.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=g)
        loss = F.mse_loss(head(x[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log.info("aesthetic step %d/%d mse %.4f", step + 1, steps, loss.item())
    record = dict(clips=clips, steps=steps, lr=lr, seed=seed, targets=AESTHETIC_TARGETS)
    return head.eval().requires_grad_(False), dict(train=record, seconds=round(time.perf_counter() - t0, 1))


# --- scores, thresholds, card ----------------------------------------------------------------------------------


def equal_error_threshold(good: np.ndarray, bad: np.ndarray) -> float:
    """The equal-error point of a filter keeping scores >= t: the t (a midpoint between observed scores) minimising
    the larger of the share of `good` below t and the share of `bad` at or above t; where a range of scores ties
    (two separated sets), the middle of that range."""
    s = np.unique(np.concatenate([good, bad]))
    cuts = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
    miss = (good[None, :] < cuts[:, None]).mean(1)  # good rejected
    keep = (bad[None, :] >= cuts[:, None]).mean(1)  # bad kept
    err = np.maximum(miss, keep)
    best = cuts[err <= err.min() + 1e-12]
    return float((best.min() + best.max()) / 2)


def summary(x: np.ndarray) -> dict:
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return dict(n=len(x), mean=round(float(x.mean()), 4), std=round(float(x.std()), 4)) | {
        k: round(float(v), 4) for k, v in zip(("p05", "p50", "p95"), q)
    }


@torch.no_grad()
def clip_scores(model, preprocess, tokenizer, n: int, seed: int) -> dict[str, np.ndarray]:
    """Held-out ('val') clips' CLIP scores with their true caption, another scene's ('miscaptioned', as the
    shards mis-caption), a one-attribute twin's ('twin'), and their true caption when degraded ('degraded');
    plus 'retrieved': whether the true caption is the best of all the clips' distinct captions."""
    rng = np.random.default_rng([seed, 2])
    scenes = [draw(rng, "val") for _ in range(n)]
    frames = np.concatenate([clip_frames(s, rng) for s in scenes])
    img = clip_embeds(clip_image_embeds(model, preprocess, frames), CLIP_FRAMES)  # (n, D)
    kinds = [DEGRADATIONS[i % len(DEGRADATIONS)] for i in range(n)]
    worse = [
        random_degrade(frames[i * CLIP_FRAMES : (i + 1) * CLIP_FRAMES], k, rng) for i, k in enumerate(kinds)
    ]
    img_bad = clip_embeds(clip_image_embeds(model, preprocess, np.concatenate(worse)), CLIP_FRAMES)

    def text(captions: list[str]) -> torch.Tensor:
        return clip_text_embeds(model, tokenizer, captions)

    true = text([s.caption for s in scenes])
    distinct = list(dict.fromkeys(s.caption for s in scenes))
    best = (img @ text(distinct).T).argmax(1)
    return dict(
        true=(img * true).sum(-1).numpy(),
        miscaptioned=(img * text([other_scene(s, rng).caption for s in scenes])).sum(-1).numpy(),
        twin=(img * text([twin(s, rng).caption for s in scenes])).sum(-1).numpy(),
        degraded=(img_bad * true).sum(-1).numpy(),
        retrieved=np.array([distinct[int(j)] == s.caption for j, s in zip(best, scenes)]),
    )


@torch.no_grad()
def still_scores(model, preprocess, tokenizer, n: int, seed: int) -> dict[str, float]:
    """On `n` stills of `held_out_still` combinations (never trained on as stills): how often a still's caption
    scores above the caption of the same scene at another moment (another position, size: `other_moment`)."""
    rng = np.random.default_rng([seed, 4])
    drawn = [sample_still(rng, SIZE, SIZE, "val") for _ in range(n)]
    img = clip_image_embeds(model, preprocess, np.stack([frame for _, _, frame in drawn]))  # (n, D)
    true = [still_caption(scene, s) for scene, s, _ in drawn]
    other = [still_caption(scene, other_moment(scene, s, rng)) for scene, s, _ in drawn]
    differs = np.array([a != b for a, b in zip(true, other)])
    score = lambda captions: (img * clip_text_embeds(model, tokenizer, captions)).sum(-1).numpy()  # noqa: E731
    above = (score(true) > score(other))[differs]
    return dict(true_above_placement_twin=round(float(above.mean()), 4), n=int(differs.sum()))


@torch.no_grad()
def aesthetic_scores(model, preprocess, head, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(clip scores (n,): the mean head score over each clip's frames as the pipeline takes it, degraded, kinds)."""
    frames, bad, kinds = aesthetic_clips(np.random.default_rng([seed, 3]), n, "val")
    e = clip_image_embeds(model, preprocess, frames)
    return head(e).view(n, CLIP_FRAMES).mean(1).numpy(), bad, kinds


def calibrate(model, preprocess, tokenizer, head, n: int = 400, seed: int = 0) -> dict:
    """Thresholds from one held-out set, accuracy and separation on another (both of unseen combinations)."""
    cal, test = (
        clip_scores(model, preprocess, tokenizer, n, seed),
        clip_scores(model, preprocess, tokenizer, n, seed + 1),
    )
    clip_t = equal_error_threshold(cal["true"], cal["miscaptioned"])
    a_cal, bad_cal, _ = aesthetic_scores(model, preprocess, head, n, seed)
    a_test, bad_test, kinds = aesthetic_scores(model, preprocess, head, n, seed + 1)
    aes_t = equal_error_threshold(a_cal[~bad_cal], a_cal[bad_cal])
    by_kind = {k: float((a_test[np.array(kinds) == k] < aes_t).mean()) for k in DEGRADATIONS}
    return dict(
        thresholds={"clip.min_score": round(clip_t, 4), "aesthetic.min_score": round(aes_t, 4)},
        rule="equal-error point between held-out good and bad scores (shapes.clip.equal_error_threshold)",
        clip=dict(
            heldout_accuracy=round(
                float(((test["true"] >= clip_t).mean() + (test["miscaptioned"] < clip_t).mean()) / 2), 4
            ),
            true_above_miscaptioned=round(float((test["true"] > test["miscaptioned"]).mean()), 4),
            true_above_twin=round(float((test["true"] > test["twin"]).mean()), 4),
            retrieval_top1=round(float(test["retrieved"].mean()), 4),
            scores={k: summary(test[k]) for k in ("true", "miscaptioned", "twin", "degraded")},
            stills=still_scores(model, preprocess, tokenizer, n, seed + 1),
        ),
        aesthetic=dict(
            heldout_accuracy=round(
                float(((a_test[~bad_test] >= aes_t).mean() + (a_test[bad_test] < aes_t).mean()) / 2), 4
            ),
            clean_kept=round(float((a_test[~bad_test] >= aes_t).mean()), 4),
            degraded_rejected=by_kind,
            scores={"clean": summary(a_test[~bad_test]), "degraded": summary(a_test[bad_test])},
        ),
        heldout=f"{n} clips each of the held_out combinations (shapes.world.held_out), never trained on",
    )


# --- files -----------------------------------------------------------------------------------------------------


def save_clip(model, out: str | Path) -> str:
    """`out/open_clip_config.json` + `out/open_clip_model.safetensors`; returns the `local-dir:` model name."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": CLIP_CFG, "preprocess_cfg": preprocess_cfg()}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors")
    )
    return f"local-dir:{out}"


def build(
    out: str | Path,
    steps: int = 300,
    aesthetic_clips: int = 2000,
    aesthetic_steps: int = 1500,
    heldout: int = 400,
    seed: int = 0,
    token_weight: float = 1.0,
) -> dict:
    """Train both models, calibrate their thresholds and write `out/clip/`, `out/aesthetic.pth`, `out/card.json`
    (`text_states`: the trained tower's `word_sensitivity`; its curve over training is in `training.clip`)."""
    out = Path(out)
    t0 = time.perf_counter()
    model, clip_record = train_clip(steps=steps, token_weight=token_weight, seed=seed)
    _, preprocess, tokenizer = new_clip(seed)
    head, head_record = train_aesthetic(model, preprocess, aesthetic_clips, aesthetic_steps, seed=seed)
    log.info("calibrating on held-out clips")
    card = calibrate(model, preprocess, tokenizer, head, heldout, seed + 100)
    card["text_states"] = clip_record["train"]["text_states"][-1][1]  # measured at the last step
    name = save_clip(model, out / CLIP_DIR)
    torch.save(head.state_dict(), out / AESTHETIC_FILE)
    card |= dict(
        clip_model=name,
        aesthetic_head=str(out / AESTHETIC_FILE),
        model_cfg=CLIP_CFG,
        text_tower="open_clip standard: causal, GELU (quick_gelu false), end-of-text (argmax) pooling, pad id 0",
        training={"clip": clip_record, "aesthetic": head_record},
        seconds=round(time.perf_counter() - t0, 1),
    )
    (out / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m shapes.clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for clip/, aesthetic.pth and card.json")
    p.add_argument("--steps", type=int, default=300, help="CLIP training steps")
    p.add_argument("--aesthetic-clips", type=int, default=2000, help="clips the aesthetic head trains on")
    p.add_argument("--aesthetic-steps", type=int, default=1500)
    p.add_argument("--heldout", type=int, default=400, help="held-out clips per calibration / test set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--token-weight",
        type=float,
        default=1.0,
        help="weight of the text tower's token-identity loss (0: off)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    card = build(a.out, a.steps, a.aesthetic_clips, a.aesthetic_steps, a.heldout, a.seed, a.token_weight)
    shown = ("thresholds", "clip", "aesthetic", "text_states", "seconds")
    print(json.dumps({k: card[k] for k in shown}, indent=1))
    return card


if __name__ == "__main__":
    main()
