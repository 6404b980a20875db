"""The video UNet: frozen base, zero-init equivalence to the image model, capture hooks, weight I/O."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from training.model.unet import VideoUNet

TRAINABLE = ("motion_adapter.", "mapping_network.", "frame_tokens.", "contrastive_head.")
TEXT_CONDITIONING = ("none", "cross_attention", "film")


def inputs(b: int, f: int, seed: int = 0, text_dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, f, 8, 8, generator=g)  # (B, C, F, H, W)
    timesteps = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, 77, text_dim, generator=g)  # (B, M, D)
    return latents, timesteps, text


def per_frame_2d(unet: UNet2DConditionModel, latents, timesteps, text) -> torch.Tensor:
    """The image model applied to every frame independently: (B, C, F, H, W)."""
    b, c, f, h, w = latents.shape
    out = unet(
        latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w),
        timesteps.repeat_interleave(f),
        encoder_hidden_states=text.repeat_interleave(f, dim=0),
    ).sample
    return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def test_only_temporal_and_harivo_parameters_train(make_video_model):
    model, _ = make_video_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(TRAINABLE) for n in trainable)
    assert not any(p.requires_grad for p in model.unet.parameters())
    for prefix in TRAINABLE:
        assert any(n.startswith(prefix) for n in trainable), prefix
    model.train()
    assert not model.unet.training and model.motion_adapter.training


@pytest.mark.parametrize("frame_text", ["off", "residual", "basis"])
@pytest.mark.parametrize("text_conditioning", TEXT_CONDITIONING)
@pytest.mark.parametrize("flavor", ["sd", "sd21"])
@torch.no_grad()
def test_zero_init_video_model_equals_image_model_per_frame(
    make_video_model, flavor, text_conditioning, frame_text
):
    # HARIVO's frame tokens (frame_text=tokens) add K tokens to every frame's cross-attention, by design never
    # neutral; our per-frame residual on the text states starts at zero.
    overrides = {"harivo.frame_tokens": frame_text != "off", "model.num_frames": 16}
    overrides["harivo.frame_text"] = "residual" if frame_text == "off" else frame_text
    model, _ = make_video_model(flavor, **overrides, **{"model.text_conditioning": text_conditioning})
    assert (model.temporal_text is None) == (text_conditioning == "none")
    latents, timesteps, text = inputs(2, 16, text_dim=model.unet.config.cross_attention_dim)
    expected = per_frame_2d(model.unet, latents, timesteps, text)
    plain = model(latents, timesteps, text)
    with model.capture() as captured:
        hooked = model(latents, timesteps, text)
    assert plain.shape == latents.shape
    assert (plain - expected).abs().max() <= 1e-5
    assert (hooked - expected).abs().max() <= 1e-5
    assert len(captured.attention_maps) == len(model.decoder_self_attentions()) > 0
    assert captured.hspace is not None


@torch.no_grad()
def test_capture_does_not_change_a_trained_model(make_video_model, perturb_temporal):
    model, _ = make_video_model(**{"model.num_frames": 6})
    perturb_temporal(model)
    latents, timesteps, text = inputs(1, 6)
    plain = model(latents, timesteps, text)
    with model.capture() as captured:
        hooked = model(latents, timesteps, text)
    assert torch.equal(plain, hooked)
    heads = model.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1.heads
    for maps in captured.attention_maps:
        assert maps.shape == (1, 6, heads, 64, 64)  # (B, F, heads, HW, HW) at the 8x8 decoder level
        assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)  # rows are distributions
    assert captured.hspace.shape == (1, 6, 64, 4, 4)  # (B, F, ch, h, w)
    assert model(latents, timesteps, text) is not None and model._state.store is None  # capture ended


@torch.no_grad()
def test_image_mode_skips_temporal_layers(make_video_model, perturb_temporal):
    model, _ = make_video_model(**{"harivo.mapping_network": False, "harivo.frame_tokens": False})
    perturb_temporal(model)
    latents, timesteps, text = inputs(2, 4)
    expected = per_frame_2d(model.unet, latents, timesteps, text)
    assert (model(latents, timesteps, text, image_mode=True) - expected).abs().max() <= 1e-5
    assert (model(latents, timesteps, text) - expected).abs().max() > 1e-3
    # The base UNet called on its own stays a plain image model (hooks inert outside VideoUNet.forward).
    assert (per_frame_2d(model.unet, latents, timesteps, text) - expected).abs().max() == 0
    # Joint image-video batches: images are single frames.
    single = model(latents[:, :, :1], timesteps, text, image_mode=True)
    assert (single - expected[:, :, :1]).abs().max() <= 1e-5


@torch.no_grad()
def test_temporal_layers_match_diffusers_unet_motion_model(make_video_model, perturb_temporal):
    """Same weights, same placement: the adapter exports as a MotionAdapter that UNetMotionModel runs."""
    model, _ = make_video_model(**{"harivo.mapping_network": False, "harivo.frame_tokens": False})
    perturb_temporal(model)
    assert isinstance(model.motion_adapter, MotionAdapter)
    latents, timesteps, text = inputs(1, 4)
    reference = UNetMotionModel.from_unet2d(model.unet, model.motion_adapter).eval()
    expected = reference(latents, timesteps, encoder_hidden_states=text.repeat_interleave(4, dim=0)).sample
    assert (model(latents, timesteps, text) - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_frame_text_residual_conditions_each_frame_once_trained(make_video_model):
    overrides = {"model.num_frames": 4, "harivo.mapping_network": False, "harivo.frame_text": "residual"}
    model, _ = make_video_model(**overrides)
    latents, timesteps, text = inputs(1, 1)
    same_frames = latents.expand(1, 4, 4, 8, 8).contiguous()  # (B, C, F, H, W), four equal frames
    assert torch.equal(
        model(same_frames, timesteps, text)[:, :, 1:], model(same_frames, timesteps, text)[:, :, :3]
    )
    assert model.frame_tokens(text).shape == (1, 4, 77, 32) and not model.frame_tokens(text).any()
    torch.nn.init.normal_(model.frame_tokens.mlp[-1].weight, std=0.1)
    out = model(same_frames, timesteps, text)
    assert (out[:, :, 1:] - out[:, :, :1]).abs().max() > 0  # only the frame embeddings differ per frame
    with pytest.raises(ValueError, match="model.num_frames=4, got 5 frames"):
        model(inputs(1, 5)[0], timesteps, text)


@torch.no_grad()
def test_frame_text_residual_frame_embedding_is_as_large_as_the_text():
    # docs/shapes/pilots.md D5: with the frame embedding at 1/sqrt(D) of unit-scale text states, the frames' inputs
    # differed by a few percent and training learned only what every frame shares.
    from training.model.harivo import FrameTextResidual

    torch.manual_seed(0)
    module = FrameTextResidual(text_dim=128, num_frames=8)
    states = torch.randn(4, 77, 128)  # unit-scale states, as the world's text tower's (|e| / sqrt(D) ~ 1)
    text = module.state(states) + module.context(states.mean(1, keepdim=True))
    assert module.frame_embedding.std() / text.std() > 0.5


@torch.no_grad()
def test_frame_text_basis_is_a_time_polynomial_times_the_text_once_trained(make_video_model):
    from training.model.harivo import FrameTextBasis, legendre

    tau = torch.linspace(-1, 1, 9, dtype=torch.float64)  # closed forms of P_0 .. P_3
    want = torch.stack([torch.ones_like(tau), tau, (3 * tau**2 - 1) / 2, (5 * tau**3 - 3 * tau) / 2], 1)
    assert torch.allclose(legendre(tau, 4), want)
    overrides = {"model.num_frames": 4, "harivo.mapping_network": False, "harivo.frame_text": "basis"}
    model, _ = make_video_model(**overrides)
    assert isinstance(model.frame_tokens, FrameTextBasis)
    latents, timesteps, text = inputs(1, 1)
    assert model.frame_tokens(text).shape == (1, 4, 77, 32) and not model.frame_tokens(text).any()
    torch.nn.init.normal_(model.frame_tokens.mlp[-1].weight, std=0.1)
    r = model.frame_tokens(text)  # (B, F, M, D)
    h = model.frame_tokens.mlp(
        model.frame_tokens.state(text) + model.frame_tokens.context(text.mean(1, True))
    )
    h = h.unflatten(-1, (4, 32))  # (B, M, K, D)
    p = legendre(torch.linspace(-1, 1, 4, dtype=torch.float64), 4).float()
    assert torch.allclose(r[0, 0], (p[0, :, None, None] * h[0].transpose(0, 1)).sum(0), atol=1e-6)
    trend = r[:, -1] - r[:, 0]  # the linear term flips with the text term's sign, the constant one does not
    model.frame_tokens.mlp[-1].weight.data = -model.frame_tokens.mlp[-1].weight.data
    assert torch.allclose(model.frame_tokens(text)[:, -1] - model.frame_tokens(text)[:, 0], -trend)
    same_frames = latents.expand(1, 4, 4, 8, 8).contiguous()
    out = model(same_frames, timesteps, text)
    assert (out[:, :, 1:] - out[:, :, :1]).abs().max() > 0  # each frame asked for its own state


@torch.no_grad()
def test_frame_tokens_condition_each_frame(make_video_model):
    model, _ = make_video_model(**{"model.num_frames": 4, "harivo.mapping_network": False})
    latents, timesteps, text = inputs(1, 1)
    same_frames = latents.expand(1, 4, 4, 8, 8).contiguous()  # (B, C, F, H, W), four equal frames
    out = model(same_frames, timesteps, text)
    assert (out[:, :, 1:] - out[:, :, :1]).abs().max() > 0  # only the frame-wise tokens differ per frame
    assert model.frame_tokens(text).shape == (1, 4, 3, 32)  # (B, F, K, D)
    with pytest.raises(ValueError, match="model.num_frames=4, got 5 frames"):
        model(inputs(1, 5)[0], timesteps, text)
    with pytest.raises(ValueError, match="exceed model.max_frames=32"):
        model(torch.zeros(1, 4, 33, 8, 8), timesteps, text)


# ---- the caption in the temporal layers (model.text_conditioning, SPEC 10) ----------------------------------


@pytest.mark.parametrize("kind", ["cross_attention", "film"])
def test_temporal_text_layers_train_and_read_the_caption(make_video_model, perturb_temporal, kind):
    model, cfg = make_video_model(
        **{"model.text_conditioning": kind, "harivo.mapping_network": False, "harivo.frame_tokens": False}
    )
    layers = model.temporal_text.layers
    assert len(layers) == len(model.temporal_pairs())  # one per motion module
    names = {f"temporal_text.{n}" for n, _ in model.temporal_text.named_parameters()}
    assert names <= {n for n, p in model.named_parameters() if p.requires_grad}
    assert names <= model.trainable_state_dict().keys()
    # At init the zero-initialised output projections get gradients (training can start) ...
    latents, timesteps, text = inputs(1, 4)
    model(latents, timesteps, text).pow(2).mean().backward()
    out_proj = "attn.to_out.0.weight" if kind == "cross_attention" else "proj.weight"
    assert all(layer.get_parameter(out_proj).grad.abs().sum() > 0 for layer in layers)
    # ... and once they are non-zero, every text parameter does.
    model.zero_grad()
    perturb_temporal(model)
    model(latents, timesteps, text).pow(2).mean().backward()
    for name, p in model.temporal_text.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        # The temporal output depends on the caption: one layer, the same features, two captions.
        c = model.temporal_text.config.channels[0]
        hidden = torch.randn(2, c, 8, 8).repeat_interleave(
            4, dim=0
        )  # (B F, C, H, W): 4 equal frames per clip
        out_a = layers[0](hidden, inputs(2, 1, seed=1)[2], 4)  # captions (B, M, D)
        out_b = layers[0](hidden, inputs(2, 1, seed=2)[2], 4)
        assert (out_a - out_b).abs().max() > 1e-3
        frames = out_a.reshape(2, 4, c, 8, 8)  # (B, F, C, H, W)
        spread = (frames[:, 1:] - frames[:, :1]).abs().max()
        # Cross-attention tells equal frames apart by their position embedding; FiLM is one affine map per clip.
        assert spread > 1e-4 if kind == "cross_attention" else spread == 0
        # The hooks run the text layers in video mode only.
        video, image = model(latents, timesteps, text), model(latents, timesteps, text, image_mode=True)
        for layer in layers:
            for p in (layer.attn.to_out[0] if kind == "cross_attention" else layer.proj).parameters():
                p.zero_()  # back to the identity
        assert (model(latents, timesteps, text) - video).abs().max() > 1e-4
        assert torch.equal(model(latents, timesteps, text, image_mode=True), image)
    with pytest.raises(ValueError, match="do not fit model.text_conditioning=none"):
        VideoUNet(
            model.unet,
            replace(cfg.model, text_conditioning="none"),
            cfg.harivo,
            model.motion_adapter,
            temporal_text=model.temporal_text,
        )


def test_optimizer_step_changes_only_trainable_weights(make_video_model):
    model, _ = make_video_model(**{"model.num_frames": 4})
    base_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    latents, timesteps, text = inputs(1, 4)
    with model.capture() as captured:
        pred = model(latents, timesteps, text)
    loss = (
        pred.pow(2).mean()
        + captured.attention_maps[-1].mean()
        + model.contrastive_head(captured.hspace[:, 0]).mean()
    )
    loss.backward()
    assert all(p.grad is None for p in model.unet.parameters())
    optimizer.step()
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    changed = [k for k, v in model.trainable_state_dict().items() if not torch.equal(v, trainable_before[k])]
    assert any(k.startswith("motion_adapter.") for k in changed)


def test_trainable_weights_saved_apart_from_the_base(make_video_model, perturb_temporal, tmp_path):
    model, cfg = make_video_model()
    perturb_temporal(model)
    path = model.save_trainable(tmp_path / "trainable.safetensors")
    state = model.trainable_state_dict()
    assert state and not any(k.startswith("unet.") for k in state)

    fresh, _ = make_video_model()
    latents, timesteps, text = inputs(1, 4)
    with torch.no_grad():
        assert not torch.equal(fresh(latents, timesteps, text), model(latents, timesteps, text))
        fresh.load_trainable(path)
        assert torch.equal(fresh(latents, timesteps, text), model(latents, timesteps, text))
    with pytest.raises(ValueError, match="frozen-base keys"):
        fresh.load_trainable_state_dict({"unet.conv_in.weight": torch.zeros(1)})

    # The temporal layers alone, as a diffusers MotionAdapter, initialise a new model.
    model.motion_adapter.save_pretrained(tmp_path / "adapter")
    cfg.model.motion_adapter = str(tmp_path / "adapter")
    reloaded = VideoUNet.from_pretrained(cfg.model, cfg.harivo)
    for k, v in model.motion_adapter.state_dict().items():
        assert torch.equal(reloaded.motion_adapter.state_dict()[k], v), k


@pytest.mark.parametrize("text_conditioning", TEXT_CONDITIONING)
def test_gradient_checkpointing_gives_the_same_gradients(
    make_video_model, perturb_temporal, text_conditioning
):
    grads = []
    for checkpointing in (False, True):
        model, _ = make_video_model(
            **{"model.gradient_checkpointing": checkpointing, "model.text_conditioning": text_conditioning}
        )
        perturb_temporal(model)
        latents, timesteps, text = inputs(1, 4)
        model(latents, timesteps, text).pow(2).mean().backward()
        temporal = [*model.motion_adapter.parameters()]
        temporal += [*model.temporal_text.parameters()] if model.temporal_text is not None else []
        grads.append(torch.cat([p.grad.flatten() for p in temporal]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # HARIVO: temporal layers, mapping network, frame tokens; L_TRS / L_reg / L_DC capture
        {"model.trainable_spatial": ["*attentions*"], "data.images_per_clip": 2, "data.image_path": "images"},
        {  # the same with the caption in the temporal layers (RunState.text replayed too)
            "model.trainable_spatial": ["*attentions*"],
            "data.images_per_clip": 2,
            "data.image_path": "images",
            "model.text_conditioning": "cross_attention",
        },
    ],
)
def test_whole_unet_checkpointing_gives_the_same_loss_and_gradients(
    make_video_model, perturb_temporal, overrides
):
    # diffusers' block checkpointing of the frozen UNet recomputes blocks after the forward: the hooks'
    # state is replayed then, so the temporal layers and captures run as in the forward.
    from training.diffusion.objective import HarivoObjective

    results = []
    for whole in (False, True):
        model, cfg = make_video_model(**{"model.checkpoint_unet": whole, **overrides})
        perturb_temporal(model)
        assert model.unet.is_gradient_checkpointing == whole
        g = torch.Generator().manual_seed(0)
        latents, text = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
        extra = {}
        if overrides:
            extra = dict(
                images=torch.randn(2, 4, 2, 8, 8, generator=g), image_text=text[:, None].expand(2, 2, 77, 32)
            )
        terms = HarivoObjective.for_model(cfg, model)(
            model, latents, text, torch.Generator().manual_seed(1), **extra
        )
        terms.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((terms.detached(), grads, model._state.snapshot()))
    (terms0, grads0, _), (terms1, grads1, idle) = results
    for k in terms0:
        torch.testing.assert_close(terms1[k], terms0[k], rtol=1e-5, atol=1e-7)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6)
    assert idle["num_frames"] is None and idle["store"] is None  # the replays left the state idle


@pytest.mark.parametrize("text_conditioning", ["none", "cross_attention"])
@torch.no_grad()
def test_deepcopy_gives_an_independent_model(make_video_model, perturb_temporal, text_conditioning):
    """EMA copies: the copy's hooks must run the copy's temporal layers, not the original's."""
    model, _ = make_video_model(
        **{"harivo.frame_tokens": False, "model.text_conditioning": text_conditioning}
    )
    latents, timesteps, text = inputs(1, 4)
    before = model(latents, timesteps, text)
    twin = copy.deepcopy(model)
    perturb_temporal(twin)
    assert torch.equal(model(latents, timesteps, text), before)
    assert not torch.equal(twin(latents, timesteps, text), before)


