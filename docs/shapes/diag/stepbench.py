"""One training step of the shapes world's base UNet on this machine: eager fp32, channels_last, torch.compile.

    python docs/shapes/diag/stepbench.py [LATENT=16] [BATCH=16] [THREADS=1] [STEPS=10] [MODES=eager,channels_last,compile]

The UNet of `shapes.base.UNET_CONFIG` at LATENT x LATENT (random init, cross-attention 128 wide as the world's
text tower), v-target MSE on random latents and text states, AdamW; one process per Ray Train worker, so one
thread each by default (the build's 2 workers x 1 CPU). Prints the median s/step over STEPS after warm-up steps
(compile: its first steps are the compilation, timed on their own).
"""

import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from shapes.base import UNET_CONFIG

args = sys.argv[1:] + ["16", "16", "1", "10", "eager,channels_last,compile"][len(sys.argv) - 1 :]
latent, batch, threads, steps = (int(a) for a in args[:4])
torch.set_num_threads(threads)


def bench(mode: str) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG | dict(sample_size=latent), cross_attention_dim=128)
    x = torch.randn(batch, 4, latent, latent)
    if mode == "channels_last":
        unet = unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fwd = torch.compile(unet) if mode == "compile" else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    ctx, t, target = torch.randn(batch, 77, 128), torch.randint(0, 1000, (batch,)), torch.randn_like(x)

    def step():
        loss = torch.nn.functional.mse_loss(fwd(x, t, encoder_hidden_states=ctx).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(2):
        step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in unet.parameters())
    print(f"{mode:14s} {statistics.median(times):.3f} s/step  ({batch / statistics.median(times):.1f} samples/s;"
          f" 2 warm-up steps {warm:.1f} s; {n / 1e6:.1f}M params; latent {latent}, batch {batch}, {threads} thread)",
          flush=True)


for mode in args[4].split(","):
    bench(mode)
