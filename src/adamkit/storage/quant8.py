"""8-bit blockwise moments with closed-form companding: no lookup table in the hot loop.

Each block of ``BLOCK`` = 256 consecutive elements keeps one fp32 scale ``a`` (its largest finite
magnitude) and one byte per element. Bytes per parameter per moment: 1 + 4/256 = 1.016.

Layouts. Blocks must not depend on how a tensor is cut between processes (FSDP2 splits dim 0 of
every parameter between ranks), so a moment of a parameter of >= 2 dimensions, global shape
(R, ...), is kept in **rows**: row r holds the L = numel / R elements of ``p[r]``, each row padded
to whole blocks, codes of shape (R, padded(L)) uint8 and scales (R, blocks(L)) fp32, sharded like
the parameter (rows move whole). Bytes per element: padded(L) / L + 4 blocks(L) / L, 1.016 where
L is a multiple of 256 (then the bytes are exactly those of the flat layout). Other tensors (1-D,
0-D, slots of their own shapes) use the **flat** layout: the elements in order, padded to whole
blocks, codes (padded(n),), scales (blocks(n),).

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

from ..ieee import div_rn, sqrt_rn
from .formats import hash_bits

BLOCK = 256
SCALE_BYTES = 4  # one fp32 scale per block
# ints, not floats: dynamo turns global floats into run-time inputs, which would cost a scalar pow
# and divisions per vector in the compiled loop; ints are folded as constants.
_QM, _QV = 127, 254
_NAN_M, _NAN_V = 0, 255
_TINY = 2.0**-126  # the smallest normal fp32


def padded(n: int) -> int:
    return math.ceil(n / BLOCK) * BLOCK


def blocks(n: int) -> int:
    return math.ceil(n / BLOCK)


def zeros(n: int, signed: bool, device=None, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of n zeros: (n padded to a block) bytes + 4 bytes per block; with ``rows``,
    the row layout of ``rows`` rows of n elements each (rows * padded(n) bytes + 4 per block)."""
    shape, nb = ((padded(n),), (blocks(n),)) if rows is None else ((rows, padded(n)), (rows, blocks(n)))
    codes = torch.full(shape, 128 if signed else 0, dtype=torch.uint8, device=device)
    return codes, torch.zeros(nb, dtype=torch.float32, device=device)


def row_length(shape) -> int:
    """L, the elements of one row of a parameter of ``shape`` (>= 2-D): the product of shape[1:]."""
    return math.prod(tuple(shape)[1:])


