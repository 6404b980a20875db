"""The training data feed (`training/distributed/data.py`) on the demo pipeline's latent store: the store is
checked against the model config before training, split into train / val by key, and batches are cut into
frame windows of the stored latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import schema
from pipeline.configlib import load_config
from training.config import TrainConfig
from training.distributed.data import (
    LatentStoreError,
    collate,
    collate_stage,
    feed_columns,
    inspect_store,
    is_validation,
)
from training.distributed.rows import RowReader
from training.distributed.split import choose_split

CPU = torch.device("cpu")


def train_config(zoo, path, **overrides) -> TrainConfig:
    """The demo model sizes (8 frames of 8x8 latents) on the tiny zoo's SD, reading `path`."""
    return load_config(
        TrainConfig,
        None,
        {
            "model.pretrained": str(zoo.sd),
            "model.num_frames": 8,
            "model.latent_size": 8,
            "data.path": None if path is None else str(path),
            **overrides,
        },
    )


def clip_files(store: Path) -> list[Path]:
    return sorted((store / "clips").glob("*.parquet"))


def raw_store(store: Path) -> dict[str, dict]:
    """key -> {caption, latents (F, C, h, w), prompt_embeds} straight from the Parquet files."""
    rows: dict[str, dict] = {}
    for path in clip_files(store):
        table = pq.read_table(path)
        latents = schema.latents_array(table)
        embeds = schema.latents_array(table, schema.PROMPT_EMBEDS)
        for i, (key, caption) in enumerate(
            zip(table.column(schema.KEY).to_pylist(), table.column(schema.CAPTION).to_pylist())
        ):
            assert key not in rows, f"duplicate key {key}"
            rows[key] = {"caption": caption, "latents": latents[i], "prompt_embeds": embeds[i]}
    return rows


def numpy_batch(store: Path, embeds: bool = True) -> dict[str, np.ndarray]:
    """The first file's clips as the numpy batch a worker gets from `iter_batches`."""
    table = pq.read_table(clip_files(store)[0])
    batch = {
        schema.KEY: np.array(table.column(schema.KEY).to_pylist()),
        schema.CAPTION: np.array(table.column(schema.CAPTION).to_pylist()),
        schema.LATENTS: schema.latents_array(table),
    }
    if embeds:
        batch[schema.PROMPT_EMBEDS] = schema.latents_array(table, schema.PROMPT_EMBEDS)
    return batch


def expected_window(stored: np.ndarray, start: int, num_frames: int, stride: int) -> torch.Tensor:
    """stored (B, F_s, C, h, w) -> frames start, start + stride, ... as (B, C, F, h, w) float32."""
    span = (num_frames - 1) * stride + 1
    picked = stored[:, start : start + span : stride].astype(np.float32)
    assert picked.shape[1] == num_frames
    return torch.from_numpy(picked.transpose(0, 2, 1, 3, 4).copy())


def rewrite_metadata(store: Path, dest: Path, **changes) -> Path:
    """A one-file copy of `store` with some `t2v.*` metadata values replaced (None: removed)."""
    table = pq.read_table(clip_files(store)[0])
    meta = dict(table.schema.metadata)
    for key, value in changes.items():
        name = f"t2v.{key}".encode()
        assert name in meta, name
        if value is None:
            del meta[name]
        else:
            meta[name] = json.dumps(value).encode()
    (dest / "clips").mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(meta), dest / "clips" / "00000.parquet")
    return dest


def copy_store(store: Path, dest: Path, edit=None, which: int = -1) -> Path:
    """A copy of `store`'s clips files, file `which` rewritten by `edit(table) -> table` (if given)."""
    files = clip_files(store)
    assert len(files) >= 2, files  # the demo store: one file per input shard
    (dest / "clips").mkdir(parents=True)
    for i, path in enumerate(files):
        table = pq.read_table(path)
        if edit is not None and i == which % len(files):
            table = edit(table)
        pq.write_table(table, dest / "clips" / path.name)
    return dest


