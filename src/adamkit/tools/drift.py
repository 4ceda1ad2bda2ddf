"""Teacher-forced drift: how far a storage format takes an optimizer from its float64 trajectory.

Every run is fed the same gradients, whatever its parameters become (the gradients do not depend
on them), so the only difference between runs is how each stores its state. The case that breaks
8-bit moments is embedding-like: rows of a matrix that see a gradient now and then (Zipf-like
frequencies), with elements of a row spanning a range of magnitudes. After a row's rare active
step, its small elements' moments sit near the bottom of their group's code range; a v that
rounds to zero beside an m that does not turns the next update into m / eps.

Two measures (``teacher_forced``):

- the largest move of any element in one step, in learning rates (fp32 Adam: at most ~2 here);
- drift, ||d - d64|| / ||d64||, d the parameters' displacement after all steps, d64 the float64
  oracle's (``torch.optim.AdamW`` in float64 with the same gradients).

Used by ``benchmarks/drift8.py`` (the README's table) and the 8-bit tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sparse_rows(
    rows: int = 512, cols: int = 256, steps: int = 300, scale: float = 1.0, seed: int = 0, spread: float = 0.5
) -> list[torch.Tensor]:
    """fp32 gradients of a (rows, cols) matrix for ``steps`` steps: row r is active in a step with
    probability 0.9 / (r + 1) (Zipf-like: row 0 in 90 % of the steps, row 511 in 0.2 %); an
    active row's gradient is Gaussian with a per-column scale exp(spread * N(0, 1)) (columns of
    different magnitudes, fixed over the run), times ``scale``; inactive rows get zeros."""
    gen = torch.Generator().manual_seed(seed)
    freq = 0.9 / (torch.arange(rows, dtype=torch.float64) + 1.0)
    colscale = torch.exp(spread * torch.randn(cols, generator=gen, dtype=torch.float64))
    out = []
    for _ in range(steps):
        active = torch.rand(rows, generator=gen, dtype=torch.float64) < freq
        g = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * colscale * scale
        out.append((g * active[:, None]).float())
    return out


def teacher_forced(
    make: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
    grads: list[torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float]:
    """(displacement in float64, the largest single-step move of any element in units of the
    group's lr) of the optimizer ``make(param)`` over ``grads``, from parameters of zeros."""
    p = torch.nn.Parameter(torch.zeros(grads[0].shape, dtype=dtype))
    opt = make(p)
    lr = float(opt.param_groups[0]["lr"])
    most = 0.0
    prev = p.detach().double().clone()
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
        now = p.detach().double()
        most = max(most, (now - prev).abs().max().item() / lr)
        prev = now.clone()
    return prev, most


def oracle(grads: list[torch.Tensor], **adamw) -> torch.Tensor:
    """The float64 displacement of ``torch.optim.AdamW(**adamw)`` over ``grads``."""
    d, _ = teacher_forced(lambda p: torch.optim.AdamW([p], **adamw), grads, torch.float64)
    return d


def drift(d: torch.Tensor, ref: torch.Tensor) -> float:
    """||d - ref|| / ||ref|| (0 for equal displacements)."""
    return ((d - ref).norm() / ref.norm()).item()
