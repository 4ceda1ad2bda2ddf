"""Correctly rounded fp32 arithmetic that does not depend on the host's math library.

torch's CPU ``sqrt`` comes from a vector math library whose results differ between CPUs: on one
AMD EPYC (Zen 4) the fp32 root is correctly rounded in ~80 % of elements and 1 ulp off elsewhere,
the fp64 one in ~99 %. The reference backend is the specification every other backend is held to
bit for bit, so the operations of an update that the native kernel rounds once (``sqrtf``, ``/``,
``fmaf``) are computed here with IEEE round-to-nearest-even on every host:

- ``sqrt_rn``: the library's root, then one exact correction: with s a float, the midpoints
  m = (s + s') / 2 of s and its neighbours s' have 25 significant bits, so m * m is exact in fp64
  (50 bits) and ``x < m * m`` says on which side of the midpoint the true root lies. No tie is
  possible (m * m has a 1 in bit 50 and x has 24 bits).
- ``div_rn``: the fp64 quotient rounded to fp32: a double rounding of a quotient of two fp32 values
  through 53 >= 2 * 24 + 2 bits is innocuous (Figueroa, 1995), and fp64 division is a hardware
  IEEE operation (not a library call) on every CPU torch runs on.
- ``fma_rn``: a * b + c rounded once (torch's vectorized ``add(alpha=)`` and ``lerp``): the product
  of two fp32 values is exact in fp64; the fp64 sum's rounding error (TwoSum, exact) decides the
  only case the second rounding could get wrong, an fp64 sum that lies exactly halfway between two
  fp32 values.

Multiplication, addition, subtraction and comparisons need no help: they are IEEE in every
vector unit. Other dtypes and devices take torch's own operation: CUDA's ``sqrt`` and ``/`` are
correctly rounded (torch is not built with fast math), fp64 compute (float64 parameters) is compared
with torch within bounds, never bit for bit. Each function also accepts the foreach backend's
TensorList (anything with ``.ts``), mapping over its tensors.
"""

from __future__ import annotations

import torch


def _exact_here(x) -> bool:
    """Whether to compute it here: fp32 CPU tensors, in eager mode. Code that torch.compile traces
    (the compiled kernel) takes the plain operations: Inductor emits the vector unit's own square
    root and division (IEEE), not the library's, and that kernel is held to the reference within
    bounds, not bits (its compiler may contract a * b + c)."""
    if torch.compiler.is_compiling():
        return False
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"


def _map(fn, *args):
    """Apply a per-tensor ``fn`` to TensorLists (the first argument decides) element by element."""
    lists = [a.ts if hasattr(a, "ts") else None for a in args]
    n = len(lists[0])
    cols = [lst if lst is not None else [a] * n for lst, a in zip(lists, args)]
    return type(args[0])([fn(*row) for row in zip(*cols)])


def sqrt_rn(x):
    """sqrt(x), correctly rounded for fp32 CPU tensors (else torch's ``sqrt``)."""
    if hasattr(x, "ts"):
        return _map(sqrt_rn, x)
    if not _exact_here(x):
        return x.sqrt()
    d = x.double()
    s = d.sqrt().float()  # within an ulp of the true root on any host
    sd = s.double()
    up = torch.nextafter(s, torch.tensor(float("inf")))
    dn = torch.nextafter(s, torch.tensor(0.0))
    hi = (sd + up.double()) * 0.5  # exact: 25 significant bits
    lo = (sd + dn.double()) * 0.5
    fix = torch.where(hi * hi < d, up, torch.where(lo * lo > d, dn, s))
    # 0, negative, inf and nan keep torch's (IEEE) result; subnormal x has a normal root
    return torch.where((x > 0) & (x < float("inf")), fix, s)


def div_rn(a, b):
    """a / b, correctly rounded for fp32 CPU tensors (``b`` a tensor or a Python number)."""
    if hasattr(a, "ts") or hasattr(b, "ts"):
        return _map(div_rn, a, b)
    t = a if isinstance(a, torch.Tensor) else b
    if not _exact_here(t):
        return a / b
    return torch.div(_f64(a), _f64(b)).float()


def _f64(x):
    """A tensor or a Python number (taken as fp32, as torch takes a scalar operand) in fp64."""
    if isinstance(x, torch.Tensor):
        return x.double()
    return torch.tensor(x, dtype=torch.float32).double()


def fma_rn(a, b, c):
    """a * b + c rounded once, for fp32 CPU tensors (``b`` may be a Python number, taken as fp32,
    the way torch takes ``alpha``); elsewhere ``c + a * b`` as torch computes it."""
    if hasattr(a, "ts") or hasattr(c, "ts"):
        return _map(fma_rn, a, b, c)
    if not _exact_here(a):
        return c.add(a, alpha=b) if not isinstance(b, torch.Tensor) else c + a * b
    p = a.double() * _f64(b)  # exact
    cd = c.double()
    s = p + cd
    # TwoSum: s + e == p + c exactly
    bv = s - p
    e = (p - (s - bv)) + (cd - bv)
    r = s.float()
    # s halfway between two floats: round-to-even chose one; the sign of e says which side the
    # exact sum is on (only there can the fp64 rounding have moved it onto the midpoint)
    rd = r.double()
    other = torch.nextafter(r, torch.where(s > rd, float("inf"), float("-inf")).float())
    mid = (rd + other.double()) * 0.5
    toward_other = (e != 0) & (s == mid) & ((e > 0) == (other.double() > rd))
    return torch.where(toward_other & torch.isfinite(s), other, r)


def lerp_rn(a, b, w):
    """torch's vectorized ``a.lerp(b, w)`` with a scalar weight (a number or a 0-d tensor): one
    fused multiply-add from whichever end is nearer, w * (b - a) + a for |w| < 0.5, else
    (w - 1) * (b - a) + b."""
    if hasattr(a, "ts"):
        return _map(lerp_rn, a, b, w)
    if not _exact_here(a):
        return a.lerp(b, w)
    d = b - a
    if isinstance(w, torch.Tensor):  # the compiled kernel's scalars: both ends, chosen per value
        w = w.to(torch.float32)
        return torch.where(w.abs() < 0.5, fma_rn(d, w, a), fma_rn(d, w - 1.0, b))
    w32 = float(torch.tensor(w, dtype=torch.float32))
    if abs(w32) < 0.5:
        return fma_rn(d, w32, a)
    return fma_rn(d, float(torch.tensor(w32 - 1.0, dtype=torch.float32)), b)