# ---- joint image-video training: images after the clip, trainable spatial layers --------------------------


@pytest.mark.parametrize("text_conditioning", TEXT_CONDITIONING)
@torch.no_grad()
def test_images_after_the_clip_are_the_base_on_their_own(
    make_video_model, perturb_temporal, text_conditioning
):
    """N images concatenated to a clip on the time axis: the clip's output is the model on the clip alone, each
    image's the base UNet on that image with its own caption (no temporal layers, temporal text layers, mapping
    network or frame tokens; the frame tokens' K extra keys are masked out for images)."""
    model, _ = make_video_model(
        **{"model.trainable_spatial": ["*attentions*"], "model.text_conditioning": text_conditioning}
    )
    perturb_temporal(model)
    latents, timesteps, text = inputs(2, 4)
    images, _, _ = inputs(2, 3, seed=1)  # (B, C, N, H, W)
    image_text = torch.randn(2, 3, 77, 32, generator=torch.Generator().manual_seed(2))  # (B, N, M, D)
    joint = model(torch.cat([latents, images], dim=2), timesteps, text, image_text=image_text)
    assert joint.shape == (2, 4, 7, 8, 8)
    assert (joint[:, :, :4] - model(latents, timesteps, text)).abs().max() <= 1e-5
    for i in range(3):
        alone = per_frame_2d(model.unet, images[:, :, i : i + 1], timesteps, image_text[:, i])
        assert (joint[:, :, 4 + i : 5 + i] - alone).abs().max() <= 1e-5
    # The capture observers see the clip's frames only (L_TRS and L_DC are the clip's).
    with model.capture() as captured:
        model(torch.cat([latents, images], dim=2), timesteps, text, image_text=image_text)
    assert captured.hspace.shape[1] == 4 and all(m.shape[1] == 4 for m in captured.attention_maps)
    with pytest.raises(ValueError, match="image_text"):
        model(latents, timesteps, text, image_text=image_text[:1])


