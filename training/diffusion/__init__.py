"""Diffusion math as small pure functions named for the quantity, one docstring line citing the paper
and equation (k-diffusion style): `noise` (PYoCo priors), `edm` (preconditioning, `Denoiser`), `losses`
(HARIVO's L_simple / L_reg / L_TRS / L_DC), `guidance` (CFG schedule, MG), `jvid` (model mixing, entropy
reduction, smoothing), `samplers` (DDIM / DDPM / Euler / Heun and the diffusers schedules), `cascade`
(PYoCo stage conditioning) and `objective` (one training step's loss terms).

May import torch, diffusers' schedulers, `training.config` and `training.model`; never `distributed`,
`sampling`, `evaluation`, nor Ray.
"""
