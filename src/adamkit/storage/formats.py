"""How values live in memory. The math (the algorithm modules) always sees compute-dtype values; these small
pure functions turn stored values into them (decode) and back (encode). Every backend composes them
with the math the same way: the reference backend per tensor, the compiled and native kernels inside theirs.

Parameter modes (bytes per parameter beyond the parameter itself):

- ``native``  fp32/fp64 parameters: the math runs in their dtype, nothing extra (0 B).
- ``plain``   bf16/fp16 parameters rounded to nearest after each step (0 B). Updates smaller than
  half an ulp (bf16: 2^-9 relative) are lost: with lr=1e-3 most of them.
- ``kahan``   bf16/fp16 parameter plus a compensation buffer ``kahan_comp`` in the same dtype (2 B):
  the pair (p, c) holds the fp32 result as p = round(x), c = round(x - p), so what rounding drops
  is carried to the next step (~17 significant bits for bf16). The *whole* update, weight decay
  included, goes through it. For bf16, c is rounded stochastically (unbiased).
- ``kahan8``  bf16 parameter plus an int8 compensation ``kahan_comp8`` (1 B), ``kahan_sum="8bit"``.
  The value is x = p + q * u(p), with u(p) = ulp(p) / 256 = 2^(E - 142), E the biased exponent
  field of the bf16 p (bits 7-14: a shift and a mask, no logarithm). The sum is exact in fp32 (p
  has 8 significant bits, |q * u| < ulp(p) / 2 lies 15 bits below p's leading bit). A step computes
  x = p + q * u(p) + delta in fp32, stores p' = bf16(x) rounded to nearest even, and the residual
  r = x - p' (exact in fp32; |r| <= ulp(p') / 2, i.e. |r / u(p')| <= 128) as
  q' = clamp(floor(r / u(p') + z), -127, 127), z in [0, 1) the parameter stream's 16 hash bits
  (``hash_bits``): E[q'] = r / u(p') exactly (every operand is exact in fp32) for |r| <= 127 u;
  in the outermost unit (127 u < |r| <= 128 u, 1/128 of residuals) the clamp cuts up to one
  unit u = ulp/256. So the pair holds ~16 significant bits (bf16's 8 + the correction's 8; bf16 +
  bf16 ``kahan`` holds ~17, fp32 24): |x - (p' + q' u)| < u (u / 2 when rounded to nearest, as
  conversions do, inside +-127.5 u), and what falls below u is kept on average: a weight decaying
  by lr * wd = 1e-4 of itself per step (3-7 units u) follows the fp32 trajectory where ``plain``
  freezes. Parameters with E < 16 (|p| < 2^-111, where u would be subnormal), zero, inf and nan
  keep q = 0 (a nan stays
  nan). bf16 parameters only (fp16's exponent range would need another unit).
- ``sr``      bf16 parameters with stochastic rounding (0 B): round up with probability equal to the
  dropped fraction, so the expected parameter equals the fp32 result.
- ``master``  an fp32 ``master_weight`` (4 B); the bf16/fp16 parameter is its rounded copy, the one
  the forward pass uses (the classic mixed-precision recipe).

State formats (per moment, bytes per parameter): ``fp32`` (4), ``fp64`` (8), ``bf16`` (2, with
stochastic rounding: with beta2=0.999 the change of v per step is below bf16's half-ulp, so
round-to-nearest would freeze v), ``fp16`` (2), and ``8bit`` (see ``quant8``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
PARAM_MODES = ("native", "plain", "kahan", "kahan8", "sr", "master")
STATE_FORMATS = ("fp32", "bf16", "fp16", "fp64", "8bit")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
STATE_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class Formats(NamedTuple):
    """How one parameter and its moments are stored."""

    param: str  # one of PARAM_MODES
    state: str  # one of STATE_FORMATS


def choose_formats(
    dtype: torch.dtype,
    kahan_sum: bool | str | None,
    stochastic_rounding: bool,
    master_weights: bool,
    state_format,
) -> Formats:
    """The formats of a parameter of ``dtype`` under a group's options (``kahan_sum``: None, a bool,
    or ``"8bit"`` for the int8 compensation)."""
    if dtype in LOW_PRECISION:
        if master_weights:
            mode = "master"
        elif stochastic_rounding:
            if dtype != torch.bfloat16:
                raise ValueError(
                    "stochastic_rounding supports bfloat16 parameters only; use kahan_sum=True or "
                    "master_weights=True for float16 parameters"
                )
            mode = "sr"
        elif kahan_sum == "8bit":
            if dtype != torch.bfloat16:
                raise ValueError(
                    "kahan_sum='8bit' supports bfloat16 parameters only; use kahan_sum=True (a float16 "
                    "compensation) or master_weights=True for float16 parameters"
                )
            mode = "kahan8"
        elif kahan_sum or kahan_sum is None:
            mode = "kahan"
        else:
            mode = "plain"
    else:
        mode = "native"
    if state_format is None:
        # torch keeps moments in the parameter's dtype; fp16 cannot hold g^2 of typical gradients
        # (its smallest normal is 6e-5), so fp16 parameters get fp32 moments.
        state = "fp32" if dtype == torch.float16 else STATE_DTYPE_NAMES.get(dtype, "fp32")
    else:
        state = state_format
    return Formats(mode, state)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math runs in fp32, or fp64 for fp64 parameters (so fp64 runs match torch to ~1e-12)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Stochastic rounding to bf16 with a counter-based hash (no RNG state: resuming is bit-identical,
# and no extra memory stream: the random bits come from the element index, a seed and the step).
# --------------------------------------------------------------------------------------------------

_MASK = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def mix_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integers (step number, tensor or bucket id, stream), computed
    on the host: every output bit depends on every input bit (murmur3's finalizer), so the seeds of
    consecutive steps are unrelated even in their top bits, which ``hash_bits`` uses."""
    h = 0x9E3779B9
    for k in keys:
        h = _fmix32((h ^ (int(k) & _MASK)) + 0x7F4A7C15 & _MASK)
    return h