def test_trainable_spatial_layers_train_save_and_load(make_video_model):
    model, cfg = make_video_model(**{"model.trainable_spatial": ["*attentions*"]})
    spatial = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    assert spatial == model.spatial_names and spatial and all("attentions" in n for n in spatial)
    assert any(not p.requires_grad for p in model.unet.parameters())  # the resnets stay frozen
    state = model.trainable_state_dict()
    assert {k[5:] for k in state if k.startswith("unet.")} == spatial
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if name in spatial:
                p.add_(0.01)
    fresh, _ = make_video_model(**{"model.trainable_spatial": ["*attentions*"]})
    fresh.load_trainable_state_dict(model.trainable_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    frozen, _ = make_video_model()  # a frozen-base model refuses a checkpoint that trained the base
    with pytest.raises(ValueError, match="not in model.trainable_spatial"):
        frozen.load_trainable_state_dict(model.trainable_state_dict())
    with pytest.raises(ValueError, match=r"'\*nothing\*' matches no UNet parameter"):
        make_video_model(**{"model.trainable_spatial": ["*nothing*"]})


def test_from_scratch_builds_the_unet_from_its_config_alone(tiny_zoo, tmp_path):
    """model.from_scratch reads only the base's unet/config.json (here its weights file is gone)."""
    import shutil

    from fixtures.checkpoints import tiny_train_config

    base = tmp_path / "sd"
    shutil.copytree(tiny_zoo.sd, base)
    for weights in (base / "unet").glob("*.safetensors"):
        weights.unlink()
    cfg = tiny_train_config(base, **{"model.from_scratch": True, "model.trainable_spatial": ["*"]})
    scratch = VideoUNet.from_pretrained(cfg.model, cfg.harivo)
    reference = UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet")
    assert scratch.unet.config.block_out_channels == reference.config.block_out_channels
    assert all(p.requires_grad for p in scratch.unet.parameters())
    scratch.freeze_video_layers()  # data.image_only: only the UNet trains
    assert {n.split(".")[0] for n, p in scratch.named_parameters() if p.requires_grad} == {"unet"}
    with pytest.raises(OSError):
        VideoUNet.from_pretrained(tiny_train_config(base).model)
