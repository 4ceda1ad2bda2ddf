"""Make this host round like one whose vector math library is not correctly rounded.

On some CPUs torch's fp32 ``sqrt`` is 1 ulp off in ~20 % of elements (an AMD EPYC, Zen 4, with the
pinned torch build), on others it is exact. A test that compares bits with torch's results then
passes on one machine and fails on the other. ``install()`` (``pytest --perturb-rounding``, or
``ADAMKIT_TEST_PERTURB_ROUNDING=1`` in the environment, which spawned test processes inherit) wraps
torch's fp32 square roots and true divisions so that a fifth of the elements of every result are
one ulp off, up or down: the suite must stay green on such a host too.

The perturbation is a deterministic function of the correctly rounded result (a hash of its bits),
as a real host's is of its inputs: the same operation on the same values gives the same result, so
runs stay reproducible. Only plain fp32 tensors are perturbed (not tensor subclasses, not fp64,
not code being traced by torch.compile: Inductor emits its own square root).
"""

from __future__ import annotations

import os

import torch

ENV = "ADAMKIT_TEST_PERTURB_ROUNDING"
_installed = False


def _delta(x: torch.Tensor) -> torch.Tensor | None:
    """What to add to ``x`` (exactly: a neighbour minus x) to perturb it; None where nothing is."""
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or x.dtype != torch.float32 or x.numel() == 0:
        return None
    with torch.no_grad():
        xd = x.detach()
        bits = xd.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        h = (bits * 2654435761) & 0xFFFFFFFF  # Knuth's multiplicative hash
        chosen = ((h >> 24) < 51) & xd.isfinite() & (xd != 0) & (xd.abs() < 3e38)  # 51/256: a fifth
        up = ((h >> 23) & 1) == 1
        toward = torch.where(up, float("inf"), float("-inf"))
        nxt = torch.nextafter(xd, toward)
        return torch.where(chosen, nxt - xd, 0.0)  # exact (Sterbenz)


def _perturbed(x):
    d = _delta(x)
    return x if d is None else x + d


def _perturb_(x):
    d = _delta(x)
    if d is not None:
        with torch.no_grad():
            x.add_(d)
    return x


def _wrap(orig, inplace: bool, is_list: bool = False, div: bool = False):
    def wrapper(*args, **kwargs):
        out = orig(*args, **kwargs)
        if torch.compiler.is_compiling():
            return out
        if div and kwargs.get("rounding_mode") is not None:
            return out
        if is_list:
            if inplace:
                for t in args[0]:
                    _perturb_(t)
                return out
            return [_perturbed(t) for t in out]
        return _perturb_(out) if inplace else _perturbed(out)

    wrapper.__wrapped__ = orig
    return wrapper


# (owner, name, in place, list op, division)
_TARGETS = [
    (torch, "sqrt", False, False, False),
    (torch.Tensor, "sqrt", False, False, False),
    (torch.Tensor, "sqrt_", True, False, False),
    (torch, "_foreach_sqrt", False, True, False),
    (torch, "_foreach_sqrt_", True, True, False),
    (torch, "div", False, False, True),
    (torch, "divide", False, False, True),
    (torch, "true_divide", False, False, True),
    (torch.Tensor, "div", False, False, True),
    (torch.Tensor, "divide", False, False, True),
    (torch.Tensor, "true_divide", False, False, True),
    (torch.Tensor, "div_", True, False, True),
    (torch.Tensor, "__truediv__", False, False, True),
    (torch.Tensor, "__rtruediv__", False, False, True),
    (torch.Tensor, "__itruediv__", True, False, True),
    (torch, "_foreach_div", False, True, True),
    (torch, "_foreach_div_", True, True, True),
]


def install() -> None:
    """Wrap torch's fp32 sqrt and division (once per process)."""
    global _installed
    if _installed:
        return
    for owner, name, inplace, is_list, div in _TARGETS:
        setattr(owner, name, _wrap(getattr(owner, name), inplace, is_list, div))
    _installed = True


def install_if_requested() -> None:
    """For spawned test processes: install when the parent ran with the option."""
    if os.environ.get(ENV) == "1":
        install()


def installed() -> bool:
    return _installed