def hash_bits(index: torch.Tensor, seed) -> torch.Tensor:
    """16 pseudo-random bits per element, as int64 in [0, 65536): the top half of a 32-bit Weyl
    sequence, frac(index * phi + seed / 2^32).

    One multiply-add per element, so it costs nothing next to the memory traffic of a step.
    Consecutive elements get evenly spread values (better than independent draws for dithering),
    and the per-step seed (``mix_seed``, a full hash) decorrelates one step from the next. Indices
    stay below 2^31 and the multiplier below 2^32, so the product fits int64."""
    return ((index * 0x9E3779B1 + seed) & _MASK) >> 16


def round_bf16_stochastic(x: torch.Tensor, index: torch.Tensor, seed) -> torch.Tensor:
    """fp32 -> bf16, rounding the magnitude up with probability (dropped bits) / 2^16, so the
    expected result is ``x``: add 16 random bits below bf16's last kept bit, then truncate.

    In int32, the sign bit is the integer's sign, so adding r moves the magnitude bits of negative
    values the same way. inf needs no special case: a carry out of the low 16 bits only touches
    mantissa bits that the truncation clears. nan does: a nan whose payload is all ones (torch's
    vectorized maximum makes 0xFFFFFFFF) wraps to +0 when r is added, so nan becomes bf16's nan
    explicitly (0x7FC0, as torch's own conversion gives)."""
    bits = x.view(torch.int32)
    r = hash_bits(index, seed).to(torch.int32)
    out = ((bits + r) & ~0xFFFF).view(torch.float32)  # exact in bf16: the low bits are zero
    return torch.where(x.isnan(), x, out).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


# kahan8: the correction's unit u(p) = 2^(E - 142) from the bf16 exponent field E (module docstring)
KAHAN8_MIN_EXP = 16  # below, u(p) or 1 / u(p) would leave fp32's normal range: q is kept 0
KAHAN8_MAX_Q = 127


def kahan8_units(p: torch.Tensor):
    """(ok, u, 1/u) of bf16 ``p``, built from its exponent bits: ok where p is finite with
    E >= KAHAN8_MIN_EXP (elsewhere q stays 0; u and 1/u are then placeholders that stay finite)."""
    e = (p.view(torch.int16).to(torch.int32) >> 7) & 0xFF
    ok = (e >= KAHAN8_MIN_EXP) & (e < 255)
    unit = ((e - 15).clamp(1, 254) << 23).view(torch.float32)  # 2^(E - 142)
    inv = ((269 - e).clamp(1, 254) << 23).view(torch.float32)  # 2^(142 - E)
    return ok, unit, inv