def with_metadata(**changes):
    """An `edit` replacing `t2v.*` metadata values (None: removed)."""

    def edit(table: pa.Table) -> pa.Table:
        meta = dict(table.schema.metadata)
        for key, value in changes.items():
            if value is None:
                del meta[f"t2v.{key}".encode()]
            else:
                meta[f"t2v.{key}".encode()] = json.dumps(value).encode()
        return table.replace_schema_metadata(meta)

    return edit


def with_latents_type(latents_type):
    """An `edit` retyping the latents column as `latents_type` (same values)."""

    def edit(table: pa.Table) -> pa.Table:
        column = table.column(schema.LATENTS).combine_chunks()
        array = pa.ExtensionArray.from_storage(latents_type, column.storage)
        index = table.schema.get_field_index(schema.LATENTS)
        return table.set_column(index, schema.LATENTS, array).replace_schema_metadata(table.schema.metadata)

    return edit


@pytest.fixture(scope="module")
def store(demo_latents) -> Path:
    return Path(demo_latents[0])


# ---- inspect_store: refusals ------------------------------------------------------------------------


def test_no_data_path_is_refused(tiny_zoo):
    with pytest.raises(LatentStoreError, match="no training data: pass --data"):
        inspect_store(train_config(tiny_zoo, None))


def test_a_missing_path_is_refused(tiny_zoo, tmp_path):
    with pytest.raises(
        LatentStoreError, match=r"data.path not found: .*nowhere \(run `python -m pipeline.run"
    ):
        inspect_store(train_config(tiny_zoo, tmp_path / "nowhere"))


def test_a_store_without_parquet_files_is_refused(tiny_zoo, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentStoreError, match="no .parquet files in .*empty"):
        inspect_store(train_config(tiny_zoo, tmp_path / "empty"))
    # An output dir whose clips/ holds no Parquet (e.g. every sample was rejected): named by its clips dir.
    (tmp_path / "out" / "clips").mkdir(parents=True)
    (tmp_path / "out" / "clips" / "notes.txt").write_text("not parquet")
    (tmp_path / "out" / "stray.parquet").write_text("")  # beside clips/, not in it
    with pytest.raises(LatentStoreError, match=r"no .parquet files in .*out/clips$"):
        inspect_store(train_config(tiny_zoo, tmp_path / "out"))


def test_a_single_parquet_file_as_data_path_is_a_clear_error(tiny_zoo, store):
    with pytest.raises(LatentStoreError, match=rf"{clip_files(store)[0].name} is a file: pass the pipeline"):
        inspect_store(train_config(tiny_zoo, clip_files(store)[0]))


def test_parquet_not_written_by_the_pipeline_is_refused(tiny_zoo, store, tmp_path):
    (tmp_path / "s" / "clips").mkdir(parents=True)
    table = pq.read_table(clip_files(store)[0])
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "s" / "clips" / "a.parquet")
    with pytest.raises(LatentStoreError, match="has no t2v.\\* metadata: not written by pipeline.run"):
        inspect_store(train_config(tiny_zoo, tmp_path / "s"))


def test_latents_of_another_vae_are_refused(tiny_zoo, store, tmp_path):
    other = rewrite_metadata(store, tmp_path / "other", vae="someone/other-sd", vae_hash="0" * 64)
    with pytest.raises(
        LatentStoreError, match=r"encoded with the VAE of 'someone/other-sd', but model.pretrained=.*sd"
    ):
        inspect_store(train_config(tiny_zoo, other))
    # Another name for the same VAE files (the store moved machines) is the same VAE: compared by content.
    moved = rewrite_metadata(store, tmp_path / "moved", vae="/elsewhere/sd")
    assert inspect_store(train_config(tiny_zoo, moved)).latents_shape == [8, 4, 8, 8]


@pytest.mark.parametrize("factor", [0.13025, 1.0, None])
def test_latents_of_another_scaling_factor_are_refused(tiny_zoo, store, tmp_path, factor):
    other = rewrite_metadata(store, tmp_path / "s", scaling_factor=factor)
    with pytest.raises(LatentStoreError, match=rf"were scaled by {factor}, but .*scaling_factor is 0.18215"):
        inspect_store(train_config(tiny_zoo, other))


