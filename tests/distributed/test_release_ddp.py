"""Gradient release under DDP (adamkit.release_comm_hook) and FSDP2, 2 gloo processes on the CPU.
"Within fp32 rounding" is assert_close's float32 default (rtol 1.3e-6, atol 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import WORLD, _assert_same_run, _fsdp_mlp, _mlp, _spawn, _train
from torch import nn

import adamkit

pytestmark = [
    pytest.mark.slow,  # processes on the gloo backend
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]
KW = dict(lr=1e-2, weight_decay=0.1)


def _gathered_equal(m: nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    out = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], x) for x in out)


def _checks(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # DDP: tiny buckets (one per layer or so), so several are stepped from their own all-reduce
    for backend in ("auto", "reference"):
        ref = DDP(_mlp(), bucket_cap_mb=1e-4)
        ropt = adamkit.AdamW(ref.parameters(), backend=backend, **KW)
        _train(ref, ropt, rank, 3)
        m = DDP(_mlp(), bucket_cap_mb=1e-4)
        opt = adamkit.AdamW(m.parameters(), backend=backend, gradient_release=True, **KW)
        m.register_comm_hook(None, adamkit.release_comm_hook(opt))
        _train(m, opt, rank, 3)  # _train calls step() and zero_grad() after each backward
        assert all(p.grad is None for p in m.parameters()), "step() frees the gradients DDP wrote"
        _assert_same_run(m, opt, ref, ropt, exact=False, what=f"DDP release {backend}")
        assert _gathered_equal(m), "ranks diverged"

    # without the hook: a clear error, nothing stepped
    m = DDP(_mlp())
    opt = adamkit.AdamW(m.parameters(), gradient_release=True, **KW)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="release_comm_hook"):
        m(torch.randn(4, 5)).sum().backward()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    with pytest.raises(ValueError, match="gradient_release=True"):
        adamkit.release_comm_hook(adamkit.AdamW(_mlp().parameters()))

    # FSDP2: the reduce-scattered sharded gradients are stepped at step() (they are set, not
    # accumulated, so no hook fires); equal to FSDP2 + the ordinary step
    ref = _fsdp_mlp()
    ropt = adamkit.AdamW(ref.parameters(), **KW)
    _train(ref, ropt, rank, 3)
    m = _fsdp_mlp()
    opt = adamkit.AdamW(m.parameters(), gradient_release=True, **KW)
    _train(m, opt, rank, 3)
    _assert_same_run(m, opt, ref, ropt, exact=True, what="FSDP2 release")


def test_release_under_ddp_and_fsdp2():
    _spawn(_checks)