def kahan8_value(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """fp32 value p + q * u(p) of a bf16 parameter and its int8 correction (exact)."""
    _, unit, _ = kahan8_units(p)
    return p.to(torch.float32) + q.to(torch.float32) * unit


def kahan8_correction(p: torch.Tensor, x: torch.Tensor, index=None, seed=None) -> torch.Tensor:
    """The int8 q with p + q * u(p) nearest ``x`` (fp32): stochastically rounded with the hash bits of
    (index, seed) (the step's encode), or to nearest where ``index`` is None (conversions, loading).
    The residual x - p is clamped to +-127 units (it is within them where p = bf16(x))."""
    ok, _, inv = kahan8_units(p)
    t = (x - p.to(torch.float32)) * inv  # exact: a power of two
    if index is None:
        q = torch.round(t)
    else:
        # t + z is exact (|t| <= 128 with steps of >= 2^-9, z with steps of 2^-16): floor rounds
        # up with probability frac(t) exactly
        q = torch.floor(t + hash_bits(index, seed).to(torch.float32) * (1.0 / 65536.0))
    q = q.clamp(-KAHAN8_MAX_Q, KAHAN8_MAX_Q)
    return torch.where(ok & q.isfinite(), q, 0.0).to(torch.int8)


def decode_param(mode: str, p: torch.Tensor, aux: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor:
    """The compute-dtype value of a parameter (``aux`` is kahan_comp, kahan_comp8 or master_weight)."""
    if mode == "kahan8":
        return kahan8_value(p, aux)
    if mode == "kahan":
        return p.to(cdt) + aux.to(cdt)
    if mode == "master":
        return aux.to(cdt)
    return p.to(cdt)


def encode_param(mode: str, x: torch.Tensor, dtype: torch.dtype, index, seed):
    """Stored (param, aux) for the compute-dtype value ``x``; aux is None where unused."""
    if mode == "kahan":
        hi = x.to(dtype)
        lo = x - hi.to(x.dtype)  # exact in fp32 (Sterbenz)
        if dtype == torch.bfloat16:
            # Rounding lo to bf16 drops up to 2^-18 of the weight per step, as much as a typical
            # decay step (lr * wd = 1e-5); rounding it stochastically keeps that loss unbiased.
            return hi, round_bf16_stochastic(lo.to(torch.float32), index, seed)
        return hi, lo.to(dtype)
    if mode == "kahan8":
        hi = x.to(dtype)
        return hi, kahan8_correction(hi, x, index, seed)
    if mode == "master":
        return x.to(dtype), x.to(torch.float32)
    if mode == "sr":
        return round_bf16_stochastic(x, index, seed), None
    return x.to(dtype), None


def param_aux_key(mode: str) -> str | None:
    return {"kahan": "kahan_comp", "kahan8": "kahan_comp8", "master": "master_weight"}.get(mode)


def init_param_aux(mode: str, p: torch.Tensor) -> torch.Tensor | None:
    if mode == "kahan":
        return torch.zeros_like(p, memory_format=torch.preserve_format)  # 2 B/param (bf16/fp16)
    if mode == "kahan8":
        return torch.zeros_like(p, dtype=torch.int8, memory_format=torch.preserve_format)  # 1 B/param
    if mode == "master":
        return p.detach().to(torch.float32, copy=True)  # 4 B/param
    return None


# --------------------------------------------------------------------------------------------------
# Moments (floating formats; 8-bit lives in quant8.py and plugs in through the same two functions)
# --------------------------------------------------------------------------------------------------


def state_dtype(fmt: str) -> torch.dtype:
    return _DTYPES[fmt]


def decode_state(fmt: str, t: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    return t.to(cdt)


def encode_state(fmt: str, x: torch.Tensor, index, seed) -> torch.Tensor:
    if fmt == "bf16":
        return round_bf16_stochastic(x.to(torch.float32), index, seed)
    return x.to(_DTYPES[fmt])
