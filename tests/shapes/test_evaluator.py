"""The shapes world's evaluator: trained briefly, it separates the seven motions and the scene attributes of
unseen clips far above chance; saved as TorchScript with a card, it loads only with a matching checksum."""

from __future__ import annotations

import pytest
import torch

from shapes.evaluator import FRAMES, ShapesEvaluator, accuracy, load, make_clips, save, train
from shapes.world import ATTRIBUTES


def test_any_length_and_size_go_through_one_protocol():
    model = ShapesEvaluator().eval()
    for frames, size in ((5, 48), (16, 96)):
        out = model(torch.rand(2, frames, 3, size, size))
        assert out["features"].shape == (2, 256) and out["frame_features"].shape == (2, FRAMES, 128)
        assert {k: out[k].shape[1] for k in ATTRIBUTES} == {k: len(v) for k, v in ATTRIBUTES.items()}


def test_clips_carry_their_scenes_labels():
    videos, y = make_clips(40, seed=3)
    assert videos.shape == (40, FRAMES, 3, 64, 64) and videos.dtype == torch.uint8
    # a flat background's corner pixel is the background colour; the labels say which one
    from shapes.world import BACKGROUNDS

    colours = torch.tensor(list(BACKGROUNDS.values()))
    corner = videos[:, 0, :, 0, 0].long()  # (40, 3)
    nearest = (corner[:, None] - colours[None]).abs().sum(-1).argmin(1)
    shaded = (videos[:, 0, :, 0, 0].long() - videos[:, 0, :, -1, 0].long()).abs().sum(1) > 6
    assert (nearest[~shaded] == y["background"][~shaded]).all() and (~shaded).sum() > 5


def test_validation_clips_are_combinations_never_trained_on():
    """Clips of another seed alone would mostly repeat training clips (a few thousand distinct videos)."""
    train_videos, _ = make_clips(300, seed=0, split="train")
    val_videos, _ = make_clips(100, seed=1, split="val")
    seen = {v.numpy().tobytes() for v in train_videos}
    assert not any(v.numpy().tobytes() in seen for v in val_videos)


@pytest.mark.slow
def test_a_briefly_trained_evaluator_sees_motion_and_attributes(tmp_path):
    torch.set_num_threads(2)
    model, record = train(clips=800, steps=300, batch=32, val_clips=300)
    acc = record["heldout_accuracy"]
    chance = {k: 1 / len(v) for k, v in ATTRIBUTES.items()}
    # 300 steps (~1 min): far above chance on combinations never trained on; the CLI trains 1500 steps on 10k clips.
    assert all(acc[k] >= max(0.6, 2 * chance[k]) for k in ATTRIBUTES), acc

    save(model, tmp_path / "ev", record)
    loaded, card = load(tmp_path / "ev", sha256=None)
    videos, y = make_clips(64, seed=99)
    assert accuracy(loaded, videos, y) == accuracy(model, videos, y)
    assert card["heldout_accuracy"] == acc and card["protocol"]["frames"] == FRAMES
    with pytest.raises(ValueError, match="pinned checksum"):
        load(tmp_path / "ev", sha256="0" * 64)
    (tmp_path / "ev" / "evaluator.pt").write_bytes((tmp_path / "ev" / "evaluator.pt").read_bytes() + b"x")
    with pytest.raises(ValueError, match="differs from its card"):
        load(tmp_path / "ev")


def test_the_decoded_share_of_training_clips_goes_through_the_codec_and_is_scored_apart(monkeypatch):
    import shapes.evaluator

    seen: list[torch.Tensor] = []
    batches: list[torch.Tensor] = []

    def codec(videos):  # stands for the VAE round trip: any uint8 -> uint8 map of the same shape
        seen.append(videos.clone())
        return 255 - videos

    monkeypatch.setattr(shapes.evaluator, "augment", lambda v, g: batches.append(v.clone()) or v)
    _, record = train(clips=10, steps=3, batch=8, val_clips=6, codec=codec, decoded_fraction=0.3)
    videos, _ = make_clips(10, seed=0, split="train")
    val, _ = make_clips(6, seed=1_000_003, split="val")
    assert [len(v) for v in seen] == [3, 6] and torch.equal(seen[0], videos[:3]) and torch.equal(seen[1], val)
    # what training draws: the round trip of the first 3 clips (never their rendered frames), the others as rendered
    trained_on = torch.cat([255 - videos[:3], videos[3:]]).float() / 255
    drawn = torch.cat(batches)
    which = [next(i for i in range(10) if torch.equal(v, trained_on[i])) for v in drawn]
    assert min(which) < 3 <= max(which)
    assert record["train"]["decoded_clips"] == 3 and set(record["heldout_accuracy_decoded"]) == set(
        ATTRIBUTES
    )
    _, plain = train(clips=10, steps=1, batch=4, val_clips=6)
    assert "heldout_accuracy_decoded" not in plain and plain["train"]["decoded_clips"] == 0


def test_the_vae_round_trip_is_encode_mode_decode_in_uint8(tmp_path):
    from diffusers import AutoencoderKL

    from shapes.base import vae_config
    from shapes.evaluator import vae_round_trip

    torch.manual_seed(0)
    vae = AutoencoderKL(**(vae_config(4) | dict(block_out_channels=(8, 8, 8)))).eval()
    vae.save_pretrained(tmp_path / "vae")
    videos, _ = make_clips(3, seed=5)
    out = vae_round_trip(tmp_path / "vae", chunk=5)(videos)  # chunks across clip boundaries
    assert out.shape == videos.shape and out.dtype == torch.uint8
    with torch.no_grad():
        x = videos[1, 2][None].float() / 127.5 - 1
        ref = ((vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
    assert (out[1, 2].int() - ref[0].int()).abs().max() <= 1  # batch vs single-frame convolutions
