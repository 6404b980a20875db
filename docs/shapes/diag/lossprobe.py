"""Loss of the base, frame by frame, with each frame's text = video caption / its true still caption / the reversed
frame's still caption / the middle frame's: does the loss itself prefer the true per-frame states at high noise?"""
import sys, numpy as np, torch
from shapes.base import base_pipeline
from shapes.world import Scene, render, still_caption, COLOURS, BACKGROUNDS, SHAPES, MOTIONS
torch.manual_seed(0)
base, n = sys.argv[1], int(sys.argv[2])
pipe = base_pipeline(base)
unet, vae, sch = pipe.unet, pipe.vae, pipe.scheduler
sf, ac, F = vae.config.scaling_factor, pipe.scheduler.alphas_cumprod, 8
rng = np.random.default_rng(0)
enc = lambda caps: pipe.encode_prompt(caps, "cpu", 1, False)[0].float().detach()
S = [i / (F - 1) for i in range(F)]
for motion in MOTIONS[:6]:
    scenes = [Scene(str(rng.choice(SHAPES)), c, str(rng.choice(list(BACKGROUNDS))), motion, c, bool(rng.random() < .5))
              for c in rng.choice(list(COLOURS), n)]
    x = torch.from_numpy(np.stack([render(s, F, 64, 64) for s in scenes])).float() / 127.5 - 1
    x = x.permute(0, 1, 4, 2, 3).flatten(0, 1)
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mean * sf
        texts = {
            "video": enc([s.caption for s in scenes])[:, None].repeat(1, F, 1, 1),
            "true": enc([still_caption(s, f) for s in scenes for f in S]).unflatten(0, (n, F)),
            "reversed": enc([still_caption(s, 1 - f) for s in scenes for f in S]).unflatten(0, (n, F)),
            "middle": enc([still_caption(s, 0.5) for s in scenes])[:, None].repeat(1, F, 1, 1),
        }
        out = []
        for tlo, thi in ((950, 999), (850, 949), (600, 849)):
            t = torch.randint(tlo, thi + 1, (n,)).repeat_interleave(F)
            a, b = ac[t].sqrt()[:, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None]
            noise = torch.randn_like(z0)
            zt = a * z0 + b * noise
            x0err = {}
            for k, E in texts.items():
                vp = unet(zt, t, encoder_hidden_states=E.flatten(0, 1)).sample
                x0err[k] = (((a * zt - b * vp) - z0) ** 2).mean().item()   # x0 error, v-prediction
            out.append(f"t{tlo}-{thi}: " + " ".join(f"{k} {v:.4f}" for k, v in x0err.items()))
    print(motion, "|", " | ".join(out), flush=True)
