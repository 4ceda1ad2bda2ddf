"""Peak memory of a training step with and without gradient release, each in a fresh process.

A stack of fp32 Linear layers (>= 30M parameters) runs forward, backward and AdamW steps on a
small batch (activations are small next to the gradients); the child reports its peak RSS
(``ru_maxrss``). glibc's malloc is told to serve large blocks by mmap always
(``MALLOC_MMAP_THRESHOLD_``): its default raises that threshold after the first free, and freed heap
memory then stays in the RSS, hiding what was freed. Without release the step holds every
gradient (4 B/param) at once; with release one at a time, so the difference should be the
gradient bytes.

    PYTHONPATH=src python benchmarks/bench_release.py [--width 2048 --layers 8 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(width: int, layers: int, steps: int, release: bool) -> dict:
    import resource

    import torch

    import adamkit

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    n = sum(p.numel() for p in model.parameters())
    opt = adamkit.AdamW(model.parameters(), lr=1e-4, gradient_release=release)
    x = torch.randn(4, width)
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"params": n, "release": release, "peak_rss_mib": peak_kib / 1024, "grad_mib": 4 * n / 2**20}


def measure(width: int = 2048, layers: int = 8, steps: int = 3) -> dict:
    """Run both variants in fresh processes; returns their reports and the saving."""
    out = {}
    for release in (False, True):
        cmd = [sys.executable, __file__, "--child", "--width", str(width), "--layers", str(layers)]
        cmd += ["--steps", str(steps)] + (["--release"] if release else [])
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        out[release] = json.loads(res.stdout.strip().splitlines()[-1])
    saving = out[False]["peak_rss_mib"] - out[True]["peak_rss_mib"]
    return {
        "without": out[False],
        "with": out[True],
        "saving_mib": saving,
        "saving_over_grad_bytes": saving / out[False]["grad_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.width, a.layers, a.steps, a.release)))
        return
    r = measure(a.width, a.layers, a.steps)
    n = r["without"]["params"]
    print(f"{n / 1e6:.1f}M fp32 params, gradients {r['without']['grad_mib']:.0f} MiB")
    print(f"peak RSS without release: {r['without']['peak_rss_mib']:.0f} MiB")
    print(f"peak RSS with release:    {r['with']['peak_rss_mib']:.0f} MiB")
    print(f"saving: {r['saving_mib']:.0f} MiB = {r['saving_over_grad_bytes']:.2f} x the gradient bytes")


if __name__ == "__main__":
    main()
