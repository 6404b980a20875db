"""Ray Train + DeepSpeed around the single-device model: the only room of `training/` that imports
`ray.train` or `deepspeed` (besides the `run.py` / `bench.py` drivers).

`worker.py` the per-rank loop (`train_fn_per_worker`), `data.py` the Parquet latent store checked (and joint
training's image store as a Ray Dataset) and batch collation, `split.py` the validation split chosen once per
run, `rows.py` each epoch's order of the training rows and a rank's batches read from it, `engine.py` DeepSpeed
(ZeRO, precision, shards), `checkpoint.py` checkpoints (save, restore), `reshard.py` resuming one on another
number of workers, `progress.py` the step meter, progress line and TensorBoard.

May import every other room of `training/` and `pipeline`; nothing imports it but the drivers.
"""
