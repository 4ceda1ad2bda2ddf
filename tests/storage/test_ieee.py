"""adamkit.ieee: the reference backend's correctly rounded fp32 operations, exact on any host.

The oracle is independent of torch's vector math: Python's ``math.sqrt`` and true division on
doubles (IEEE, correctly rounded; rounding their result to fp32 is innocuous for one fp32
operation, 53 >= 2 * 24 + 2 bits) and exact rational arithmetic for the fused multiply-add. Under
``pytest --perturb-rounding`` torch's own fp32 sqrt and division are 1 ulp off in a fifth of the
elements: these must hold all the same."""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import host_rounding
from adamkit.ieee import div_rn, fma_rn, lerp_rn, sqrt_rn
from adamkit.kernels import native


def f32(x: float) -> float:
    return float(np.float32(x))


def wide_values(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g) * torch.exp2(torch.randint(-140, 120, (n,), generator=g).float())
    return torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), 1e-45, 3.4e38, 1.0, 4.0])])


def bits(x: torch.Tensor) -> list[int]:
    return x.view(torch.int32).tolist()


def test_sqrt_rn_is_correctly_rounded():
    x = wide_values(20000, 0)
    want = torch.tensor([f32(math.sqrt(v)) for v in x.tolist()])
    assert bits(sqrt_rn(x)) == bits(want)
    assert sqrt_rn(torch.tensor([-1.0, float("nan")])).isnan().all()


def test_div_rn_is_correctly_rounded():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20000, generator=g), torch.randn(20000, generator=g)
    want = torch.tensor([f32(x / y) for x, y in zip(a.tolist(), b.tolist())])
    assert bits(div_rn(a, b)) == bits(want)
    assert bits(div_rn(a, 0.3)) == bits(torch.tensor([f32(x / f32(0.3)) for x in a.tolist()]))
    assert bits(div_rn(1.0, b)) == bits(torch.tensor([f32(1.0 / y) for y in b.tolist()]))


def exact_round(q: Fraction) -> float:
    """q rounded to the nearest fp32 value, ties to even (q in fp32's normal range)."""
    f = np.float32(float(q))  # within an ulp
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return float(min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.int32)) & 1)))


def test_fma_rn_rounds_once():
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(3000, generator=g) for _ in range(3))
    # the case a second rounding gets wrong: a * b + c within 2^-70 of a midpoint between floats
    a = torch.cat([a, torch.tensor([1 - 2**-23, -(1 - 2**-23)])])
    b = torch.cat([b, torch.tensor([2**-24 * (1 + 2**-23)] * 2)])
    c = torch.cat([c, torch.tensor([1 + 2**-23, -(1 + 2**-23)])])
    want = [
        exact_round(Fraction(x) * Fraction(y) + Fraction(z))
        for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())
    ]
    assert bits(fma_rn(a, b, c)) == bits(torch.tensor(want))
    assert fma_rn(a[-2:], b[-2:], c[-2:]).tolist() == [1 + 2**-23, -(1 + 2**-23)]  # not 1 + 2^-22
    naive = (a[-2:].double() * b[-2:].double() + c[-2:].double()).float()
    assert naive.tolist() != [1 + 2**-23, -(1 + 2**-23)]  # the double rounding this avoids


@pytest.mark.parametrize("w", [0.1, 0.9, 0.5])
def test_lerp_rn_is_torchs_formula_rounded_once(w):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3000, generator=g), torch.randn(3000, generator=g)
    w32 = Fraction(f32(w))
    want = []
    for x, y in zip(a.tolist(), b.tolist()):
        d = Fraction(f32(y - x))  # b - a, rounded (torch's too)
        want.append(
            exact_round(w32 * d + Fraction(x)) if w32 < 0.5 else exact_round((w32 - 1) * d + Fraction(y))
        )
    assert bits(lerp_rn(a, b, w)) == bits(torch.tensor(want))
    assert bits(lerp_rn(a, b, torch.tensor(w))) == bits(torch.tensor(want))  # a 0-d tensor weight


def test_the_host_perturbation_is_what_it_claims():
    """Under --perturb-rounding torch's fp32 sqrt and division are moved one ulp from this host's
    own result on about a fifth of the elements (and only then): the suite's second run really
    runs on such a host. Judged against this host's unwrapped results, whatever they are."""
    x = torch.rand(100000) + 0.5
    if not host_rounding.installed():
        assert not hasattr(torch.sqrt, "__wrapped__") and not hasattr(torch.Tensor.__truediv__, "__wrapped__")
        return
    for mine, host in (
        (torch.sqrt(x), torch.sqrt.__wrapped__(x)),
        (x / 3.0, torch.Tensor.__truediv__.__wrapped__(x, 3.0)),
    ):
        moved = mine != host
        assert 0.15 < moved.float().mean().item() < 0.25
        ulps = (mine.view(torch.int32) - host.view(torch.int32)).abs()
        assert int(ulps.max()) == 1


