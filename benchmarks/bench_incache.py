"""The optimizer step's arithmetic alone: AdamW steps on a tensor that stays in cache.

``bench_adamw.py`` times steps over 32M parameters, which stream from memory. Here one tensor of
``--n`` elements (default 1M: 16-28 MB of buffers, inside a 32 MB L3) is stepped 32M / n times,
so memory bandwidth drops out and what is left is each recipe's arithmetic (and per-call
overhead). Reported: milliseconds per 32M element-updates, best of ``--repeats`` rounds,
implementations interleaved round by round. If a recipe needs more time here than torch's fused
fp32 step needs from memory, no memory saving can make it faster than that step.

    python benchmarks/bench_incache.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

import adamkit

TOTAL = 32 << 20


def _adamkit(**kw):
    return lambda ps: adamkit.AdamW(ps, backend="fused", **kw)


RECIPES = {
    "torch fused": (torch.float32, lambda ps: torch.optim.AdamW(ps, fused=True)),
    "torch fused, bf16 params": (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, fused=True)),
    "adamkit fused": (torch.float32, _adamkit()),
    "adamkit fused, bf16 state": (torch.float32, _adamkit(state_format="bf16")),
    "adamkit fused, 8-bit state": (torch.float32, _adamkit(state_format="8bit")),
    "adamkit fused, bf16 + Kahan, bf16 state": (torch.bfloat16, _adamkit()),
    "adamkit fused, bf16 + SR, bf16 state": (torch.bfloat16, _adamkit(stochastic_rounding=True)),
    "adamkit fused, bf16 + master, fp32 state": (
        torch.bfloat16,
        _adamkit(master_weights=True, state_format="fp32"),
    ),
    "adamkit fused, bf16 + Kahan, 8-bit state": (torch.bfloat16, _adamkit(state_format="8bit")),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 20, help="elements of the one tensor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--updates", type=int, default=TOTAL, help="element-updates per round")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    calls = max(1, args.updates // args.n)
    steps = {}
    for name, (dtype, make) in RECIPES.items():
        p = torch.randn(args.n).to(dtype).requires_grad_()
        p.grad = torch.randn(args.n).to(dtype)
        opt = make([p])
        opt.step()  # build the layout (and the native kernel, once per machine)
        steps[name] = opt.step

    def run(step) -> float:
        t = time.perf_counter()
        for _ in range(calls):
            step()
        return time.perf_counter() - t

    best = {name: float("inf") for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            best[name] = min(best[name], run(step))
    scale = TOTAL / (calls * args.n)  # per 32M element-updates
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, one tensor of {args.n} elements")
    print("(in cache), stepped to 32M element-updates; best of", args.repeats, "\n")
    print("| recipe | ms per 32M updates | vs torch fused |")
    print("|---|---:|---:|")
    ref = best["torch fused"]
    for name, sec in best.items():
        print(f"| {name} | {sec * scale * 1e3:.2f} | {ref / sec:.2f}x |")


if __name__ == "__main__":
    main()
