"""Text-to-video sampling from an exported model: `pipeline.py` (`VideoPipeline`: one guided reverse step
after another), `loading.py` (the checkpoint, its base or a swapped one, JVID's image model, LoRA,
ControlNet), `cascade.py` (PYoCo's base -> interpolation -> SR chain), `personalize.py` (LoRA merge,
ControlNet hook), `write.py` (mp4 / gif / latents / JSON records), `video_io.py` (video files), `diffusers_pipeline.py`
(`T2VRayPipeline`: an export as a diffusers pipeline, sampled by `VideoPipeline`),
`config.py` (`SampleConfig`).

May import `training.model`, `training.diffusion`, `training.config` and `pipeline`; never
`training.distributed` nor Ray.
"""
