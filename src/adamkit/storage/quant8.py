"""8-bit moments in groups of 32 with closed-form companding: no lookup table in the hot loop.

Each group of ``BLOCK`` = 32 consecutive elements keeps one bf16 scale ``a`` (its largest finite
magnitude, rounded up to bf16) and one byte per element. Bytes per parameter per moment:
1 + 2/32 = 1.0625 (Adam's m and v: 2.125). bf16, not fp16, scales: they need fp32's range (the v
of a gradient of 1e-4 is 1e-8, below fp16's normal range, and a long-idle row's m decays further).
Rounding the scale *up* keeps every element's ratio to it within [0, 1], so the largest element
is coded like the rest (its code may fall one level short of the top one).

Layouts. Groups must not depend on how a tensor is cut between processes (FSDP2 splits dim 0 of
every parameter between ranks), so a moment of a parameter of >= 2 dimensions, global shape
(R, ...), is kept in **rows**: row r holds the L = numel / R elements of ``p[r]``, each row padded
to whole groups, codes of shape (R, padded(L)) uint8 and scales (R, blocks(L)) bf16, sharded like
the parameter (rows move whole). A row of a multiple of 32 elements pads nothing (2.125 B/param for
Adam); any row of 9 or more elements takes fewer bytes than fp32. Other tensors (1-D, 0-D, slots
of their own shapes) use the **flat** layout: the elements in order, padded to whole groups,
codes (padded(n),), scales (blocks(n),). Older versions kept blocks of 256 with fp32 scales
(``LEGACY_BLOCK``): their state dicts are decoded (``decode`` tells them apart by the scales'
dtype) and encoded again in groups of 32 when loaded.

Codes (power-law companding, so small values keep relative precision that a linear code loses):

- signed slots (Adam's m, Lion's m):   x = a * c|c| / 127^2,  c in [-127, 127], stored as c + 128.
  Smallest non-zero magnitude a/16129 (6e-5 a); relative step 2/|c|.
- unsigned slots (Adam's v and max v):  x = a * (c / 254)^4,  c in [0, 254]: quadratic in sqrt(x)
  (sqrt(x) = sqrt(a) (c/254)^2, what the update divides by), smallest non-zero sqrt(x) is
  sqrt(a)/64516; relative step 4/c on x, 2/c on sqrt(x).

Why these powers (``benchmarks/codes8.py``: candidates simulated on a teacher-forced run of
Zipf-active rows against a float64 oracle): a code linear in sqrt(v) (FlashOptim's) resolves
sqrt(v) only to 1/255 of its group's largest, and m to 1/254 with its companding y/(2 - |y|): 8.77 %
drift where these codes give 4.79 % (cubic codes: 3.74 %, but a cube root is no IEEE operation
every backend rounds alike). Decoding is multiplies only; encoding needs one (m) or two (v) square
roots, no division per element.

Exactness where it matters:

- Zero is code 0 (stored 128 for m): a group of zero gradients stays exactly zero, and a parameter
  whose gradient is always zero never moves.
- **No division by eps.** An unsigned code is never 0 where a signed slot of the same element is
  not (``floor_pairs``, applied wherever codes are written): a small v rounded to zero beside a
  non-zero m would turn the next update into m / eps. On the sparse-row run of
  ``benchmarks/drift8.py`` the largest move of an element in one step is 5.6 learning rates
  (fp32 state: 2.1); blocks of 256 without the floor moved one 4,930.
- Rounding is stochastic (16 hash bits, as in ``formats``) and unbiased in the linear domain:
  with beta2 = 0.999 the per-step change of v is far below a code step, so round-to-nearest would
  freeze v, and dithering the companded value would bias v upwards. (Rounded to nearest, the
  noise-dominated sparse-row run drifts a little less, 3.25 % against 4.00 %, but v stops following
  constant gradients: 53.7 % off after 300 steps against 9.0 %, ``benchmarks/drift8.py``.)
  Per element, |decode(encode(x)) - x| <= a * ((c+1)^k - c^k) / Q^k with c = floor(Q (|x|/a)^(1/k)),
  (k, Q) = (2, 127) for signed and (4, 254) for unsigned slots, a the group's bf16 scale.
  ``error_bound`` computes it; tests check it in fp64.
- A non-finite value is stored as its own marker (m: stored 0, v: 254 + 1) and decodes to nan; the
  group scale is the largest *finite* magnitude, so one bad gradient element never spoils its group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ieee import div_rn, sqrt_rn
from .formats import hash_bits

BLOCK = 32
SCALE_BYTES = 2  # one bf16 scale per group
LEGACY_BLOCK = 256  # older versions: blocks of 256 with fp32 scales (loaded, never written)
# ints, not floats: dynamo turns global floats into run-time inputs, which would cost a scalar pow
# and divisions per vector in the compiled loop; ints are folded as constants.
_QM, _QV = 127, 254
_NAN_M, _NAN_V = 0, 255
_TINY = 2.0**-126  # the smallest normal fp32
_BF16_MAX_BITS = 0x7F7F0000  # the largest finite bf16, as fp32 bits


def scale_up(a: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 scales rounded up to bf16 (as bf16): x / scale stays <= 1. A scale above
    bf16's largest finite value saturates there (its elements then take the top code)."""
    bits = a.to(torch.float32).contiguous().view(torch.int32)
    up = torch.clamp((bits + 0xFFFF) & ~0xFFFF, max=_BF16_MAX_BITS)  # positive: no sign to carry
    return up.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def padded(n: int, block: int = BLOCK) -> int:
    return math.ceil(n / block) * block


