"""8-bit state quality: the teacher-forced sparse-row run (``adamkit.tools.drift``) for every state
format, against a float64 oracle, at gradient scales 1, 1e-2 and 1e-3.

AdamW (lr 1e-3, weight decay 0), one 512 x 256 fp32 matrix, 300 steps, rows active with Zipf-like
frequencies. Per format: the largest single-step move of any element (in learning rates) and the
drift of the final displacement from the float64 oracle's, over several gradient streams (a
blow-up is a rare event: one element, one step). "8-bit, blocks of 256 (before)" is the
format adamkit had before groups of 32 (the same codes, one fp32 scale per block of 256, no floor
under v), simulated here step by step through its encode/decode around an fp32 AdamW update.

    python benchmarks/drift8.py [--json benchmarks/results/drift8.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import adamkit
from adamkit.ieee import div_rn, sqrt_rn
from adamkit.storage.formats import hash_bits, mix_seed
from adamkit.tools import drift

SCALES = (1.0, 1e-2, 1e-3)
LR = 1e-3


def _legacy_codec(signed: bool, x: torch.Tensor, seed: int) -> torch.Tensor:
    """encode then decode in the previous format: blocks of 256, fp32 scale = the block's largest
    magnitude, the same power-law codes and stochastic rounding, nothing raised from zero."""
    n = x.numel()
    xb = torch.nn.functional.pad(x.reshape(-1), (0, -n % 256)).view(-1, 256)
    a = xb.abs().amax(dim=1, keepdim=True)
    a = torch.where(a < 2.0**-126, 0.0, a)
    r = xb.abs() * torch.where(a > 0, div_rn(1.0, a), 0.0)
    u = hash_bits(torch.arange(xb.numel()).view(xb.shape), seed).float() / 65536.0
    q, k = (127, 2) if signed else (254, 4)
    root = sqrt_rn(r) if signed else sqrt_rn(sqrt_rn(r))
    c = torch.clamp(torch.floor(root * q), max=q - 1)
    lo, hi = (c / q) ** k, ((c + 1) / q) ** k
    c = c + (u * (hi - lo) < r - lo).float()
    y = (c / q) ** k * a * (torch.sign(xb) if signed else 1.0)
    return y.reshape(-1)[:n].view(x.shape)


class LegacyAdamW(torch.optim.Optimizer):
    """AdamW in fp32 whose m and v are stored in the previous 8-bit format between steps."""

    def __init__(self, params, lr=LR, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                t, g = st["t"], p.grad
                m = _legacy_codec(True, b1 * st["m"] + (1 - b1) * g, mix_seed(t, 1))
                v = _legacy_codec(False, b2 * st["v"] + (1 - b2) * g * g, mix_seed(t, 2))
                st["m"], st["v"] = m, v
                denom = (v / (1 - b2**t)).sqrt() + group["eps"]
                p.add_(-group["lr"] * (m / (1 - b1**t)) / denom)


CONTENDERS = {
    "fp32 state": lambda p: adamkit.AdamW([p], lr=LR, weight_decay=0.0),
    "bf16 state": lambda p: adamkit.AdamW([p], lr=LR, weight_decay=0.0, state_format="bf16"),
    "8-bit, groups of 32": lambda p: adamkit.AdamW([p], lr=LR, weight_decay=0.0, state_format="8bit"),
    "8-bit, blocks of 256 (before)": lambda p: LegacyAdamW([p]),
}


def rounding(steps: int = 300) -> dict[str, list[float]]:
    """What stochastic rounding of the codes buys over round-to-nearest (the codes' rounding bits
    fixed at one half, through the reference backend): v's relative error under constant
    gradients spread over three decades in each group (AdamW, 300 steps; with beta2 = 0.999 a
    rounded-to-nearest v stops growing once its step is below half a code), and the sparse-row
    drift (seed 0, scale 1)."""
    from adamkit.storage import quant8

    bits = quant8.hash_bits

    def run(nearest: bool, grads: list[torch.Tensor]):
        quant8.hash_bits = (lambda index, seed: torch.full_like(index, 32768)) if nearest else bits
        try:
            p = torch.nn.Parameter(torch.zeros(grads[0].shape))
            opt = adamkit.AdamW(
                [p], lr=LR, weight_decay=0.0, state_format="8bit", backend="reference", min_8bit_size=0
            )
            for t in range(steps):
                p.grad = grads[t % len(grads)]
                opt.step()
        finally:
            quant8.hash_bits = bits
        st = opt.state[p]
        v = quant8.decode(False, st["exp_avg_sq"], st["exp_avg_sq_scale"], p.shape, torch.float64, True)
        return p.detach().double(), v

    g = (10 ** (-3 * torch.arange(32) / 31)).repeat(64, 1).float() * 1e-2
    exact_v = (1 - 0.999**steps) * g.double() ** 2
    sparse = drift.sparse_rows(steps=steps)
    ref = drift.oracle(sparse, lr=LR, weight_decay=0.0)
    out = {}
    for name, nearest in (("stochastic", False), ("to nearest", True)):
        _, v = run(nearest, [g])
        err = (v - exact_v).abs() / exact_v
        d, _ = run(nearest, sparse)
        out[name] = [err.median().item(), err.max().item(), drift.drift(d, ref)]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--seeds", type=int, default=5, help="gradient streams per scale (rare events need several)"
    )
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    # per format and scale: [the largest step over every seed, the median drift, the largest drift]
    results: dict[str, dict[str, list[float]]] = {name: {} for name in CONTENDERS}
    for scale in SCALES:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
        for seed in range(args.seeds):
            grads = drift.sparse_rows(steps=args.steps, scale=scale, seed=seed)
            ref = drift.oracle(grads, lr=LR, weight_decay=0.0)
            for name, make in CONTENDERS.items():
                d, most = drift.teacher_forced(make, grads)
                runs[name].append((most, drift.drift(d, ref)))
        for name, r in runs.items():
            drifts = sorted(x[1] for x in r)
            results[name][f"{scale:g}"] = [max(x[0] for x in r), drifts[len(drifts) // 2], drifts[-1]]
    head = " | ".join(f"scale {s:g}: max step, drift (median, max)" for s in SCALES)
    print(f"| state | {head} |")
    print("|---|" + "---|" * len(SCALES))
    for name, row in results.items():
        cells = " | ".join(
            f"{row[f'{s:g}'][0]:.3g} lr, {100 * row[f'{s:g}'][1]:.2f} % ({100 * row[f'{s:g}'][2]:.3g} %)"
            for s in SCALES
        )
        print(f"| {name} | {cells} |")
    rounded = rounding(args.steps)
    print("\n| 8-bit codes rounded | v error, constant gradients (median, max) | sparse-row drift |")
    print("|---|---|---|")
    for name, (med, most, d) in rounded.items():
        print(f"| {name} | {100 * med:.1f} %, {100 * most:.0f} % | {100 * d:.2f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"steps": args.steps, "seeds": args.seeds, "lr": LR, "results": results, "rounding": rounded},
                f,
                indent=1,
            )
    return results


if __name__ == "__main__":
    main()
