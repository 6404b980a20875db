"""Ray Train + DeepSpeed around the single-device model: the only room of `training/` that imports
`ray.train` or `deepspeed` (besides the `run.py` / `bench.py` drivers).

`worker.py` the per-rank loop (`train_fn_per_worker`), `data.py` the Parquet latent store as Ray Datasets
and batch collation, `engine.py` DeepSpeed (ZeRO, precision, shards), `checkpoint.py` checkpoints (save,
restore), `reshard.py` resuming one on another number of workers, `progress.py` the step meter, progress line and TensorBoard.

May import every other room of `training/` and `pipeline`; nothing imports it but the drivers.
"""
