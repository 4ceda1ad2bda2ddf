"""Candidate 8-bit codes for Adam's m and v, compared on the teacher-forced sparse-row run
(``adamkit.tools.drift``, 512 x 256, 300 steps, lr 1e-3): each is simulated step by step around
an fp32 AdamW update (encode then decode m and v after every step), in groups of 32 with bf16
scales rounded up, stochastic rounding unbiased in the linear domain, with and without the floor
under v (a v code of 0 beside a non-zero m raised to 1). How adamkit's 8-bit format was chosen.

    python benchmarks/codes8.py [--scale 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from adamkit.storage import quant8
from adamkit.tools import drift

G = 32
LR = 1e-3


def _groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as (groups, 32) magnitudes divided by their bf16 scale, and the scale."""
    xg = x.reshape(-1, G)
    a = quant8.scale_up(xg.abs().amax(dim=1, keepdim=True)).float()
    return xg.abs() * torch.where(a > 0, 1.0 / a, 0.0), a


def _round(r: torch.Tensor, level, code: torch.Tensor, top: int, u: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding between code and code + 1, unbiased in the linear domain."""
    code = code.clamp(max=top - 1)
    lo, hi = level(code), level(code + 1)
    return code + (u * (hi - lo) < r - lo).float()


def power_m(p: float):
    """m = a sign (c/127)^p."""

    def enc(x, u):
        r, a = _groups(x)
        c = _round(r, lambda c: (c / 127) ** p, torch.floor(127 * r ** (1 / p)), 127, u)
        return (torch.sign(x.reshape(-1, G)) * (c / 127) ** p * a).reshape(x.shape), c

    return enc


def companded_m(x, u):
    """FlashOptim's m: y = 2x / (1 + |x|) coded linearly in 127 steps, x = y / (2 - |y|)."""
    r, a = _groups(x)
    c = _round(r, lambda c: c / (254 - c), torch.floor(254 * r / (1 + r)), 127, u)
    y = c / 127
    return (torch.sign(x.reshape(-1, G)) * y / (2 - y) * a).reshape(x.shape), c


def power_v(p: float):
    """sqrt(v) = s (c/255)^p with s the group's largest sqrt(v) (p = 1: linear in sqrt(v))."""

    def enc(v, u, mcode):
        r, a = _groups(v.sqrt())
        c = _round(r * r, lambda c: (c / 255) ** (2 * p), torch.floor(255 * r ** (1 / p)), 255, u)
        if mcode is not None:
            c = torch.where((mcode != 0) & (c == 0), 1.0, c)
        return (((c / 255) ** p * a) ** 2).reshape(v.shape)

    return enc


CANDIDATES = {
    "m power 2, v power 2 on sqrt(v) (adamkit)": (power_m(2), power_v(2)),
    "m companded, v linear in sqrt(v) (FlashOptim's)": (companded_m, power_v(1)),
    "m power 3, v power 3 on sqrt(v)": (power_m(3), power_v(3)),
    "m linear, v linear in sqrt(v)": (power_m(1), power_v(1)),
}


def simulate(grads, m_code, v_code, floor: bool, seed: int = 1, b1=0.9, b2=0.999, eps=1e-8):
    gen = torch.Generator().manual_seed(seed)
    p = torch.zeros(grads[0].shape, dtype=torch.float64)
    m, v = torch.zeros(grads[0].shape), torch.zeros(grads[0].shape)
    most = 0.0
    for t, g in enumerate(grads, 1):
        m, mc = m_code(b1 * m + (1 - b1) * g, torch.rand(m.numel() // G, G, generator=gen))
        v = v_code(
            b2 * v + (1 - b2) * g * g, torch.rand(m.numel() // G, G, generator=gen), mc if floor else None
        )
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        p -= LR * update.double()
        most = max(most, update.abs().max().item())
    return p, most


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    grads = drift.sparse_rows(scale=args.scale, seed=args.seed)
    ref = drift.oracle(grads, lr=LR, weight_decay=0.0)
    print("| code | max step, drift (with the floor) | without the floor |")
    print("|---|---|---|")
    for name, (mc, vc) in CANDIDATES.items():
        cells = []
        for floor in (True, False):
            d, most = simulate(grads, mc, vc, floor)
            cells.append(f"{most:.3g} lr, {100 * drift.drift(d, ref):.2f} %")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
