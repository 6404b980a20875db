"""The world's CFG scale: a base pilot's check, or a video pilot's evaluation beside its frame baseline, at other
guidance scales than the one it was scored with (pilots.md G1, G2, J1).

    python docs/shapes/diag/cfg.py base WORLD/pilots/B/base G1,G2,... [SEED=0] [N=128]
    python docs/shapes/diag/cfg.py video WORLD VIDEO_PILOT G [PROMPTS=32] [SEEDS=1] [KEY=VALUE ...]

`base`: `shapes.base.check_base` at each scale (SEED picks the N held-out captions). `video`: `training.evaluate`
of the pilot's checkpoint and of its base's frame baseline, both with `guidance.cfg_early = cfg_late = G`, on the
pilot's first PROMPTS held-out prompts, under WORLD/pilots/VIDEO_PILOT/cfg_G/{video,frames}/. KEY=VALUE: more
sampler overrides of the video model's run (e.g. JVID's `jvid.enabled=true jvid.t_v=0.2`); with them only the
video model is scored (under cfg_G_<overrides>/).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from shapes.base import check_base
from shapes.build import real_set
from shapes.heldout import eval_prompts, sample_overrides

kind, args = sys.argv[1], sys.argv[2:]
if kind == "base":
    base, scales = args[0], [float(g) for g in args[1].split(",")]
    seed, n = (int(args[2]) if len(args) > 2 else 0), (int(args[3]) if len(args) > 3 else 128)
    for g in scales:
        t = time.perf_counter()
        r = check_base(base, n=n, steps=15, guidance=g, seed=seed)["summary"]
        keep = ("colour", "shape", "colour_and_shape", "background")
        print(
            json.dumps(
                dict(guidance=g, seed=seed, **{k: r[k] for k in keep}, s=round(time.perf_counter() - t))
            )
        )
else:
    world, name, g = Path(args[0]), args[1], float(args[2])
    n, seeds = (int(args[3]) if len(args) > 3 else 32), (int(args[4]) if len(args) > 4 else 1)
    more = args[5:]
    out = world / "pilots" / name / ("_".join([f"cfg_{g:g}", *more]).replace("/", "-"))
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(eval_prompts(n)) + "\n")
    rows = {}
    runs = [("video", more)] + ([] if more else [("frames", ["--baseline", "frames"])])
    for which, extra in runs:
        cmd = [sys.executable, "-m", "training.evaluate", "--config", "training/configs/sample_shapes.yaml"]
        cmd += ["--checkpoint", str(world / "pilots" / name / "train"), "--prompts", str(prompts)]
        cmd += ["--output", str(out / which), *extra, f"guidance.cfg_early={g}", f"guidance.cfg_late={g}"]
        cmd += sample_overrides(world, real_set(world / "eval" / "real", 0), 0, seeds, 15)
        subprocess.run(cmd, check=True)
        m = json.loads((out / which / "report.json").read_text())["metrics"]
        keys = ("motion_accuracy", "colour_accuracy", "shape_accuracy", "background_accuracy", "domain_fvd")
        rows[which] = {k: round(m[k], 4) for k in keys if k in m}
    print(json.dumps(dict(pilot=name, guidance=g, prompts=n, seeds=seeds, **rows)))
