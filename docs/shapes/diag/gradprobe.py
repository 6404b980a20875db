"""Is there a consistent frame-dependent direction in the diffusion loss's gradient on per-frame text states?"""
import sys, numpy as np, torch
from shapes.base import base_pipeline
from shapes.world import Scene, render, still_caption, COLOURS, BACKGROUNDS, SHAPES
torch.manual_seed(0)
base, n = sys.argv[1], int(sys.argv[2])
tlo, thi = int(sys.argv[3]), int(sys.argv[4])
pipe = base_pipeline(base)
unet, vae, sch = pipe.unet, pipe.vae, pipe.scheduler
sf = vae.config.scaling_factor
ac = sch.alphas_cumprod
rng = np.random.default_rng(0)
F = 8
def enc(caps):
    return pipe.encode_prompt(caps, "cpu", 1, False)[0].float().detach()
res = {}
for motion, sign in (("moves from left to right", 1), ("moves from right to left", -1)):
    scenes = [Scene(str(rng.choice(SHAPES)), c, str(rng.choice(list(BACKGROUNDS))), motion, c, bool(rng.random() < .5))
              for c in rng.choice(list(COLOURS), n)]
    x = torch.from_numpy(np.stack([render(s, F, 64, 64) for s in scenes])).float() / 127.5 - 1  # (n,F,H,W,3)
    x = x.permute(0, 1, 4, 2, 3).flatten(0, 1)
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mean * sf
    e = enc([s.caption for s in scenes])  # (n, M, D)
    E = e[:, None].repeat(1, F, 1, 1).clone().requires_grad_(True)
    t = torch.randint(tlo, thi + 1, (n,)).repeat_interleave(F)
    a, b = ac[t].sqrt()[:, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None]
    noise = torch.randn_like(z0)
    zt = a * z0 + b * noise
    v = a * noise - b * z0
    vp = unet(zt, t, encoder_hidden_states=E.flatten(0, 1)).sample
    ((vp - v) ** 2).mean().backward()
    g = E.grad  # (n, F, M, D)
    left = enc([still_caption(s, 0.0 if sign > 0 else 1.0) for s in scenes])
    right = enc([still_caption(s, 1.0 if sign > 0 else 0.0) for s in scenes])
    u = (right - left)  # per clip: right-state minus left-state (same words otherwise)
    d = -(g[:, -1] - g[:, 0])  # descent direction of frame-last minus frame-first
    cos = torch.nn.functional.cosine_similarity(d.flatten(1), u.flatten(1), dim=1)
    dm = d.mean(0).flatten(); um = u.mean(0).flatten()
    gi = g.mean(1)  # frame-independent part
    print(motion, "| per-clip cos(-(g_last-g_first), right-left): mean %.3f std %.3f" % (cos.mean(), cos.std()),
          "| cos of means %.3f" % torch.nn.functional.cosine_similarity(dm, um, dim=0),
          "| |mean d|/mean|d| %.3f" % (dm.norm() / d.flatten(1).norm(dim=1).mean()),
          "| |g_last-g_first| / |mean_f g| %.3f" % ((g[:, -1] - g[:, 0]).flatten(1).norm(dim=1).mean() / gi.flatten(1).norm(dim=1).mean()))
