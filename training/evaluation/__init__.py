"""Video metrics usable from the CLI (`training.evaluate`) and Ray Tune objectives: FVD (Frechet distance
of I3D features), CLIPSIM and frame consistency (through `pipeline.models`' CLIP embedding), latent flicker.

May import torch, numpy and `pipeline.models`; never `training.distributed` nor Ray.
"""
