"""One training step of the HARIVO video UNet, part by part: time, memory, FLOPs, MFU; and the VAE encode.

    python -m training.bench --device cuda            # tiny + SD 1.5-sized UNet, bf16 autocast (GPU check)
    python -m training.bench --device cpu             # tiny + SD 1.5 layout at 1/10 width, fp32
    python -m training.bench --device cpu --unets sd15 --frames 8 --latent 32   # the real size on CPU (slow)

Every row is one configuration in its own fresh process (so peak memory is that configuration's): random
init of the UNet from SD 1.5's config (the layout of `--unets`), the temporal layers and HARIVO modules of
`training/configs/harivo_sd15.yaml`, its full objective (L_simple + L_TRS + L_reg + L_DC), AdamW (fused on
GPU). Columns:
  s/step, samples/s   median over `--steps` timed steps after one warm-up, the device synchronised
  peak MiB            CUDA: max_memory_allocated; CPU: the process's max RSS (includes the weights)
  act MiB video/reg/trs   bytes autograd keeps for the backward (unique storages): the video forward with
                      its captures, what L_reg's image-mode forward adds, what L_TRS adds
  GFLOP/step          forward + backward + optimizer, counted by `torch.utils.flop_counter.FlopCounterMode`
                      (matmuls and convolutions; the recomputation of checkpointed blocks is counted)
  MFU                 GFLOP/step / (s/step) / peak, with peak the device's dense bf16 (GPU) or `--peak-tflops`

MFU here counts the FLOPs the step executes, recomputation included: it says how busy the chip is, not how
much of it is useful model work (a "model FLOPs" MFU would use the step without checkpointing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

UNET_LAYOUTS = {
    "tiny": dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32
    ),
    "sd15-mini": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, attention_head_dim=8),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8),
}
"""UNet2DConditionModel configs: SD 1.5's layout (`sd15`), the same at 1/10 width, and a tiny one."""

MODES = {
    "temporal ckpt": {},  # harivo_sd15.yaml as shipped: model.gradient_checkpointing (temporal layers)
    "no ckpt": {"model.gradient_checkpointing": False},
    "unet ckpt": {"model.checkpoint_unet": True},
    "unet ckpt + reg recompute": {"model.checkpoint_unet": True, "loss.reg_recompute": True},
    "compile": {"compile": True},
}

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched against the device name."""


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The peak MFU is measured against: `given`, else the GPU's datasheet bf16 figure, else None."""
    if given:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    return flops / seconds / (peak * 1e12) if peak and seconds > 0 else None


def train_config(layout: str, frames: int, latent: int, batch: int, overrides: dict):
    from pipeline.configlib import load_config
    from training.config import TrainConfig

    preset = Path(__file__).resolve().parent / "configs" / "harivo_sd15.yaml"
    dotted = {"model.num_frames": frames, "model.latent_size": latent, "optim.batch_size": batch}
    dotted.update({k: v for k, v in overrides.items() if "." in k})
    return load_config(TrainConfig, preset, [f"{k}={json.dumps(v)}" for k, v in dotted.items()])