def row_bytes(length: int, block: int = BLOCK) -> int:
    """Bytes of one row of ``length`` elements in the row layout (codes + scales)."""
    nb = -(-length // block)
    return nb * block + SCALE_BYTES * nb


def layout(shape, min_8bit_size: int, sharded: bool = False, block: int = BLOCK) -> str | None:
    """How a parameter of global ``shape`` keeps its moments under state_format='8bit': the one
    rule the engine (``optim.layout.quantizable``) and the planner share, decided from the global
    shape so that every rank and every world size decides alike.

    ``"rows"`` (>= 2-D: blocks inside dim-0 rows, each row padded to whole blocks), ``"flat"`` (a
    1-D or 0-D tensor: one row), or None (fp32): below ``min_8bit_size`` elements (norms, biases:
    the saving is a few bytes), rows whose padded codes and scales would take more bytes than fp32
    (fewer than 66 elements: a row costs at least 260 B), or a 1-D/0-D tensor that FSDP2 shards
    (``sharded``: a flat tensor's blocks cannot be cut between ranks)."""
    shape = tuple(shape)
    if math.prod(shape) < min_8bit_size:
        return None
    if len(shape) >= 2:
        length = row_length(shape)
        return "rows" if row_bytes(length, block) < 4 * length else None
    return None if sharded else "flat"


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
    # A block whose largest magnitude is subnormal (< 2^-126: a long-idle row's decaying m) is
    # stored as zeros: 1/a would overflow to inf, turning its zeros into nan (0 * inf) where
    # subnormals are not flushed, torch's default. What is dropped is below 1.2e-38.
    a = torch.where(a < _TINY, 0.0, a)
    u = hash_bits(index, seed).to(torch.float32) * (1.0 / 65536.0)
    inv_a = torch.where(a > 0, div_rn(1.0, a), 0.0)  # one division per block, not per element
    r = mag * inv_a  # in [0, 1]
    if signed:
        c = torch.clamp(torch.floor(sqrt_rn(r) * _QM), max=_QM - 1)
        lo, hi = c * c * (1.0 / _QM**2), (c + 1) * (c + 1) * (1.0 / _QM**2)
    else:
        c = torch.clamp(torch.floor(sqrt_rn(sqrt_rn(r)) * _QV), max=_QV - 1)
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


def decode(
    signed: bool, codes: torch.Tensor, scales: torch.Tensor, shape, cdt: torch.dtype, rows: bool = False
) -> torch.Tensor:
    """Codes and block scales -> values of ``shape``. Flat: codes of any shape holding the padded
    length; ``rows``: (R, padded(L)) codes of rows of L = prod(shape[1:]) elements. (Stored
    state tells them apart by its codes' dimensions: flat codes are kept 1-D.)"""
    x = decode_blocks(signed, codes.view(-1, BLOCK), scales.reshape(-1), cdt)
    if rows:  # drop each row's padding
        return x.view(codes.shape)[:, : row_length(shape)].reshape(shape)
    if tuple(x.shape) == tuple(shape):  # the fused kernel works on (blocks, 256) directly
        return x
    n = math.prod(shape)
    return x.reshape(-1)[:n].view(shape)


def row_index(index: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """The rounding positions of the row layout's (rows, padded(length)) elements from those of the
    (rows, length) values: row r's padding continues its row, first + 0, 1, ..., padded - 1 (the
    native kernel numbers a row's short last block the same way)."""
    first = index.reshape(rows, length)[:, :1]
    return first + torch.arange(padded(length), device=index.device)


def encode(signed: bool, x: torch.Tensor, index: torch.Tensor | None = None, seed=0, rows: bool = False):
    """Values -> (uint8 codes, fp32 block scales). Flat (``rows=False``): any shape, zero-padded to
    whole blocks, codes (blocks, 256) and scales (blocks,). Rows (``rows=True``, x of >= 2 dims):
    each of x's x.shape[0] rows zero-padded to whole blocks, codes (R, padded(L)) and scales
    (R, blocks(L)). ``index`` (x's shape) gives each element's position for the rounding bits
    (default: 0..n-1 in order, padding included)."""
    if not rows:
        xb = blockify(x)
        index = torch.arange(xb.numel(), device=x.device) if index is None else index
        return encode_blocks(signed, xb, index.view(xb.shape), seed)
    r, length = x.shape[0], row_length(x.shape)
    xr = F.pad(x.reshape(r, length), (0, padded(length) - length))
    if index is None:
        index = torch.arange(r * length, device=x.device)
    index = row_index(index, r, length)
    codes, scales = encode_blocks(signed, xr.view(-1, BLOCK), index.view(-1, BLOCK), seed)
    return codes.view(r, padded(length)), scales.view(r, blocks(length))


def to_rows(
    signed: bool, codes: torch.Tensor, scales: torch.Tensor, shape
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-layout codes of a parameter of ``shape`` (>= 2-D; older checkpoints) in the row layout.
    Where the row length is a multiple of 256 the bytes are the same (a view); otherwise the values
    are decoded and encoded again in rows (each within the format's bound of the saved value)."""
    r, length = shape[0], row_length(shape)
    if length % BLOCK == 0:
        return codes.reshape(r, length), scales.reshape(r, length // BLOCK)
    x = decode(signed, codes, scales, shape, torch.float32)
    return encode(signed, x, rows=True)


def error_bound(signed: bool, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """The largest |decode(encode(x)) - x| per element allowed by the format (see module doc), as a
    flat tensor of x's elements in order; ``rows``: x in the row layout (blocks within rows)."""
    if rows:
        r, length = x.shape[0], row_length(x.shape)
        xr = F.pad(x.reshape(r, length).double(), (0, padded(length) - length)).reshape(-1)
        out = error_bound(signed, xr).view(r, padded(length))[:, :length]
        return out.reshape(-1)
    x = x.reshape(-1).double()
    n = x.numel()
    xb = F.pad(x, (0, padded(n) - n)).view(-1, BLOCK)
    a = xb.abs().amax(dim=1, keepdim=True)
    k, q = (2, _QM) if signed else (4, _QV)
    c = torch.floor(q * (xb.abs() / torch.where(a > 0, a, 1.0)) ** (1.0 / k))
    bound = a * ((c + 1) ** k - c**k) / q**k
    return bound.reshape(-1)[:n] * (1 + 1e-6) + 1e-30  # fp32 arithmetic inside encode/decode
