"""Pipeline fixtures: run the demo preset against the tiny zoo, and build damaged inputs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.conftest import DEMO_PIPELINE as DEMO  # noqa: F401 (imported by the pipeline tests)
from tests.conftest import zoo_overrides  # noqa: F401


def decoder_killing_mp4(index: int = 0) -> bytes:
    """A real H.264 mp4 that makes decord 0.6.0 die with SIGSEGV when read from memory.

    One entry of the `stsz` (sample size) table gets its high byte set, declaring a ~285 MB frame; found
    by fuzzing the synthetic videos (every one tried crashes). The byte size is unchanged, so the
    metadata guards let it through to the decoder, as a real corrupted upload would.
    """
    from fixtures.synth import make_video_sample

    _, members = make_video_sample(index, 0, 24, 8, 64, 64)
    data = bytearray(members["mp4"])
    data[data.find(b"stsz") + 12 + 4 * 3] = 0x11
    return bytes(data)


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def crash_shard_dir(tmp_path_factory):
    """One shard: 3 good videos and one decoder-killing one (key `..._decoder_killer`)."""
    import json

    from fixtures.synth import make_video_sample

    out = tmp_path_factory.mktemp("crash-shard")
    samples = {}
    for i in range(3):
        key, members = make_video_sample(100 + i, 0, 24, 8, 64, 64)
        samples[key] = members
    key, members = make_video_sample(103, 0, 24, 8, 64, 64)
    members["mp4"] = decoder_killing_mp4(103)
    meta = json.loads(members["json"])
    meta["video_metadata"]["format"]["size"] = str(len(members["mp4"]))
    members["json"] = json.dumps(meta).encode()
    samples[f"{key}_decoder_killer"] = members
    write_tar(out / "crash.tar", samples)
    return out
