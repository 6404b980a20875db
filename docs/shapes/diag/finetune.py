"""D6c: why does the trained video model not read the direction, when the residual alone learns it (D6)? Continue
a video pilot's model on rendered clips of the six motions (x0 error of the v-prediction, t in T_LO..T_HI), training
only its frame-text module (`which=frame_text`, temporal layers frozen) or everything training.run trains
(`which=all`), and measure the caption swap of each pair (`swap.py`'s measure) every 100 steps.

    python docs/shapes/diag/finetune.py PILOT_DIR BASE_DIR STEPS LR frame_text|frame_text_no_temporal|all [T_LO T_HI]"""
import sys, time, numpy as np, torch
from pipeline.configlib import load_config
from shapes.base import base_pipeline
from shapes.text import OPPOSITE_MOTIONS
from shapes.world import Scene, render, COLOURS, BACKGROUNDS, SHAPES, MOTIONS
from training.diffusion.samplers import ddpm_scheduler
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline

pilot, base, steps, lr, which = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
t_lo, t_hi = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (850, 1000)
torch.manual_seed(0)
vp = load_pipeline(f"{pilot}/train", load_config(SampleConfig, "training/configs/sample_shapes.yaml", {}))
model = vp.video.float()
ac = ddpm_scheduler(vp.train_cfg.diffusion).alphas_cumprod
vae, F = base_pipeline(base).vae, vp.num_frames
sf = vae.config.scaling_factor
rng = np.random.default_rng(0)
if which.startswith("frame_text"):
    params = list(model.frame_tokens.parameters())
    if which == "frame_text_no_temporal":  # the motion modules' output layers zeroed: each one the identity
        zeroed = [p for n, p in model.motion_adapter.named_parameters() if "proj_out" in n]
        for p in zeroed:
            p.data.zero_()
        print("zeroed", len(zeroed), "motion-module output tensors", flush=True)
else:
    keys = set(model.trainable_state_dict())
    params = [p for k, p in model.named_parameters() if k in keys]
for p in params:
    p.requires_grad_(True)
print(which, sum(p.numel() for p in params), "parameters", flush=True)
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def clips(motions):
    scenes = [Scene(str(rng.choice(SHAPES)), c, str(rng.choice(list(BACKGROUNDS))), m, c, bool(rng.random() < .5))
              for c, m in zip(rng.choice(list(COLOURS), len(motions)), motions)]
    x = torch.from_numpy(np.stack([render(s, F, 64, 64) for s in scenes])).float() / 127.5 - 1
    with torch.no_grad():
        z0 = vae.encode(x.permute(0, 1, 4, 2, 3).flatten(0, 1)).latent_dist.mean * sf
    return scenes, z0.unflatten(0, (len(motions), F)).permute(0, 2, 1, 3, 4)


def x0err(z0, text, t, noise):
    a, b = ac[t].sqrt()[:, None, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None, None]
    zt = a * z0 + b * noise
    return ((a * zt - b * model(zt, t, text) - z0) ** 2).mean((1, 2, 3, 4))


g, n = torch.Generator().manual_seed(1), 8
evals = {}
for pair, (A, B) in OPPOSITE_MOTIONS.items():
    sc, z0 = clips([A, B] * (n // 2))
    sw = [Scene(s.shape, s.colour, s.background, B if s.motion == A else A, s.end_colour, s.gradient) for s in sc]
    t = torch.randint(t_lo, t_hi, (n,), generator=g)
    evals[pair] = (z0, vp.encode_prompt([s.caption for s in sc]).float(), vp.encode_prompt([s.caption for s in sw]).float(),
                   t, torch.randn(z0.shape, generator=g))


@torch.no_grad()
def report(step):
    model.eval()
    line = f"step {step:4d}"
    for pair, (z0, own_t, sw_t, t, noise) in evals.items():
        own, sw = x0err(z0, own_t, t, noise), x0err(z0, sw_t, t, noise)
        line += f" | {pair} own {own.mean():.3f} swapped {sw.mean():.3f} ({(own < sw).float().mean():.2f})"
    print(line + f" ({time.time() - t0:.0f}s)", flush=True)
    model.train()


t0 = time.time()
report(0)
for step in range(1, steps + 1):
    sc, z0 = clips([str(rng.choice(MOTIONS[:6])) for _ in range(4)])
    text = vp.encode_prompt([s.caption for s in sc]).float()
    t = torch.randint(t_lo, t_hi, (4,))
    loss = x0err(z0, text, t, torch.randn_like(z0)).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        report(step)
