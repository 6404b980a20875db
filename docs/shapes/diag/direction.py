"""D6: does a learned per-frame text module tell opposite motions apart? On the frozen base, train it on clips of one
pair of opposite motions (`shapes.text.OPPOSITE_MOTIONS`) at t in 850-999, then score fixed eval clips of both with
their own caption and with the opposite one through the module: a module that reads the direction draws each clip
better from its own caption (x0 error own < swapped); one that learned only the axis draws both alike.

    python docs/shapes/diag/direction.py BASE PAIR STEPS LR MODE      # PAIR: left_right | up_down | grows_shrinks
                                                                      #   | all (the six motions mixed, each pair scored)
    MODE: residual (FrameTextResidual as shipped) | basis (r_f = sum_k P_fk H_k(e), P polynomial in the frame's
          time) | basis_bigram (the same, each state read with the one before it: W_p e_(m-1) added) | free (free per-frame offsets per motion: the ceiling, it is told the motion)"""
import sys, time, numpy as np, torch, torch.nn as nn
from shapes.base import base_pipeline
from shapes.text import OPPOSITE_MOTIONS
from shapes.world import Scene, render, still_caption, COLOURS, BACKGROUNDS, SHAPES
from training.model.harivo import FrameTextResidual

torch.manual_seed(0)
base, pair, steps, lr, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
PAIRS = OPPOSITE_MOTIONS if pair == "all" else {pair: OPPOSITE_MOTIONS[pair]}
TRAIN = [m for ab in PAIRS.values() for m in ab]
A, B = next(iter(PAIRS.values()))  # (mode free: one pair only)
pipe = base_pipeline(base)
unet, vae = pipe.unet, pipe.vae
unet.requires_grad_(False)
sf, ac, F = vae.config.scaling_factor, pipe.scheduler.alphas_cumprod, 8
rng = np.random.default_rng(0)
enc = lambda caps: pipe.encode_prompt(caps, "cpu", 1, False)[0].float().detach()
S = [i / (F - 1) for i in range(F)]
OPP = {a: b for ab in PAIRS.values() for a, b in (ab, ab[::-1])}
other = lambda s: Scene(s.shape, s.colour, s.background, OPP[s.motion], s.end_colour, s.gradient)


def batch(n, motions=None):
    motions = motions or [str(rng.choice(TRAIN)) for _ in range(n)]
    scenes = [Scene(str(rng.choice(SHAPES)), c, str(rng.choice(list(BACKGROUNDS))), m, c, bool(rng.random() < .5))
              for c, m in zip(rng.choice(list(COLOURS), n), motions)]
    x = torch.from_numpy(np.stack([render(s, F, 64, 64) for s in scenes])).float() / 127.5 - 1
    with torch.no_grad():
        z0 = vae.encode(x.permute(0, 1, 4, 2, 3).flatten(0, 1)).latent_dist.mean * sf
    return scenes, z0, enc([s.caption for s in scenes])


M, D = enc(["x"]).shape[1:]
if mode == "residual":
    mod = FrameTextResidual(D, F)
    apply = lambda e, sc: e[:, None] + mod(e)
elif mode in ("basis", "basis_bigram"):
    class Basis(nn.Module):
        def __init__(self, K=4):
            super().__init__()
            self.K = K
            self.state, self.context = nn.Linear(D, D), nn.Linear(D, D, bias=False)
            self.prev = nn.Linear(D, D, bias=False) if mode == "basis_bigram" else None
            self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(D, D), nn.SiLU(), nn.Linear(D, K * D))
            nn.init.zeros_(self.mlp[-1].weight); nn.init.zeros_(self.mlp[-1].bias)
            tau = torch.linspace(-1, 1, F)
            self.P = nn.Parameter(torch.stack([torch.ones(F), tau, tau**2 - 1 / 3, tau**3], 1))
        def forward(self, e):
            x = self.state(e) + self.context(e.mean(1, keepdim=True))
            if self.prev is not None:  # the state before each one (the start token's: zeros)
                x = x + self.prev(torch.nn.functional.pad(e, (0, 0, 1, 0))[:, :-1])
            h = self.mlp(x).unflatten(-1, (self.K, D))
            return torch.einsum("fk,bmkd->bfmd", self.P, h)
    mod = Basis()
    apply = lambda e, sc: e[:, None] + mod(e)
else:  # free offsets per motion, chosen by the clip's motion (told, not read)
    mod = nn.ParameterDict({"a": nn.Parameter(torch.zeros(F, M, D)), "b": nn.Parameter(torch.zeros(F, M, D))})
    apply = lambda e, sc: e[:, None] + torch.stack([mod["a"] if s.motion == A else mod["b"] for s in sc])
opt = torch.optim.Adam(mod.parameters(), lr=lr)


def x0err(z0, E, t, noise, per_clip=False):
    a, b = ac[t].sqrt()[:, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None]
    zt = a * z0 + b * noise
    vp = unet(zt, t, encoder_hidden_states=E.flatten(0, 1)).sample
    err = ((a * zt - b * vp) - z0) ** 2
    return err.unflatten(0, (-1, F)).mean((1, 2, 3, 4)) if per_clip else err.mean()


g = torch.Generator().manual_seed(1)
N = 24 if len(PAIRS) == 1 else 8
evals = {}
for name, (a, b) in PAIRS.items():
    sc, z0, e = batch(N, [a, b] * (N // 2))
    t = torch.randint(850, 1000, (N,), generator=g).repeat_interleave(F)
    evals[name] = (sc, z0, e, enc([other(s).caption for s in sc]), t, torch.randn(z0.shape, generator=g))
ev_sc, ev_z0, ev_e, ev_sw, ev_t, ev_n = evals[next(iter(PAIRS))]


@torch.no_grad()
def report(step):
    line = f"step {step:4d}"
    for name, (sc, z0, e, sw_e, t, noise) in evals.items():
        own = x0err(z0, apply(e, sc), t, noise, True)
        sw = x0err(z0, apply(sw_e, [other(s) for s in sc]), t, noise, True)
        line += f" | {name} own {own.mean():.4f} swapped {sw.mean():.4f} ({(own < sw).float().mean():.2f})"
    print(line + f" ({time.time() - t0:.0f}s)", flush=True)


with torch.no_grad():
    true = enc([still_caption(s, f) for s in ev_sc for f in S]).unflatten(0, (N, F))
    vid = ev_e[:, None].repeat(1, F, 1, 1)
    print(f"{pair}: video caption {x0err(ev_z0, vid, ev_t, ev_n):.4f}, true stills {x0err(ev_z0, true, ev_t, ev_n):.4f}")
t0 = time.time()
report(0)
for step in range(1, steps + 1):
    sc, z0, e = batch(4)
    t = torch.randint(850, 1000, (4,)).repeat_interleave(F)
    loss = x0err(z0, apply(e, sc), t, torch.randn_like(z0))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        report(step)
