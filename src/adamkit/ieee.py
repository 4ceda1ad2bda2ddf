"""Correctly rounded fp32 arithmetic that does not depend on the host's math library.

torch's CPU ``sqrt`` comes from a vector math library whose results differ between CPUs: on one
AMD EPYC (Zen 4) the fp32 root is correctly rounded in ~80 % of elements and 1 ulp off elsewhere,
the fp64 one in ~99 %. The reference backend is the specification every other backend is held to
bit for bit, so the operations of an update that the native kernel rounds once (``sqrtf``, ``/``,
``fmaf``) are computed here with IEEE round-to-nearest-even on every host:

- ``sqrt_rn``: the library's fp64 root rounded to fp32, checked exactly in fp64 against the
  squares of the fp32 midpoints around it and corrected where it is off (see the function).
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
TensorList (anything with ``.ts``), which rounds them with the native library's instructions.
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


def map_tensors(fn, *args):
    """Apply a per-tensor ``fn`` to TensorLists (the foreach backend's fallback where the native
    library, which rounds these operations itself, is not loaded)."""
    lists = [a.ts if hasattr(a, "ts") else None for a in args]
    first = next(lst for lst in lists if lst is not None)
    cols = [lst if lst is not None else [a] * len(first) for lst, a in zip(lists, args)]
    return type(next(a for a in args if hasattr(a, "ts")))([fn(*row) for row in zip(*cols)])


def sqrt_rn(x):
    """sqrt(x), correctly rounded for fp32 CPU tensors (else torch's ``sqrt``)."""
    if hasattr(x, "ts"):  # the foreach backend's TensorList (its own fast path)
        return x.sqrt_rn()
    if not _exact_here(x):
        return x.sqrt()
    d = x.double()
    s = d.sqrt().float()
    # Exact already when the library's fp64 root is faithful (< 1 ulp): the true root lies at
    # least 2^-51 (relative) from any fp32 midpoint m (x has 24 bits, m * m 50 with a 1 at the
    # end), farther than that error. Checked, not assumed: s is the correctly rounded root iff x
    # lies between the squares of its midpoints, s^2 - s v + v^2/4 <= x <= s^2 + s u + u^2/4, all
    # exact in fp64; elsewhere (a library worse than faithful) one step toward the midpoints.
    sd = s.double()
    up = torch.nextafter(s, torch.tensor(float("inf")))
    dn = torch.nextafter(s, torch.tensor(0.0))
    u, v = up.double() - sd, sd - dn.double()  # the spacings above and below s (v = u / 2 at 2^k)
    r = d - sd * sd  # exact: s * s has 48 bits, x 24, and they are close
    ok = (r <= sd * u + u * u * 0.25) & (-r <= sd * v - v * v * 0.25)
    ok |= ~((x > 0) & (x < float("inf")))  # 0, negative, inf and nan keep the IEEE result
    if bool(ok.all()):
        return s
    hi = (sd + up.double()) * 0.5  # exact: 25 significant bits
    lo = (sd + dn.double()) * 0.5
    fix = torch.where(hi * hi < d, up, torch.where(lo * lo > d, dn, s))
    return torch.where(ok, s, fix)


def div_rn(a, b):
    """a / b, correctly rounded for fp32 CPU tensors (``b`` a tensor or a Python number)."""
    if hasattr(a, "ts"):
        return a.div_rn(b)
    if hasattr(b, "ts"):
        return b.rdiv_rn(a)
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
    if hasattr(a, "ts"):
        return a.fma_rn(b, c)
    if not _exact_here(a):
        return c.add(a, alpha=b) if not isinstance(b, torch.Tensor) else c + a * b
    p = a.double() * _f64(b)  # exact
    cd = c.double()
    s = p + cd
    r = s.float()
    # The fp64 rounding can only mislead the fp32 one where s lies exactly halfway between two
    # fp32 values: the 29 fraction bits fp32 drops are then 1 followed by 28 zeros (in fp32's
    # normal range; smaller sums take the full path too). Rare: checked before any more work.
    maybe = ((s.view(torch.int64) & 0x1FFFFFFF) == 0x10000000) | (s.abs() < 2.0**-125)
    if not bool(maybe.any()):
        return r
    # TwoSum: s + e == p + c exactly
    bv = s - p
    e = (p - (s - bv)) + (cd - bv)
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
        if not all(_exact_here(t) for t in a.ts):
            return map_tensors(lerp_rn, a, b, w)
    elif not _exact_here(a):
        return a.lerp(b, w)
    d = b - a
    if isinstance(w, torch.Tensor):  # the compiled kernel's scalars: both ends, chosen per value
        w = w.to(torch.float32)
        return torch.where(w.abs() < 0.5, fma_rn(d, w, a), fma_rn(d, w - 1.0, b))
    w32 = float(torch.tensor(w, dtype=torch.float32))
    if abs(w32) < 0.5:
        return fma_rn(d, w32, a)
    return fma_rn(d, float(torch.tensor(w32 - 1.0, dtype=torch.float32)), b)
