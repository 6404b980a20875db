"""Training and sampling of the video model: a frozen text-to-image UNet + trainable temporal layers.

Rooms (each `__init__` says what lives there and what it may import):

- `model/`        single-device `nn.Module`s: the video UNet, HARIVO modules, cascade layers, exports;
- `diffusion/`    tensor math in the k-diffusion style: noise priors, EDM, losses, guidance, JVID,
                  samplers, cascade conditioning, one step's objective;
- `distributed/`  Ray Train + DeepSpeed around them: the worker loop, the data feed, the engine,
                  checkpoints; the only room that imports `ray.train` or `deepspeed`;
- `sampling/`     the denoising pipeline, loading, the cascade chain, personalisation, writing videos;
- `evaluation/`   metrics (FVD, CLIPSIM, consistency, flicker).

`config.py` holds `TrainConfig` (its runner sections, optim / data / deepspeed / run, in `runner_config.py`); `run.py`, `sample.py`, `evaluate.py`, `demo.py` and `bench.py` are thin
CLIs. `training` may import `pipeline` (the Parquet schema, the config loader, shared model loaders),
never `tuning`.
"""