@pytest.mark.parametrize(
    ("num_frames", "stride"),
    [(8, 1), (9, 1), (4, 2), (4, 3), (3, 3), (3, 4), (1, 50)],
)
def test_clips_must_hold_the_frames_the_model_needs(tiny_zoo, store, num_frames, stride):
    cfg = train_config(tiny_zoo, store, **{"model.num_frames": num_frames, "data.frame_stride": stride})
    needed = (num_frames - 1) * stride + 1  # frames 0, s, 2s, ... of one stored clip
    if needed <= 8:
        assert inspect_store(cfg).latents_shape[0] == 8
    else:
        with pytest.raises(
            LatentStoreError,
            match=f"stores 8 frames; model.num_frames={num_frames} with data.frame_stride={stride} needs {needed}",
        ):
            inspect_store(cfg)


def test_a_view_the_store_lacks_is_refused(tiny_zoo, store):
    with pytest.raises(LatentStoreError, match=r"data.view='sr' not in the views \['main'\] of "):
        inspect_store(train_config(tiny_zoo, store, **{"data.view": "sr"}))


# ---- inspect_store: every file's footer --------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"vae": "someone/other-sd", "vae_hash": "0" * 64}, "t2v.vae_hash"),
        ({"scaling_factor": 0.13025}, "t2v.scaling_factor"),
        ({"latents_dtype": "float32"}, "t2v.latents_dtype"),
        (
            {"views": {"main": {"num_frames": 8, "latents_shape": [8, 4, 16, 16]}}},
            r"t2v.views\[main\].latents_shape",
        ),
    ],
)
def test_a_later_file_of_another_vae_or_layout_is_refused(tiny_zoo, store, tmp_path, changes, field):
    """Only the first file used to be checked: a later one from another VAE trained on, mixed in."""
    mixed = copy_store(store, tmp_path / "mixed", with_metadata(**changes))
    odd, first = clip_files(mixed)[-1].name, clip_files(mixed)[0].name
    with pytest.raises(
        LatentStoreError, match=rf"clips/{odd} does not match .*clips/{first}, .*: {field} is "
    ):
        inspect_store(train_config(tiny_zoo, mixed))
    # Any file may be the odd one; the first is then the reference the others disagree with.
    mixed = copy_store(store, tmp_path / "first", with_metadata(**changes), which=0)
    with pytest.raises(LatentStoreError, match=rf"does not match .*clips/{first}, .*: {field} is "):
        inspect_store(train_config(tiny_zoo, mixed))


def test_a_later_file_whose_tensor_type_differs_only_in_metadata_is_refused(tiny_zoo, store, tmp_path):
    """Same dtype and shape, other extension metadata (dim names): Ray Data cannot concatenate the files."""
    stored = pq.read_schema(clip_files(store)[0]).field(schema.LATENTS).type
    named = pa.fixed_shape_tensor(stored.value_type, stored.shape, dim_names=["F", "C", "H", "W"])
    mixed = copy_store(store, tmp_path / "mixed", with_latents_type(named))
    odd = clip_files(mixed)[-1].name
    with pytest.raises(
        LatentStoreError, match=rf"clips/{odd} does not match .*column 'latents' type is .*dim_names"
    ):
        inspect_store(train_config(tiny_zoo, mixed))
    # A later file that is not the pipeline's at all is named too.
    mixed = copy_store(store, tmp_path / "foreign", lambda t: t.replace_schema_metadata(None))
    with pytest.raises(LatentStoreError, match=rf"clips/{odd} has no t2v.\* metadata"):
        inspect_store(train_config(tiny_zoo, mixed))


@pytest.mark.parametrize("which", [0, -1])
def test_a_truncated_parquet_file_is_named(tiny_zoo, store, tmp_path, which):
    """A writer killed mid-file leaves no footer: refused before training, naming the file."""
    copy = copy_store(store, tmp_path / "s")
    cut = clip_files(copy)[which]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(LatentStoreError, match=rf"clips/{cut.name}: cannot read its Parquet footer \("):
        inspect_store(train_config(tiny_zoo, copy))


