"""The variants under FSDP2 (gloo, 2 processes, one spawn for every check; helpers of
test_distributed): Sophia-G, elementwise, steps each rank's shard exactly as one process steps the
whole tensor; LAMB and Muon reduce over the whole tensor through torch.distributed and equal one
process; the variants with factored or per-row state refuse sharded parameters clearly, before
anything changes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import adamkit
from test_distributed import _fsdp_mlp, _local, _mlp, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _batch(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(6, 5, generator=g)
    return x, torch.sin(3 * x.sum(1))


def _backward(model, rank: int) -> None:
    x, y = _batch(rank)
    (model(x).squeeze(-1) - y).pow(2).mean().backward()


def _checks(rank: int) -> None:
    # 1. SophiaG on FSDP2 (each backend): every rank's shard equals the whole tensor stepped on one
    # process from the same (all-gathered) gradients, bit for bit; update_hessian() alike
    for backend in ("reference", "foreach"):
        m, plain = _fsdp_mlp(), _mlp()
        kw = dict(lr=1e-2, rho=0.05, weight_decay=0.1, backend=backend)
        opt, popt = adamkit.SophiaG(m.parameters(), **kw), adamkit.SophiaG(plain.parameters(), **kw)
        for t in range(4):
            _backward(m, rank)
            for p, q in zip(m.parameters(), plain.parameters()):
                q.grad = p.grad.full_tensor()
            opt.step(bs=12)
            popt.step(bs=12)
            opt.zero_grad()
            popt.zero_grad()
            if t % 2 == 0:
                _backward(m, rank)  # stands for the sampled-label backward
                for p, q in zip(m.parameters(), plain.parameters()):
                    q.grad = p.grad.full_tensor()
                opt.update_hessian()
                popt.update_hessian()
                opt.zero_grad()
                popt.zero_grad()
        for (name, p), q in zip(m.named_parameters(), plain.parameters()):
            what = f"SophiaG {backend}: {name}"
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=0, msg=what)
            for k in ("exp_avg", "hessian"):
                st = opt.state[p][k]
                assert tuple(st.placements) == tuple(p.placements), what
                torch.testing.assert_close(st.full_tensor(), popt.state[q][k], rtol=0, atol=0, msg=what)

    # 2. LAMB and Muon reduce over the whole tensor (norms; Newton-Schulz on the whole matrix):
    # on FSDP2 each rank's shard equals one process stepping the whole tensor from the same
    # gradients; float64, so LAMB's all-reduced norms (another summation order) are within 1e-12;
    # Muon (its AdamW fallback on the biases included) gathers each matrix's update: bit for bit
    for cls, kw, tol in (
        (adamkit.Lamb, dict(lr=1e-2, weight_decay=0.1), 1e-12),
        (adamkit.Muon, dict(lr=2e-2, adamw_lr=1e-2), 0.0),
    ):
        for backend in ("reference", "fused"):
            m, plain = _fsdp_mlp(torch.float64), _mlp(torch.float64)
            opt, popt = (
                cls(m.parameters(), backend=backend, **kw),
                cls(plain.parameters(), backend=backend, **kw),
            )
            for _ in range(4):
                x, y = _batch(rank)
                (m(x.double()).squeeze(-1) - y.double()).pow(2).mean().backward()
                for p, q in zip(m.parameters(), plain.parameters()):
                    q.grad = p.grad.full_tensor()
                opt.step()
                popt.step()
                opt.zero_grad()
                popt.zero_grad()
            for (name, p), q in zip(m.named_parameters(), plain.parameters()):
                what = f"{cls.__name__} {backend}: {name}"
                torch.testing.assert_close(p.detach().full_tensor(), q.detach(), rtol=tol, atol=tol, msg=what)
                for k, st in opt.state[p].items():
                    if k != "step":
                        assert tuple(st.placements) == tuple(p.placements), what
                        torch.testing.assert_close(
                            st.full_tensor(), popt.state[q][k], rtol=tol, atol=tol, msg=what
                        )
            if cls is adamkit.Muon:  # the matrices took Muon's path, the biases AdamW's
                assert [("momentum_buffer" in opt.state[p]) for p in m.parameters()] == [
                    p.dim() == 2 for p in m.parameters()
                ]

    # 3. the variants with state of other shapes than the parameter (factored or per-row
    # statistics) refuse sharded parameters at the first step, parameters and state untouched
    for cls in (adamkit.AdamMini, adamkit.Adafactor, adamkit.CAME):
        m = _fsdp_mlp()
        opt = cls(m.parameters(), lr=1e-2)
        before = [_local(p.detach()).clone() for p in m.parameters()]
        _backward(m, rank)
        try:
            opt.step()
        except ValueError as err:
            assert "sharded DTensor" in str(err) and "world size" in str(err), (cls.__name__, str(err))
        else:
            raise AssertionError(f"{cls.__name__} stepped sharded parameters")
        assert all(torch.equal(_local(p.detach()), b) for p, b in zip(m.parameters(), before)), cls.__name__
        assert not any(opt.state.values()), cls.__name__


def test_variants_under_fsdp2():
    _spawn(_checks)
