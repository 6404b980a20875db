"""Curation on Ray Data: WebVid-format shards -> read -> decode -> filter -> encode -> Parquet latents.

One module per stage (`read`, `decode`, `filters`, `encode`, `write`, `summary`) built on `stream`'s
typed row stages; `parts` keeps the data path in the workers (part files written by the encode actors,
manifests to the driver, shards committed by tasks); `shards` lists the input (local or remote,
collision-free output names); `run` wires them into one streaming Ray Data job; `schema` is the written
contract with `training/`; `pyav` is the decode stage's fallback reader for what decord cannot open (AV1, GIF,
rotated or odd-sized video); `raysession` connects every CLI to Ray (merging with a submitted job's runtime
env) and explains, records or checks paths (the models' too, torch-free) the way a job needs; `config` holds
`PipelineConfig` (and `config_hash`); `configlib` is the one config loader every CLI and Ray Tune share;
`models` loads the pretrained models curation, training and evaluation share (open_clip and its embedding
rule, the aesthetic head, the CLIP text encoder, precision names).

May import: numpy, pyarrow, torch, diffusers, open_clip, ray.data. Never `training`, `tuning` or
`fixtures` (`synth.py` / `zoo.py` are the kept `python -m pipeline.synth|zoo` entry points of the
fixtures, and `bench.py` builds its inputs with them).
"""
