"""D6b: does a trained video model read the direction? x0 error at high noise (t in 850-999, v-prediction, fixed
noise and t) of clips of each pair of opposite motions, drawn by the video model of a pilot from their own caption,
from the opposite motion's caption and from the empty caption (CFG's unconditional branch). A model that reads the
direction draws a clip better from its own caption than from the swapped one.

    python docs/shapes/diag/swap.py PILOT_DIR BASE_DIR [N per pair] [T_LO T_HI] [off]

"off": the video model with its temporal layers off and its per-frame text on (loss.temporal_off_every's forward)."""
import sys, numpy as np, torch
from pipeline.configlib import load_config
from shapes.base import base_pipeline
from shapes.text import OPPOSITE_MOTIONS
from shapes.world import Scene, render, COLOURS, BACKGROUNDS, SHAPES
from training.diffusion.samplers import ddpm_scheduler
from training.sampling.config import SampleConfig
from training.sampling.loading import load_pipeline

pilot, base = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
t_lo, t_hi = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (850, 1000)
temporal = not (len(sys.argv) > 6 and sys.argv[6] == "off")
vp = load_pipeline(f"{pilot}/train", load_config(SampleConfig, "training/configs/sample_shapes.yaml", {}))
assert vp.train_cfg.diffusion.prediction_type == "v_prediction"
ac = ddpm_scheduler(vp.train_cfg.diffusion).alphas_cumprod
vae, F = base_pipeline(base).vae, vp.num_frames
sf = vae.config.scaling_factor
rng, g = np.random.default_rng(0), torch.Generator().manual_seed(1)
empty = vp.encode_prompt([""]).float()


@torch.no_grad()
def x0err(z0, text, t, noise):
    a, b = ac[t].sqrt()[:, None, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None, None]
    zt = a * z0 + b * noise
    v = vp.video(zt, t, text, temporal=temporal).float()
    return ((a * zt - b * v - z0) ** 2).mean((1, 2, 3, 4))


for pair, (A, B) in OPPOSITE_MOTIONS.items():
    scenes = [Scene(str(rng.choice(SHAPES)), c, str(rng.choice(list(BACKGROUNDS))), m, c, bool(rng.random() < .5))
              for c, m in zip(rng.choice(list(COLOURS), n), [A, B] * (n // 2))]
    swap = [Scene(s.shape, s.colour, s.background, B if s.motion == A else A, s.end_colour, s.gradient) for s in scenes]
    x = torch.from_numpy(np.stack([render(s, F, 64, 64) for s in scenes])).float() / 127.5 - 1
    with torch.no_grad():
        z0 = vae.encode(x.permute(0, 1, 4, 2, 3).flatten(0, 1)).latent_dist.mean * sf  # (n F, C, h, w)
    z0 = z0.unflatten(0, (n, F)).permute(0, 2, 1, 3, 4)  # (n, C, F, h, w)
    t = torch.randint(t_lo, t_hi, (n,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    own = x0err(z0, vp.encode_prompt([s.caption for s in scenes]).float(), t, noise)
    sw = x0err(z0, vp.encode_prompt([s.caption for s in swap]).float(), t, noise)
    un = x0err(z0, empty.expand(n, -1, -1), t, noise)
    is_a = torch.tensor([s.motion == A for s in scenes])
    line = f"{pair:14s} own {own.mean():.4f} swapped {sw.mean():.4f} empty {un.mean():.4f} own<swapped {(own < sw).float().mean():.2f}"
    for name, m in ((A, is_a), (B, ~is_a)):
        line += f" | {name[:20]}: {own[m].mean():.4f} / {sw[m].mean():.4f}"
    print(line, flush=True)
