"""The tiny zoo round-trips through the real loaders: diffusers from_pretrained and open_clip."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.parametrize("flavor", ["sd", "sd21"])
def test_sd_directory_loads_like_a_real_checkpoint(tiny_zoo, flavor):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    path = getattr(tiny_zoo, flavor)
    index = json.loads((path / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    image = pipe(
        "a red circle moves up",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()
    # Components load on their own too, exactly as the training and pipeline code loads them.
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # 8x downsampling, like SD's VAE
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    expected_pred = "v_prediction" if flavor == "sd21" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected_pred
    # Same seed, same weights: the zoo is deterministic.
    assert torch.equal(unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_tokenizers_agree_with_open_clip_bpe(tiny_zoo):
    import open_clip
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tiny_zoo.sd, subfolder="tokenizer")
    oc = open_clip.get_tokenizer(tiny_zoo.clip)
    texts = ["a red circle moves from left to right on a dark blue background", "Hello, World! 3 cafés..."]
    ids_hf = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_oc = oc(texts)
    assert ids_hf.shape == ids_oc.shape == (2, 77)
    assert hf.vocab_size == 49408
    for a, b in zip(ids_hf, ids_oc):
        n = int((b != 0).sum())  # open_clip pads with 0, SD 1.5's tokenizer with <|endoftext|>
        assert torch.equal(a[:n], b[:n]) and a[0] == 49406 and a[n - 1] == 49407


def test_open_clip_and_aesthetic_head_load(tiny_zoo):
    from pipeline.models import AestheticMLP, load_aesthetic_head, load_clip

    clip, preprocess, tokenizer = load_clip(tiny_zoo.clip)
    from PIL import Image

    image = preprocess(Image.new("RGB", (64, 48), (200, 30, 30))).unsqueeze(0)
    with torch.no_grad():
        img = clip.encode_image(image)
        txt = clip.encode_text(tokenizer(["a red square"]))
    assert img.shape == txt.shape == (1, 32)
    head = load_aesthetic_head(tiny_zoo.aesthetic)
    assert isinstance(head, AestheticMLP) and head.embed_dim == 32
    # LAION layout: the public sac+logos+ava1-l14-linearMSE.pth keys, widths 1024/128/64/16 -> 1.
    state = torch.load(tiny_zoo.aesthetic, weights_only=True)
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 32),
        (128, 1024),
        (64, 128),
        (16, 64),
        (1, 16),
    ]
    score = head(img)
    assert score.shape == (1,) and torch.isfinite(score).all()
    assert torch.allclose(head(img * 7.0), score, atol=1e-5)  # input is L2-normalised first


def test_loaders_fail_clearly_on_missing_paths(tmp_path):
    from pipeline.models import load_aesthetic_head, load_clip

    with pytest.raises(FileNotFoundError, match="aesthetic head not found"):
        load_aesthetic_head(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="open_clip model directory not found"):
        load_clip(f"local-dir:{tmp_path / 'nope'}")
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        load_aesthetic_head(bad)


def test_ensure_tiny_zoo_builds_once(tmp_path, monkeypatch):
    from pipeline import zoo

    calls = []
    real = zoo.build_tiny_zoo
    monkeypatch.setattr(zoo, "build_tiny_zoo", lambda root, seed=0: calls.append(root) or real(root, seed))
    first = zoo.ensure_tiny_zoo(tmp_path / "z")
    second = zoo.ensure_tiny_zoo(tmp_path / "z")
    assert len(calls) == 1 and first == second and first.complete_marker.exists()
