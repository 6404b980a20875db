"""Single-device `nn.Module`s and their files, no training loop and no sampler.

`unet.py` the video UNet (frozen diffusers UNet + AnimateDiff motion modules), `hooks.py` the forward hooks
that run those modules and observe the base, `text.py` the caption's path into the temporal layers
(model.text_conditioning: temporal cross-attention or FiLM),
`harivo.py` HARIVO's mapping network, frame-wise tokens and contrastive head, `cascade.py` the layers a
PYoCo stage adds (zero-initialised conv_in channels, SR's level embedding), `frames.py` frame folding,
`export.py` the exported weights, the training scheduler and the diffusers pipeline folder (writer and
reader).

May import torch, diffusers, safetensors, `training.config` and `pipeline.configlib`; never
`training.diffusion`, `distributed`, `sampling`, `evaluation`, nor Ray.
"""
