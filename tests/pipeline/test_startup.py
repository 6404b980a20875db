"""Start-up: the driver reads the VAE / text-encoder facts it records without importing the model libraries, and
gets the same values diffusers and transformers give; the driver and the decode actors import no model library."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import EncodeConfig
from pipeline.encode import model_info

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "open_clip", "av")


def library_info(model: str) -> dict:
    """The fields `model_info` reads, the way it read them through diffusers and transformers."""
    from diffusers import AutoencoderKL
    from transformers import AutoConfig

    vae = AutoencoderKL.load_config(model, subfolder="vae")
    text = AutoConfig.from_pretrained(model, subfolder="text_encoder")
    return {
        "scaling_factor": float(vae["scaling_factor"]),
        "latent_channels": int(vae["latent_channels"]),
        "downsample": 2 ** (len(vae["block_out_channels"]) - 1),
        "prompt_embeds_shape": [int(text.max_position_embeddings), int(text.hidden_size)],
    }


@pytest.mark.parametrize("which", ["sd", "sd21"])
def test_model_info_matches_diffusers_and_transformers(tiny_zoo, which):
    model = str(getattr(tiny_zoo, which))
    info = model_info(EncodeConfig(model=model, text_embeds=True))
    assert {k: info[k] for k in library_info(model)} == library_info(model)
    assert info["vae"] == model and info["vae_revision"] == "" and len(info["vae_hash"]) == 64


def test_configs_the_json_read_does_not_cover_go_to_the_libraries(tiny_zoo, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import AutoConfig

    model = shutil.copytree(tiny_zoo.sd, tmp_path / "sd")
    vae = json.loads((model / "vae" / "config.json").read_text())
    del vae["scaling_factor"]  # an old VAE config: diffusers' default
    (model / "vae" / "config.json").write_text(json.dumps(vae))
    text = json.loads((model / "text_encoder" / "config.json").read_text())
    del text["hidden_size"]  # transformers' CLIPTextConfig default
    (model / "text_encoder" / "config.json").write_text(json.dumps(text))
    info = model_info(EncodeConfig(model=str(model), text_embeds=True))
    assert info["scaling_factor"] == AutoencoderKL.from_config(vae).config.scaling_factor
    text = AutoConfig.from_pretrained(str(model), subfolder="text_encoder")
    assert info["prompt_embeds_shape"] == [text.max_position_embeddings, text.hidden_size]
    (model / "vae" / "config.json").unlink()
    with pytest.raises(OSError, match="config.json"):  # diffusers' own error, as before
        model_info(EncodeConfig(model=str(model)))


def test_the_driver_and_the_decode_actors_import_no_model_library(tiny_zoo, demo_shards, tmp_path):
    """What `pipeline.run` does before Ray starts (config, shards, model checks, VAE facts) plus the stage
    modules the actor classes pickle by reference: numpy / pyarrow / Ray Data only."""
    code = f"""
import sys
from pipeline.run import file_metadata, parse_args, prepare_models
from pipeline.read import list_shards
from pipeline.encode import model_info
from pipeline.decode import DecodeStage
from pipeline.filters import ClipScorer, MetadataFilter, MotionFilter
from pipeline.parts import PartWriter
cfg = parse_args(["--config", "pipeline/configs/demo.yaml", "--input", {str(demo_shards)!r},
                  "--output", {str(tmp_path / "out")!r}, "encode.model={tiny_zoo.sd}",
                  "clip.model={tiny_zoo.clip}", "aesthetic.head={tiny_zoo.aesthetic}"])
list_shards(cfg.input)
prepare_models(cfg)
file_metadata(cfg, model_info(cfg.encode))
print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