def test_a_store_of_empty_files_is_refused_at_once(tiny_zoo, store, tmp_path):
    """Every sample rejected: files with 0 rows. Refused by the pre-flight, not by an empty shard minutes later."""
    empty = tmp_path / "empty"
    (empty / "clips").mkdir(parents=True)
    for path in clip_files(store):
        pq.write_table(pq.read_table(path).slice(0, 0), empty / "clips" / path.name)
    n = len(clip_files(empty))
    with pytest.raises(
        LatentStoreError, match=rf"no clips in .*empty/clips: its {n} .parquet files hold 0 rows"
    ):
        inspect_store(train_config(tiny_zoo, empty))
    # One empty file beside clips is fine: the store is not empty.
    (empty / "clips" / clip_files(empty)[0].name).unlink()
    pq.write_table(pq.read_table(clip_files(store)[0]), empty / "clips" / clip_files(store)[0].name)
    assert inspect_store(train_config(tiny_zoo, empty)).latents_shape == [8, 4, 8, 8]


# ---- inspect_store: what it reports -----------------------------------------------------------------


def test_the_demo_store_is_accepted_and_described(tiny_zoo, store):
    first = clip_files(store)[0]
    table = pq.read_table(first)
    for path in (store, store / "clips"):  # the pipeline's --output dir or its clips/ dir
        info = inspect_store(train_config(tiny_zoo, path))
        assert info.clips_path == str(store / "clips")
        assert info.latents_column == schema.LATENTS == schema.view_column(schema.LATENTS, "main", "main")
        assert info.latents_shape == list(schema.latents_array(table).shape[1:]) == [8, 4, 8, 8]
        assert info.has_prompt_embeds and schema.PROMPT_EMBEDS in table.column_names
        assert info.metadata == schema.decode_metadata(table.schema)
        assert info.total_bytes == sum(p.stat().st_size for p in clip_files(store))
        assert info.cond_column is None and info.cond_shape is None


def test_prompt_embeds_of_another_text_encoder_are_not_used(tiny_zoo, store, tmp_path):
    other = rewrite_metadata(store, tmp_path / "s", text_encoder="someone/other-clip")
    info = inspect_store(train_config(tiny_zoo, other))
    assert not info.has_prompt_embeds and info.latents_shape == [8, 4, 8, 8]


# ---- the train / val split -------------------------------------------------------------------------


def test_is_validation_is_a_stable_fraction_of_keys():
    keys = [f"{shard:05d}{i:04d}" for shard in range(20) for i in range(500)]  # 10,000 WebVid-style keys
    for fraction in (0.05, 0.1, 0.5):
        picked = [is_validation(k, fraction) for k in keys]
        assert picked == [is_validation(k, fraction) for k in keys]  # same answer every time
        assert picked == [is_validation(k, fraction) for k in reversed(keys)][::-1]  # independent of order
        assert abs(np.mean(picked) - fraction) < 0.02  # binomial sd at n=10k: <= 0.005
    assert not any(is_validation(k, 0.0) for k in keys)
    assert all(is_validation(k, 1.0) for k in keys)
    # A larger fraction only moves keys from train to val: no clip is trained on after being held out.
    small, large = {k for k in keys if is_validation(k, 0.1)}, {k for k in keys if is_validation(k, 0.3)}
    assert small < large