def test_a_level_this_cpu_cannot_run_is_refused(monkeypatch):
    """ADAMKIT_NATIVE_MARCH naming an x86-64 level the CPU lacks would build a library that stops
    the process at its first step (illegal instruction): refused with the reason instead."""
    monkeypatch.setenv("ADAMKIT_NATIVE_MARCH", "x86-64-v4")
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(native, "_load_prebuilt", lambda: None)
    monkeypatch.setattr(native, "_failure", None)
    assert native.load.__wrapped__() is None
    assert "x86-64-v4" in native.failure() and "avx512f" in native.failure()


def test_the_native_kernel_under_test_is_the_one_asked_for():
    """The test command runs the parity tests again on the x86-64-v3 build (ADAMKIT_NATIVE_MARCH):
    that run must really load it."""
    assert native.load() is not None
    march = os.environ.get("ADAMKIT_NATIVE_MARCH")
    assert native.loaded_from == ("built here" + (f" (-march={march})" if march else ""))


def test_the_foreach_backends_native_ops_equal_the_fp64_path(monkeypatch):
    """The foreach backend rounds these operations with the native library's IEEE instructions
    (one per element), the reference with fp64 arithmetic in torch: the same bits, special values
    included."""
    from adamkit.kernels.foreach import TensorList

    g = torch.Generator().manual_seed(5)
    a = [wide_values(3000, 6)[:3007], torch.randn(70, generator=g)]
    b = [torch.randn(3007, generator=g), torch.randn(70, generator=g).abs() + 0.1]
    c = [torch.randn(3007, generator=g), torch.randn(70, generator=g)]
    a[1][:4] = torch.tensor([float("nan"), float("-inf"), -0.0, 1e-40])
    A, B, C = TensorList(a), TensorList(b), TensorList(c)
    cases = {
        "sqrt": (lambda: sqrt_rn(A), [sqrt_rn(x) for x in a]),
        "div": (lambda: div_rn(A, B), [div_rn(x, y) for x, y in zip(a, b)]),
        "div scalar": (lambda: div_rn(A, 0.37), [div_rn(x, 0.37) for x in a]),
        "scalar div": (lambda: div_rn(1.0, B), [div_rn(1.0, y) for y in b]),
        "fma": (lambda: fma_rn(A, B, C), [fma_rn(x, y, z) for x, y, z in zip(a, b, c)]),
        "fma scalar": (lambda: fma_rn(A, 0.05, C), [fma_rn(x, 0.05, z) for x, z in zip(a, c)]),
        "lerp": (lambda: lerp_rn(C, B, 0.1), [lerp_rn(z, y, 0.1) for z, y in zip(c, b)]),
    }
    calls = []
    real = native.ieee
    monkeypatch.setattr(native, "ieee", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    for name, (fast, want) in cases.items():
        got = fast().ts
        for x, y in zip(got, want):
            same = (x.view(torch.int32) == y.view(torch.int32)) | (x.isnan() & y.isnan())
            assert bool(same.all()), name
    assert set(calls) == set(native.IEEE_OPS)  # every op went through the native library


def test_the_native_ops_broadcast_operands_of_other_shapes():
    """A per-row statistic against its matrix (Adafactor's and CAME's factors, Adam-mini's v):
    the native loop reads every operand at the result's length, so a smaller operand is broadcast
    first, as torch broadcasts it (it was read past its end: other memory's values)."""
    if native.load() is None:
        pytest.skip(f"no native kernel here: {native.failure()}")
    g = torch.Generator().manual_seed(6)
    m = torch.randn(64, 48, generator=g)
    row = torch.randn(64, 1, generator=g).abs() + 0.5
    col = torch.randn(1, 48, generator=g)
    for op, args, want in (
        ("div", (m, row), div_rn(m, row.expand_as(m).contiguous())),
        ("div", (row, m), div_rn(row.expand_as(m).contiguous(), m)),
        ("fma", (m, row, col), fma_rn(m, row.expand_as(m).contiguous(), col.expand_as(m).contiguous())),
    ):
        got = native.ieee(op, *args)
        assert got.shape == want.shape and torch.equal(got, want), op