def build_model(layout: str, cfg):
    """The video UNet on a random-init UNet of `layout` (cross-attention 768 as SD 1.5 unless given)."""
    from diffusers import UNet2DConditionModel

    from training.model.unet import VideoUNet

    spec = {"cross_attention_dim": 768, **UNET_LAYOUTS[layout]}
    n = len(spec["block_out_channels"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=cfg.model.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        **spec,
    )
    return VideoUNet(unet, cfg.model, cfg.harivo), spec["cross_attention_dim"]


def saved_mib(fn) -> float:
    """MiB of the unique storages autograd saves for the backward while `fn()` runs (the result is dropped)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()) / 2**20


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process: the row's numbers."""
    import resource
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from training.diffusion.objective import HarivoObjective
    from training.distributed.engine import adamw
    from training.distributed.progress import clock

    device = torch.device(args.device)
    overrides = MODES[args.mode]
    cfg = train_config(args.unet, args.frames, args.latent, args.batch, overrides)
    model, text_dim = build_model(args.unet, cfg)
    model = model.to(device).train()
    objective = HarivoObjective.for_model(cfg, model).to(device)
    params = list(model.trainable_parameters())
    opt = adamw([{"params": params}], cfg.optim, device.type == "cuda")
    forward = torch.compile(model) if overrides.get("compile") else model
    bf16 = device.type == "cuda" or args.bf16
    g = torch.Generator(device).manual_seed(0)
    b, f, h = args.batch, args.frames, args.latent
    latents = torch.randn(b, 4, f, h, h, generator=g, device=device)
    text = torch.randn(b, 77, text_dim, generator=g, device=device)

    def loss(obj=objective):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return obj(forward, latents, text, g).total

    def step() -> None:
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def variant(**loss_weights) -> HarivoObjective:
        c = replace(cfg, loss=replace(cfg.loss, **loss_weights))
        return HarivoObjective.for_model(c, model).to(device)

    # Activations kept for the backward, by part: differences of cumulative objectives.
    simple = saved_mib(lambda: loss(variant(lambda_reg=0.0, lambda_trs=0.0)))
    with_reg = saved_mib(lambda: loss(variant(lambda_trs=0.0)))
    parts = {"video": simple, "reg": with_reg - simple, "trs": saved_mib(loss) - with_reg}
    step()  # warm-up (allocations, compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = clock(device)
        step()
        times.append(clock(device) - t0)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    s = statistics.median(times)
    flops = counter.get_total_flops()
    top = peak_tflops(device, args.peak_tflops)
    trainable = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.split(".")[0]
            trainable[key] = trainable.get(key, 0) + p.numel()
    return {
        "unet": args.unet,
        "mode": args.mode,
        "s_per_step": s,
        "samples_per_s": b / s,
        "peak_mib": peak,
        "act_mib": parts,
        "gflop_per_step": flops / 1e9,
        "mfu": mfu(flops, s, top),
        "peak_tflops": top,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": trainable,
        "bf16": bf16,
        "sdpa": sdpa_backends(device),
    }


def sdpa_backends(device: torch.device) -> str:
    """Which fused attention kernels `scaled_dot_product_attention` may pick (diffusers' AttnProcessor2_0)."""
    if device.type != "cuda":
        return "cpu (flash kernel for fp32/bf16)"
    b = torch.backends.cuda
    on = [
        n
        for n, ok in (("flash", b.flash_sdp_enabled()), ("mem-efficient", b.mem_efficient_sdp_enabled()))
        if ok
    ]
    return "+".join(on) or "math"


def vae_encode(device: torch.device, layout: str, frames: int, size: int, batch: int) -> dict:
    """The pipeline's encode stage (`pipeline.encode.VaeEncoder`) on a random-init VAE: clips/s and MFU."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import PipelineConfig
    from pipeline.configlib import to_dict
    from pipeline.encode import VaeEncoder
    from training.distributed.progress import clock

    channels = (128, 256, 512, 512) if layout == "sd15" else (32, 64, 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoencoderKL(
            block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=size,
        ).save_pretrained(Path(tmp) / "vae")
        cfg = PipelineConfig()
        cfg.encode.model, cfg.encode.num_gpus = tmp, 1.0 if device.type == "cuda" else 0.0
        cfg.encode.torch_threads = torch.get_num_threads()
        encoder = VaeEncoder(to_dict(cfg))
        encoder.setup()
    pixels = torch.randint(0, 256, (batch * frames, size, size, 3), dtype=torch.uint8).numpy()
    seeds = list(range(batch))
    encoder.encode_frames(pixels, seeds, frames)  # warm-up
    t0 = clock(device)
    encoder.encode_frames(pixels, seeds, frames)
    s = clock(device) - t0
    counter = FlopCounterMode(display=False)
    with counter:
        encoder.encode_frames(pixels, seeds, frames)
    flops = counter.get_total_flops()
    top = peak_tflops(device, None)
    return {
        "vae": layout,
        "clips_per_s": batch / s,
        "gflop_per_clip": flops / batch / 1e9,
        "mfu": mfu(flops, s, top),
    }


def _child(args: argparse.Namespace, mode: str, unet: str) -> dict:
    """`run_one` in a fresh interpreter: peak memory is this configuration's alone."""
    cmd = [sys.executable, "-m", "training.bench", "--one", mode, "--unets", unet, *args.passthrough]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        errors = [x for x in (p.stderr or p.stdout).strip().splitlines() if "Error" in x or "error" in x]
        why = (
            f"killed by signal {-p.returncode} (out of memory?)"
            if p.returncode < 0
            else f"exit {p.returncode}"
        )
        return {"unet": unet, "mode": mode, "error": f"{why}: {(errors[-1:] or ['no error line'])[0][:120]}"}
    return json.loads(lines[-1])


def print_rows(rows: list[dict]) -> None:
    head = f"{'UNet':10s}{'mode':27s}{'s/step':>8s}{'smp/s':>7s}{'peak MiB':>10s}"
    print(head + f"{'act video/reg/trs MiB':>24s}{'GFLOP':>9s}{'MFU':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['unet']:10s}{r['mode']:27s}  failed: {r['error']}")
            continue
        a = r["act_mib"]
        acts = f"{a['video']:.0f}/{a['reg']:.0f}/{a['trs']:.0f}"
        m = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(
            f"{r['unet']:10s}{r['mode']:27s}{r['s_per_step']:8.3f}{r['samples_per_s']:7.2f}{r['peak_mib']:10.0f}"
            f"{acts:>24s}{r['gflop_per_step']:9.1f}{m:>7s}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m training.bench --device ...", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument(
        "--unets", help="comma-separated layouts (default: tiny,sd15 on cuda; tiny,sd15-mini on cpu)"
    )
    p.add_argument("--modes", help="comma-separated (default: all; no compile on cpu)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on GPU)")
    p.add_argument(
        "--peak-tflops", type=float, help="the device's peak for MFU (default: datasheet bf16 on GPU)"
    )
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    unets = (a.unets or ("tiny,sd15" if a.device == "cuda" else "tiny,sd15-mini")).split(",")
    if a.one:
        a.mode, a.unet = a.one, unets[0]
        print(json.dumps(run_one(a)))
        return
    a.passthrough = [f"--device={a.device}", f"--frames={a.frames}", f"--latent={a.latent}"]
    a.passthrough += [f"--batch={a.batch}", f"--steps={a.steps}"] + (["--bf16"] if a.bf16 else [])
    a.passthrough += [f"--peak-tflops={a.peak_tflops}"] if a.peak_tflops else []
    started = time.perf_counter()
    modes = (a.modes or ",".join(m for m in MODES if a.device == "cuda" or m != "compile")).split(",")
    unknown = [m for m in modes if m not in MODES] + [u for u in unets if u not in UNET_LAYOUTS]
    if unknown:
        p.error(f"unknown mode or UNet {unknown[0]!r}: modes {list(MODES)}, UNets {list(UNET_LAYOUTS)}")
    rows = [_child(a, mode, unet) for unet in unets for mode in modes]
    print(
        f"\nT2V-Ray step benchmark on {a.device} ({torch.get_num_threads()} threads): batch {a.batch} x "
        f"{a.frames} frames x {a.latent}x{a.latent} latents, harivo_sd15.yaml losses, {a.steps} timed steps"
    )
    print_rows(rows)
    for r in rows:
        if "params_trainable" in r and r["mode"] == rows[0]["mode"]:
            t = r["params_trainable"]
            parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in t.items())
            print(
                f"{r['unet']}: {r['params_total'] / 1e6:.1f}M parameters, {sum(t.values()) / 1e6:.1f}M trainable ({parts})"
            )
    if not a.skip_vae:
        size = 256 if a.device == "cuda" else 64
        vae = vae_encode(torch.device(a.device), "sd15" if a.device == "cuda" else "mini", a.frames, size, 4)
        m = f"{vae['mfu']:.1%}" if vae["mfu"] is not None else "n/a"
        print(
            f"VAE encode ({vae['vae']} layout, {a.frames} frames of {size} px per clip): {vae['clips_per_s']:.2f} "
            f"clips/s, {vae['gflop_per_clip']:.1f} GFLOP/clip, MFU {m}"
        )
        rows.append(vae)
    print(f"({time.perf_counter() - started:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