def test_train_and_val_partition_the_store(tiny_zoo, store, tmp_path):
    raw = raw_store(store)
    cfg = train_config(tiny_zoo, store, **{"data.val_fraction": 0.5})
    info = inspect_store(cfg)
    split = choose_split(info, 0.5, str(tmp_path / "run"), val_clips=len(raw))  # every held-out clip
    readers = {
        "train": RowReader(split.train, feed_columns(info)),
        "val": RowReader(split.val, feed_columns(info)),
    }
    batches = {
        name: list(r.first(0, 1, 1, len(raw))) for name, r in readers.items()
    }  # every row, one at a time
    train = [str(b[schema.KEY][0]) for b in batches["train"]]
    val = [str(b[schema.KEY][0]) for b in batches["val"]]
    assert len(train) == len(set(train)) and len(val) == len(set(val))  # every clip once
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(raw)
    assert set(val) == {k for k in raw if is_validation(k, 0.5)}
    assert train and val  # the demo store has enough keys for both at 0.5
    for batch in batches["train"] + batches["val"]:
        assert set(batch) == {schema.KEY, schema.CAPTION, schema.LATENTS, schema.PROMPT_EMBEDS}
        want = raw[str(batch[schema.KEY][0])]
        assert str(batch[schema.CAPTION][0]) == want["caption"]
        np.testing.assert_array_equal(batch[schema.LATENTS][0], want["latents"])
        np.testing.assert_array_equal(batch[schema.PROMPT_EMBEDS][0], want["prompt_embeds"])
    # A worker's numpy batches collate to the stored frames of the clips they hold.
    batch = next(readers["train"].epoch(0, 0, 1, 3, 8, seed=0))
    latents, captions, embeds = collate(batch, info, 3, 2, None, CPU)
    stored = np.stack([raw[str(k)]["latents"] for k in batch[schema.KEY]])
    assert torch.equal(latents, expected_window(stored, 0, 3, 2))
    assert captions == [raw[str(k)]["caption"] for k in batch[schema.KEY]]
    assert embeds.shape == (len(captions), 77, 32)


# ---- collate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_frames", "stride"), [(8, 1), (4, 2), (3, 3), (5, 1), (1, 1)])
def test_collate_without_a_generator_takes_the_first_window(tiny_zoo, store, num_frames, stride):
    info = inspect_store(train_config(tiny_zoo, store))
    batch = numpy_batch(store)
    latents, captions, embeds = collate(batch, info, num_frames, stride, None, CPU)
    b = len(batch[schema.KEY])
    assert latents.shape == (b, 4, num_frames, 8, 8) and latents.dtype == torch.float32
    assert torch.equal(latents, expected_window(batch[schema.LATENTS], 0, num_frames, stride))
    assert captions == [str(c) for c in batch[schema.CAPTION]]
    assert embeds.dtype == torch.float32
    assert torch.equal(embeds, torch.from_numpy(batch[schema.PROMPT_EMBEDS].astype(np.float32)))
    _, _, _, cond = collate_stage(batch, info, num_frames, stride, None, CPU)
    assert cond is None  # no SR conditioning view


def find_start(latents: torch.Tensor, stored: np.ndarray, num_frames: int, stride: int) -> int:
    """The one start frame whose window of `stored` equals `latents`."""
    slack = stored.shape[1] - ((num_frames - 1) * stride + 1)
    matches = [
        s for s in range(slack + 1) if torch.equal(latents, expected_window(stored, s, num_frames, stride))
    ]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize(("num_frames", "stride"), [(3, 2), (4, 1), (2, 3)])
def test_collate_with_a_generator_takes_a_random_window_reproducibly(tiny_zoo, store, num_frames, stride):
    info = inspect_store(train_config(tiny_zoo, store))
    batch = numpy_batch(store)
    stored = batch[schema.LATENTS]
    slack = 8 - ((num_frames - 1) * stride + 1)

    def starts(seed: int, n: int = 40) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            latents, _, _ = collate(batch, info, num_frames, stride, g, CPU)
            out.append(find_start(latents, stored, num_frames, stride))  # a window of the stored clip
        return out

    first = starts(0)
    assert first == starts(0)  # same seed, same windows (a resumed run sees the same data)
    assert set(first) == set(range(slack + 1))  # every start in [0, F_s - span] occurs
    assert starts(1) != first


def test_collate_with_no_slack_starts_at_zero(tiny_zoo, store):
    info = inspect_store(train_config(tiny_zoo, store))
    batch = numpy_batch(store, embeds=False)
    for num_frames, stride in ((8, 1), (2, 7)):  # windows spanning all 8 stored frames
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            latents, _, embeds = collate(batch, info, num_frames, stride, g, CPU)
            assert torch.equal(latents, expected_window(batch[schema.LATENTS], 0, num_frames, stride))
            assert embeds is None  # a store without prompt embeddings: the text encoder runs instead
