"""The shapes world: a small synthetic domain in which every model of the mission can be trained on a CPU.

`world` defines the scenes (shapes, colours, backgrounds, motions), their rendering, captions and labels;
`evaluator` is the world's I3D: a small video network trained on rendered clips (half through the world's VAE) to
predict each label, whose features define a domain FVD and FID and whose heads say whether a generated video shows
its prompt.

May import numpy, torch, `pipeline` and `training`; never `tuning` or `fixtures` (which import this room).
"""
