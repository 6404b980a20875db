"""Video metrics usable from the CLI (`training.evaluate`) and Ray Tune objectives: FVD (Frechet distance
of I3D features), CLIPSIM and frame consistency (through `pipeline.models`' CLIP embedding), latent flicker
(`metrics.py`); a domain evaluator's motion / attribute accuracy and domain FVD / FID (`domain.py`, the
shapes world's I3D); FVD's real set decoded from the dataset (`reference.py`); UCF-101 / MSR-VTT readers and
UCF-101's class names (`datasets.py`).

May import torch, numpy and `pipeline` (its models, shard reader and decoder); never `training.distributed`,
`training.sampling` nor Ray.
"""