def blocks(n: int, block: int = BLOCK) -> int:
    return math.ceil(n / block)


def zeros(n: int, signed: bool, device=None, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of n zeros: (n padded to a group) bytes + 2 bytes per group; with ``rows``,
    the row layout of ``rows`` rows of n elements each (rows * padded(n) bytes + 2 per group)."""
    shape, nb = ((padded(n),), (blocks(n),)) if rows is None else ((rows, padded(n)), (rows, blocks(n)))
    codes = torch.full(shape, 128 if signed else 0, dtype=torch.uint8, device=device)
    return codes, torch.zeros(nb, dtype=torch.bfloat16, device=device)


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
    (fewer than 9 elements: a row costs at least 34 B), or a 1-D/0-D tensor that FSDP2 shards
    (``sharded``: a flat tensor's blocks cannot be cut between ranks)."""
    shape = tuple(shape)
    if math.prod(shape) < min_8bit_size:
        return None
    if len(shape) >= 2:
        length = row_length(shape)
        return "rows" if row_bytes(length, block) < 4 * length else None
    return None if sharded else "flat"


def decode_blocks(signed: bool, codes: torch.Tensor, scales: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """(groups, 32) codes and (groups,) scales -> (groups, 32) values in ``cdt`` (also
    (blocks, 256) codes with fp32 scales: the legacy layout)."""
    c = codes.to(torch.float32)
    a = scales.to(torch.float32).view(-1, 1)
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
    """Any tensor -> (groups, 32), zero-padded (a no-op for a (groups, 32) tensor)."""
    if x.dim() == 2 and x.shape[1] == BLOCK:
        return x
    x = x.reshape(-1)
    if x.numel() % BLOCK:
        x = F.pad(x, (0, padded(x.numel()) - x.numel()))
    return x.view(-1, BLOCK)


def encode_blocks(signed: bool, xb: torch.Tensor, index: torch.Tensor, seed):
    """(groups, 32) values -> (groups, 32) uint8 codes and (groups,) bf16 scales, each group's
    scale being its largest finite magnitude rounded up to bf16."""
    xb = xb.to(torch.float32)
    finite = torch.isfinite(xb)
    mag = torch.where(finite, xb.abs(), 0.0)
    a = mag.amax(dim=1, keepdim=True)
    # A block whose largest magnitude is subnormal (< 2^-126: a long-idle row's decaying m) is
    # stored as zeros: 1/a would overflow to inf, turning its zeros into nan (0 * inf) where
    # subnormals are not flushed, torch's default. What is dropped is below 1.2e-38.
    a = scale_up(torch.where(a < _TINY, 0.0, a))
    scale, a = a, a.to(torch.float32)
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
    return stored.to(torch.uint8), scale.view(-1)


def floor_pairs(codes: dict, slots, shape) -> None:
    """Raise, in place, each stored unsigned code (v, max v) of a parameter of (local) ``shape`` to
    code 1 where it is 0 and a signed code (m) it divides is not zero (stored 128): a v rounded to
    zero beside a non-zero m would make the next update m / eps. ``codes`` maps slot names to the
    parameter's stored codes (local tensors); ``slots`` are the algorithm's
    :class:`~adamkit.algorithm.Slot` declarations. A slot in the parameter's own layout pairs
    element by element; one of its own shape with one value per row that follows the rows
    (Adam-mini's v, Adafactor's row factor) pairs with its row's elements, one value for the whole
    tensor with all of them; other slots (a matrix's column factor, fp32 where 8-bit does not
    apply) are left."""
    mine = [s for s in slots if not s.weights and s.name in codes and codes[s.name].dtype == torch.uint8]
    nonzero = None
    for s in mine:
        if s.signed and s.shape is None:
            nz = codes[s.name] != 128
            nonzero = nz if nonzero is None else nonzero | nz
    if nonzero is None:
        return
    rows = nonzero.shape[0] if nonzero.dim() == 2 else 1
    for s in mine:
        v = codes[s.name]
        if s.signed:
            continue
        if s.shape is None:
            if v.shape == nonzero.shape:
                v.masked_fill_((v == 0) & nonzero, 1)
            continue
        k = math.prod(s.shape_for(tuple(shape)))
        if k == 1:  # one value for the whole tensor (Adam-mini's v of a vector); no host sync
            head = v[:1]
            head.masked_fill_((head == 0) & nonzero.any(), 1)
        elif k == rows and s.follows_rows(tuple(shape)):  # one value per row
            per_row = nonzero.reshape(rows, -1).any(dim=1)
            head = v[:rows]  # flat codes: the row values first, then the group's padding
            head.masked_fill_((head == 0) & per_row, 1)


def decode(
    signed: bool, codes: torch.Tensor, scales: torch.Tensor, shape, cdt: torch.dtype, rows: bool = False
) -> torch.Tensor:
    """Codes and block scales -> values of ``shape``. Flat: codes of any shape holding the padded
    length; ``rows``: (R, padded(L)) codes of rows of L = prod(shape[1:]) elements. (Stored
    state tells them apart by its codes' dimensions: flat codes are kept 1-D.)"""
    block = LEGACY_BLOCK if scales.dtype == torch.float32 else BLOCK
    x = decode_blocks(signed, codes.reshape(-1, block), scales.reshape(-1), cdt)
    if rows:  # drop each row's padding
        return x.view(codes.shape)[:, : row_length(shape)].reshape(shape)
    if tuple(x.shape) == tuple(shape):  # the compiled kernel works on (groups, 32) directly
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
    Where the row length is a multiple of 32 the bytes are the same (a view); otherwise, and for
    the legacy blocks of 256, the values are decoded and encoded again in rows (each within the
    format's bound of the saved value)."""
    r, length = shape[0], row_length(shape)
    if length % BLOCK == 0 and scales.dtype == torch.bfloat16:
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
    a = scale_up(torch.where(a < _TINY, 0.0, a).float()).double()
    k, q = (2, _QM) if signed else (4, _QV)
    c = torch.floor(q * (xb.abs() / torch.where(a > 0, a, 1.0)) ** (1.0 / k))
    bound = a * ((c + 1) ** k - c**k) / q**k
    return bound.reshape(-1)[:n] * (1 + 1e-6) + 1e-30  # fp32 arithmetic inside encode/decode
