import sys, torch
from pipeline.configlib import load_config
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline
pipe = load_pipeline(f"{sys.argv[1]}/train", load_config(SampleConfig, "training/configs/sample_shapes.yaml", {}))
cap = "a red circle moves from left to right on a dark blue background"
e = pipe.encode_prompt([cap]).float()
r = pipe.video.frame_tokens(e)[0]  # (F, M, D)
left = pipe.encode_prompt(["a medium red circle at the left on a dark blue background"]).float()[0]
right = pipe.encode_prompt(["a medium red circle at the right on a dark blue background"]).float()[0]
print("|e| per state", e[0].norm(dim=-1).mean().item())
print("|r_f| per state, by frame", [round(x, 3) for x in r.norm(dim=-1).mean(-1).tolist()])
print("|r_7 - r_0| per state", (r[-1] - r[0]).norm(dim=-1).mean().item())
print("|right - left| per state", (right - left).norm(dim=-1).mean().item())
d = (r[-1] - r[0]).flatten(); g = (right - left).flatten()
print("cos(r_7 - r_0, right - left)", torch.nn.functional.cosine_similarity(d, g, dim=0).item())
