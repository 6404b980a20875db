"""Joint image-video training (PYoCo sec. 5) and image models through the real runner: an image store curated by
`pipeline.run` from image shards, trainable spatial layers, Ray Train + DeepSpeed on 2 CPU workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from training.distributed.checkpoint import TrainerState
from training.distributed.data import ImageStream

from .test_worker import _cfg


@pytest.fixture(scope="module")
def image_store(run_pipeline, image_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("image-latents")
    summary = run_pipeline(image_shards, out)
    assert summary["clips_out"] == 6  # every image curated: one latent frame each
    return out


def test_image_stream_resumes_where_it_stopped(ray_local):
    import ray.data

    ds = ray.data.range(10)
    state = TrainerState()
    stream = ImageStream(ds, 4, seed=0, shuffle_buffer=8, state=state)
    drawn = [stream.next()["id"].tolist() for _ in range(5)]  # 2 batches (drop_last) per pass of 10
    assert all(len(b) == 4 for b in drawn)
    assert (state.image_epoch, state.image_batches) == (2, 1)
    resumed_state = TrainerState()
    first = ImageStream(ds, 4, seed=0, shuffle_buffer=8, state=resumed_state)
    for _ in range(3):
        first.next()
    saved = TrainerState(**json.loads(json.dumps(resumed_state.__dict__)))  # as a checkpoint holds it
    resumed = ImageStream(ds, 4, seed=0, shuffle_buffer=8, state=saved)
    assert [resumed.next()["id"].tolist() for _ in range(2)] == drawn[3:]


@pytest.mark.slow
def test_joint_training_trains_the_spatial_layers(ray_local, tiny_zoo, demo_latents, image_store, tmp_path):
    from training.run import train

    run_dir = tmp_path / "joint"
    cfg = _cfg(
        tiny_zoo,
        demo_latents[0],
        run_dir,
        f"data.image_path={image_store}",
        "data.images_per_clip=1",
        "model.trainable_spatial=['*attentions*']",
        "optim.spatial_lr=5e-4",
        "optim.max_steps=3",
    )
    summary = train(cfg)
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert state["image_epoch"] + state["image_batches"] > 0  # the image stream's position is saved
    weights = load_file(str(run_dir / "export" / "trainable.safetensors"))
    spatial = {k[5:] for k in weights if k.startswith("unet.")}
    assert spatial and all("attentions" in k for k in spatial)
    base = UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet").state_dict()
    trained = UNet2DConditionModel.from_pretrained(run_dir / "export" / "unet").state_dict()
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in spatial)  # the spatial layers trained
    assert all(torch.equal(trained[k], base[k]) for k in base if k not in spatial)  # the rest is the base's
    assert any(
        k.startswith("motion_adapter.") and v.abs().sum() > 0 for k, v in weights.items() if "proj_out" in k
    )


@pytest.mark.slow
def test_an_image_model_trains_from_scratch(ray_local, tiny_zoo, image_store, tmp_path):
    from training.run import train

    run_dir = tmp_path / "image-base"
    cfg = _cfg(
        tiny_zoo,
        image_store,
        run_dir,
        "data.image_only=true",
        "data.val_fraction=0",
        "model.num_frames=1",
        "model.from_scratch=true",
        "model.trainable_spatial=['*']",
        "harivo.mapping_network=false",
        "harivo.frame_tokens=false",
        "optim.batch_size=2",
        "optim.max_steps=3",
    )
    train(cfg)
    trained = UNet2DConditionModel.from_pretrained(run_dir / "export" / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet").state_dict()
    assert trained.keys() == base.keys() and all(torch.isfinite(v).all() for v in trained.values())
    weights = load_file(str(run_dir / "export" / "trainable.safetensors"))
    assert {k[5:] for k in weights if k.startswith("unet.")} == set(base)  # every UNet weight exported
    # Only the UNet trained: the temporal layers are still their zero-initialised selves.
    assert all(
        v.abs().sum() == 0 for k, v in weights.items() if k.startswith("motion_adapter.") and "proj_out" in k
    )
