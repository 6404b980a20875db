"""Free per-frame text offsets for one motion (textual-inversion style), trained on the frozen base's diffusion loss
at high noise: can gradient descent from the video caption's states reach what the true still captions give?"""
import sys, time, numpy as np, torch
from shapes.base import base_pipeline
from shapes.world import Scene, render, still_caption, COLOURS, BACKGROUNDS, SHAPES, MOTIONS
torch.manual_seed(0)
base, motion, steps, lr, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
pipe = base_pipeline(base)
unet, vae = pipe.unet, pipe.vae
unet.requires_grad_(False)
sf, ac, F = vae.config.scaling_factor, pipe.scheduler.alphas_cumprod, 8
rng = np.random.default_rng(0)
enc = lambda caps: pipe.encode_prompt(caps, "cpu", 1, False)[0].float().detach()
S = [i / (F - 1) for i in range(F)]
def batch(n):
    scenes = [Scene(str(rng.choice(SHAPES)), c, str(rng.choice(list(BACKGROUNDS))),
                    str(rng.choice(MOTIONS[:6])) if motion == "mixed" else motion, c, bool(rng.random() < .5))
              for c in rng.choice(list(COLOURS), n)]
    x = torch.from_numpy(np.stack([render(s, F, 64, 64) for s in scenes])).float() / 127.5 - 1
    with torch.no_grad():
        z0 = vae.encode(x.permute(0, 1, 4, 2, 3).flatten(0, 1)).latent_dist.mean * sf
    return scenes, z0, enc([s.caption for s in scenes])
M, D = enc(["x"]).shape[1:]
print("|e| per state", enc(["a red circle moves up on a black background"]).norm(dim=-1).mean().item(), "D", D)
if mode == "free":   # per-frame, per-state offsets shared by all clips of the motion
    delta = torch.zeros(F, M, D, requires_grad=True); params = [delta]
    apply = lambda e: e[:, None] + delta
elif mode == "attn":   # per frame: one pre-norm self-attention layer over the M states, then the MLP
    import torch.nn as nn
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.state = nn.Linear(D, D)
            self.frame_embedding = nn.Parameter(torch.randn(F, D))
            self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
            nn.init.zeros_(self.mlp[-1].weight); nn.init.zeros_(self.mlp[-1].bias)
        def forward(self, e):
            b, m, d = e.shape
            x = (self.state(e)[:, None] + self.frame_embedding[None, :, None]).flatten(0, 1)  # (B F, M, D)
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return self.mlp(self.norm2(x)).unflatten(0, (b, F))
    mod = Attn(); params = list(mod.parameters()); apply = lambda e: e[:, None] + mod(e)
elif mode.startswith("basis"):
    import torch.nn as nn
    K = 4
    class Basis(nn.Module):
        def __init__(self):
            super().__init__()
            self.state, self.context = nn.Linear(D, D), nn.Linear(D, D, bias=False)
            self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(D, D), nn.SiLU(), nn.Linear(D, K * D))
            nn.init.zeros_(self.mlp[-1].weight); nn.init.zeros_(self.mlp[-1].bias)
            tau = torch.linspace(-1, 1, F)
            if mode == "basis_poly":
                self.P = nn.Parameter(torch.stack([torch.ones(F), tau, tau**2 - 1/3, tau**3], 1))
            else:
                self.P = nn.Parameter(torch.randn(F, K))
        def forward(self, e):
            h = self.mlp(self.state(e) + self.context(e.mean(1, keepdim=True))).unflatten(-1, (K, D))
            return torch.einsum("fk,bmkd->bfmd", self.P, h)
    mod = Basis(); params = list(mod.parameters()); apply = lambda e: e[:, None] + mod(e)
else:                 # the residual module of harivo.frame_text=residual, optionally with unit-scale frame embeddings
    from training.model.harivo import FrameTextResidual
    mod = FrameTextResidual(D, F)
    if mode.startswith("residual_unit"):
        with torch.no_grad(): mod.frame_embedding.normal_()
    if mode.endswith("_wide"):
        import torch.nn as nn
        mod.mlp = nn.Sequential(nn.SiLU(), nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D))
        nn.init.zeros_(mod.mlp[-1].weight); nn.init.zeros_(mod.mlp[-1].bias)
    params = list(mod.parameters()); apply = lambda e: e[:, None] + mod(e)
opt = torch.optim.Adam(params, lr=lr)
def x0err(z0, E, t, noise):
    a, b = ac[t].sqrt()[:, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None]
    zt = a * z0 + b * noise
    vp = unet(zt, t, encoder_hidden_states=E.flatten(0, 1)).sample
    return (((a * zt - b * vp) - z0) ** 2).mean()
g = torch.Generator().manual_seed(1)
ev_sc, ev_z0, ev_e = batch(24)
ev_t = torch.randint(850, 1000, (24,), generator=g).repeat_interleave(F); ev_n = torch.randn(ev_z0.shape, generator=g)
with torch.no_grad():
    true = enc([still_caption(s, f) for s in ev_sc for f in S]).unflatten(0, (24, F))
    print("eval x0 err: video %.4f true %.4f" % (x0err(ev_z0, ev_e[:, None].repeat(1, F, 1, 1), ev_t, ev_n), x0err(ev_z0, true, ev_t, ev_n)))
t0 = time.time()
for step in range(1, steps + 1):
    _, z0, e = batch(4)
    t = torch.randint(850, 1000, (4,)).repeat_interleave(F)
    loss = x0err(z0, apply(e), t, torch.randn_like(z0))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 25 == 0:
        with torch.no_grad():
            E = apply(ev_e)
            dl = (E[:, -1] - E[:, 0]).norm(dim=-1).mean().item()
            if step % 100 == 0:
                dE, dT = (E[:, -1] - E[:, 0]).flatten(1), (true[:, -1] - true[:, 0]).flatten(1)
                cos = torch.nn.functional.cosine_similarity(dE, dT, dim=1)
                by = {}
                for c, sc in zip(cos.tolist(), ev_sc): by.setdefault(sc.motion, []).append(c)
                print("  cos(E_last - E_first, true_last - true_first) by motion:",
                      {m[:14]: round(sum(v) / len(v), 2) for m, v in by.items()}, flush=True)
            print(f"step {step} eval x0 err {x0err(ev_z0, E, ev_t, ev_n):.4f} |E_last - E_first| per state {dl:.3f} ({time.time()-t0:.0f}s)", flush=True)
