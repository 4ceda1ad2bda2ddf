"""8-bit blockwise moments with closed-form companding: no lookup table in the hot loop.

Each block of ``BLOCK`` = 256 consecutive elements keeps one fp32 scale ``a`` (its largest finite
magnitude) and one byte per element. Bytes per parameter per moment: 1 + 4/256 = 1.016.

Codes (power-law companding, so small values keep relative precision that a linear code loses):

- signed slots (Adam's m, Lion's m):   x = a * c|c| / 127^2,  c in [-127, 127], stored as c + 128.
  Smallest non-zero magnitude a/16129 (6e-5 a); relative step 2/|c|.
- unsigned slots (Adam's v and max v):  x = a * (c / 254)^4,  c in [0, 254].
  Smallest non-zero a/4.2e9; relative step 4/c (2/c on sqrt(v), which is what the update uses).

Decoding is multiplies only; encoding needs one (m) or two (v) square roots. Why not a codebook:
gathers through a 256-entry table are what make existing 8-bit optimizers slow on CPU.

Exactness where it matters:

- Zero is code 0 (stored 128 for m): a block of zero gradients stays exactly zero, and a parameter
  whose gradient is always zero never moves.
- Rounding is stochastic (16 hash bits, as in ``formats``) and unbiased in the linear domain:
  with beta2 = 0.999 the per-step change of v is far below a code step, so round-to-nearest would
  freeze v, and dithering the companded value would bias v upwards.
  Per element, |decode(encode(x)) - x| <= a * ((c+1)^k - c^k) / Q^k with c = floor(Q (|x|/a)^(1/k)),
  (k, Q) = (2, 127) for signed and (4, 254) for unsigned slots. ``error_bound`` computes it;
  tests check it in fp64.
- A non-finite value is stored as its own marker (m: stored 0, v: 254 + 1) and decodes to nan; the
  block scale is the largest *finite* magnitude, so one bad gradient element never spoils its block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import hash_bits

BLOCK = 256
# ints, not floats: dynamo turns global floats into run-time inputs, which would cost a scalar pow
# and divisions per vector in the compiled loop; ints are folded as constants.
_QM, _QV = 127, 254
_NAN_M, _NAN_V = 0, 255


def padded(n: int) -> int:
    return math.ceil(n / BLOCK) * BLOCK


def blocks(n: int) -> int:
    return math.ceil(n / BLOCK)


def zeros(n: int, signed: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of n zeros: (n padded to a block) bytes + 4 bytes per block."""
    codes = torch.full((padded(n),), 128 if signed else 0, dtype=torch.uint8, device=device)
    return codes, torch.zeros(blocks(n), dtype=torch.float32, device=device)


def decode_blocks(signed: bool, codes: torch.Tensor, scales: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """(blocks, 256) codes and (blocks,) scales -> (blocks, 256) values in ``cdt``."""
    c = codes.to(torch.float32)
    a = scales.view(-1, 1)
    if signed:
        c = c - 128.0
        x = (c * c.abs()) * (a * (1.0 / (_QM * _QM)))
        x = torch.where(codes == _NAN_M, float("nan"), x)
    else:
        c2 = c * c
        x = (c2 * c2) * (a * (1.0 / _QV**4))
        x = torch.where(codes == _NAN_V, float("nan"), x)
    return x.to(cdt)


def blockify(x: torch.Tensor) -> torch.Tensor:
    """Any tensor -> (blocks, 256), zero-padded (a no-op for a (blocks, 256) tensor)."""
    if x.dim() == 2 and x.shape[1] == BLOCK:
        return x
    x = x.reshape(-1)
    if x.numel() % BLOCK:
        x = F.pad(x, (0, padded(x.numel()) - x.numel()))
    return x.view(-1, BLOCK)


def encode_blocks(signed: bool, xb: torch.Tensor, index: torch.Tensor, seed):
    """(blocks, 256) values -> (blocks, 256) uint8 codes and (blocks,) fp32 scales, each block's
    scale being its largest finite magnitude."""
    xb = xb.to(torch.float32)
    finite = torch.isfinite(xb)
    mag = torch.where(finite, xb.abs(), 0.0)
    a = mag.amax(dim=1, keepdim=True)
    u = hash_bits(index, seed).to(torch.float32) * (1.0 / 65536.0)
    inv_a = torch.where(a > 0, 1.0 / a, 0.0)  # one division per block, not per element
    r = mag * inv_a  # in [0, 1]
    if signed:
        c = torch.clamp(torch.floor(torch.sqrt(r) * _QM), max=_QM - 1)
        lo, hi = c * c * (1.0 / _QM**2), (c + 1) * (c + 1) * (1.0 / _QM**2)
    else:
        c = torch.clamp(torch.floor(torch.sqrt(torch.sqrt(r)) * _QV), max=_QV - 1)
        c2, d2 = c * c, (c + 1) * (c + 1)
        lo, hi = c2 * c2 * (1.0 / _QV**4), d2 * d2 * (1.0 / _QV**4)
    # Round up with probability (r - lo) / (hi - lo): unbiased in the *linear* domain. (Uniform
    # dither in the companded domain would be biased by ~1/c^2 per step, and v's EMA with
    # beta2 = 0.999 integrates that bias a thousandfold.)
    c = c + (u * (hi - lo) < r - lo).to(torch.float32)
    if signed:
        stored = torch.where(xb < 0, 128.0 - c, 128.0 + c)
        stored = torch.where(finite, stored, float(_NAN_M))
    else:
        stored = torch.where(finite, c, float(_NAN_V))
    return stored.to(torch.uint8), a.view(-1)


def decode(signed: bool, codes: torch.Tensor, scales: torch.Tensor, shape, cdt: torch.dtype) -> torch.Tensor:
    """Codes (any shape holding the padded length) and block scales -> values of ``shape``."""
    x = decode_blocks(signed, codes.view(-1, BLOCK), scales, cdt)
    if tuple(x.shape) == tuple(shape):  # the fused kernel works on (blocks, 256) directly
        return x
    n = math.prod(shape)
    return x.reshape(-1)[:n].view(shape)


def encode(signed: bool, x: torch.Tensor, index: torch.Tensor | None = None, seed=0):
    """Values (any shape, zero-padded to whole blocks) -> ((blocks, 256) uint8 codes, fp32 block
    scales). ``index`` gives each element's position for the rounding bits (default 0..n-1)."""
    xb = blockify(x)
    index = torch.arange(xb.numel(), device=x.device) if index is None else index
    return encode_blocks(signed, xb, index.view(xb.shape), seed)


def error_bound(signed: bool, x: torch.Tensor) -> torch.Tensor:
    """The largest |decode(encode(x)) - x| per element allowed by the format (see module doc)."""
    x = x.reshape(-1).double()
    n = x.numel()
    xb = F.pad(x, (0, padded(n) - n)).view(-1, BLOCK)
    a = xb.abs().amax(dim=1, keepdim=True)
    k, q = (2, _QM) if signed else (4, _QV)
    c = torch.floor(q * (xb.abs() / torch.where(a > 0, a, 1.0)) ** (1.0 / k))
    bound = a * ((c + 1) ** k - c**k) / q**k
    return bound.reshape(-1)[:n] * (1 + 1e-6) + 1e-30  # fp32 arithmetic inside encode/decode
