"""adamkit under torch.distributed on the CPU (gloo, 2 processes): FSDP2 (``fully_shard``, DTensor
parameters), plain DTensor parameters and DDP.

Each test is one ``torch.multiprocessing.spawn`` that runs several checks (a spawn costs seconds);
a failing check raises in its process and ``spawn`` re-raises it here with the traceback. The model
is a 3-layer MLP whose sizes (7, 3, 1 rows) split unevenly between 2 ranks, the last layer's to
(1, 0) rows: empty local shards included. "Within fp32 rounding" is ``assert_close``'s default
float32 tolerance (rtol 1.3e-6, atol 1e-5).
"""

from __future__ import annotations

import gc
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import adamkit
from adamkit.kernels import native

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
LR = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank)
        # every rank done, and DDP/ZeRO objects (with their gloo work) gone, before the group is:
        # a rank tearing down gloo while the other still talks to it aborts the process
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn) -> None:
    mp.spawn(_entry, args=(fn, _free_port()), nprocs=WORLD)


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def _fsdp_mlp(dtype=torch.float32) -> nn.Module:
    """Per-layer ``fully_shard`` and the root; bf16 models are cast before sharding."""
    from torch.distributed.fsdp import fully_shard

    m = _mlp(dtype)
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(m)


def _train(model: nn.Module, opt, rank: int, steps: int) -> torch.Tensor:
    """``steps`` steps on this rank's fixed batch; the mean loss over ranks before each step."""
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(6, 5, generator=g)
    y = torch.sin(3 * x.sum(1))
    losses = []
    for _ in range(steps):
        out = model(x.to(next(model.parameters()).dtype)).squeeze(-1).float()
        loss = (out - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    t = torch.stack(losses)
    dist.all_reduce(t)
    return t / WORLD


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if native.is_dtensor(t) else t


def _assert_same_placement(st: torch.Tensor, p: torch.Tensor, what: str) -> None:
    assert native.is_dtensor(st), f"{what}: a {type(st).__name__}, not a DTensor"
    assert st.device_mesh == p.device_mesh, what
    assert tuple(st.placements) == tuple(p.placements), f"{what}: {st.placements} vs {p.placements}"
    assert st.shape == p.shape and st.to_local().shape == p.to_local().shape, what


def _assert_same_run(m1, o1, m2, o2, exact: bool, what: str) -> None:
    """Parameters and every state tensor of two runs (local shards), bit for bit or within fp32 rounding."""
    tol = dict(rtol=0, atol=0) if exact else {}  # {}: assert_close's float32 defaults

    def check(a, b, msg):
        torch.testing.assert_close(a, b, msg=msg, **tol)

    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        check(_local(p.detach()), _local(q.detach()), f"{what}: {name}")
        s1, s2 = o1.state[p], o2.state[q]
        assert sorted(s1) == sorted(s2), f"{what}: {name} state keys {sorted(s1)} vs {sorted(s2)}"
        for k in s1:
            check(_local(s1[k]), _local(s2[k]), f"{what}: {name} {k}")


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------------------------------
# fp32: adamkit equals torch.optim under FSDP2, on plain DTensors and under DDP
# --------------------------------------------------------------------------------------------------


def _fp32_checks(rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    steps = 4
    kw = dict(lr=LR, weight_decay=0.1)
    # 1. FSDP2: adamkit.AdamW on each backend equals torch.optim.AdamW within fp32 rounding
    tm = _fsdp_mlp()
    topt = torch.optim.AdamW(tm.parameters(), **kw)
    _train(tm, topt, rank, steps)
    for backend, use_native in (("reference", True), ("foreach", True), ("fused", True), ("fused", False)):
        what = f"AdamW {backend}{'' if use_native else ' (torch fused kernel)'}"
        native.USE_NATIVE = use_native
        try:
            m = _fsdp_mlp()
            opt = adamkit.AdamW(m.parameters(), backend=backend, **kw)
            _train(m, opt, rank, steps)
        finally:
            native.USE_NATIVE = True
        _assert_same_run(m, opt, tm, topt, exact=False, what=what)
        for name, p in m.named_parameters():
            assert opt.state[p]["step"].item() == steps, f"{what}: {name} step"
            for k in ("exp_avg", "exp_avg_sq"):
                _assert_same_placement(opt.state[p][k], p, f"{what}: {name} {k}")
        if backend == "fused" and use_native and native.load() is not None:
            plan = opt._plans[0]
            assert not plan.loose and plan.tables, f"{what}: the native kernel serves every DTensor parameter"

    # 2. Lion runs on every backend, each equal to the reference backend, and trains
    runs = {}
    for backend in ("reference", "foreach", "fused"):
        m = _fsdp_mlp()
        opt = adamkit.Lion(m.parameters(), lr=1e-3, weight_decay=0.1, backend=backend)
        runs[backend] = (m, opt, _train(m, opt, rank, steps))
        for name, p in m.named_parameters():
            _assert_same_placement(opt.state[p]["exp_avg"], p, f"Lion {backend}: {name} exp_avg")
    for backend in ("foreach", "fused"):
        _assert_same_run(*runs[backend][:2], *runs["reference"][:2], exact=False, what=f"Lion {backend}")
    losses = runs["reference"][2]
    assert losses[-1] < losses[0], f"Lion does not train: losses {losses.tolist()}"

    # 3. plain DTensor parameters (uneven Shard(0) and Replicate): the same values as the full
    # tensor stepped on one process, bit for bit (fp32 state: the math is elementwise)
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(3)
    full = torch.randn(9, 4, generator=g)
    grads = [torch.randn(9, 4, generator=g) for _ in range(3)]
    for placement in (Shard(0), Replicate()):
        for backend in ("reference", "foreach", "fused"):
            what = f"DTensor {placement} {backend}"
            p = nn.Parameter(distribute_tensor(full.clone(), mesh, [placement]))
            q = nn.Parameter(full.clone())
            opt_p = adamkit.AdamW([p], backend=backend, **kw)
            opt_q = adamkit.AdamW([q], backend=backend, **kw)
            for gr in grads:
                p.grad = distribute_tensor(gr.clone(), mesh, [placement])
                q.grad = gr.clone()
                opt_p.step()
                opt_q.step()
            assert torch.equal(p.detach().full_tensor(), q.detach()), what
            for k in ("exp_avg", "exp_avg_sq"):
                _assert_same_placement(opt_p.state[p][k], p, f"{what} {k}")
                assert torch.equal(opt_p.state[p][k].full_tensor(), opt_q.state[q][k]), f"{what} {k}"
    # replicated parameters are not sharded: 8-bit state runs there (blocks of the whole tensor,
    # plain per-rank codes), the same as on one process
    p = nn.Parameter(distribute_tensor(full.clone(), mesh, [Replicate()]))
    q = nn.Parameter(full.clone())
    opt_p = adamkit.AdamW([p], state_format="8bit", min_8bit_size=0, **kw)
    opt_q = adamkit.AdamW([q], state_format="8bit", min_8bit_size=0, **kw)
    for gr in grads:
        p.grad = distribute_tensor(gr.clone(), mesh, [Replicate()])
        q.grad = gr.clone()
        opt_p.step()
        opt_q.step()
    assert torch.equal(p.detach().to_local(), q.detach()), "8-bit replicated DTensor"
    for k in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
        assert torch.equal(opt_p.state[p][k], opt_q.state[q][k]), f"8-bit replicated DTensor {k}"
    # ... and its state loads into fp32 state of the parameter's placement
    fp32_p, fp32_q = adamkit.AdamW([p], **kw), adamkit.AdamW([q], **kw)
    fp32_p.load_state_dict(opt_p.state_dict())
    fp32_q.load_state_dict(opt_q.state_dict())
    for k in ("exp_avg", "exp_avg_sq"):
        _assert_same_placement(fp32_p.state[p][k], p, f"8-bit replicated DTensor loaded as fp32 {k}")
        assert torch.equal(fp32_p.state[p][k].to_local(), fp32_q.state[q][k]), f"8-bit loaded as fp32 {k}"

    # 4. DCP's optimizer state dict round trip (fp32 AdamW under FSDP2): the continued run equals
    # the uninterrupted one bit for bit
    m1 = _fsdp_mlp()
    o1 = adamkit.AdamW(m1.parameters(), **kw)
    _train(m1, o1, rank, 2)
    sd = get_optimizer_state_dict(m1, o1)
    m2 = _fsdp_mlp()
    m2.load_state_dict(m1.state_dict())
    o2 = adamkit.AdamW(m2.parameters(), **kw)
    set_optimizer_state_dict(m2, o2, sd)  # its lr-0 initialization step must change nothing
    _assert_same_run(m2, o2, m1, o1, exact=True, what="DCP loaded")
    _train(m1, o1, rank, 2)
    _train(m2, o2, rank, 2)
    _assert_same_run(m2, o2, m1, o1, exact=True, what="DCP resumed")

    # a state dict without sharding (full tensors, as one process saves) loads into the sharded run
    full_sd = o1.state_dict()
    full_sd["state"] = {
        k: {n: v.full_tensor() if native.is_dtensor(v) else v for n, v in st.items()}
        for k, st in full_sd["state"].items()
    }
    o3 = adamkit.AdamW(m1.parameters(), **kw)
    o3.load_state_dict(_roundtrip(full_sd))
    _assert_same_run(m1, o3, m1, o1, exact=True, what="full state dict loaded")
    # and the sharded run's state dict loads into one process's unsharded model (gathered)
    m4 = _mlp()
    m4.load_state_dict({k: v.full_tensor() for k, v in m1.state_dict().items()})
    o4 = adamkit.AdamW(m4.parameters(), **kw)
    o4.load_state_dict(o1.state_dict())
    for (name, p), q in zip(m1.named_parameters(), m4.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert not native.is_dtensor(o4.state[q][k]), f"{name} {k}: a plain parameter's state"
            assert torch.equal(o4.state[q][k], o1.state[p][k].full_tensor()), f"gathered {name} {k}"


def test_fsdp2_fp32_matches_torch_dtensor_and_dcp():
    _spawn(_fp32_checks)


def _ddp_checks(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = dict(lr=LR, weight_decay=0.1)
    tm = DDP(_mlp())
    topt = torch.optim.AdamW(tm.parameters(), **kw)
    _train(tm, topt, rank, 4)
    m = DDP(_mlp())
    opt = adamkit.AdamW(m.parameters(), fused=True, **kw)
    _train(m, opt, rank, 4)
    _assert_same_run(m, opt, tm, topt, exact=False, what="DDP AdamW fused")

    # ZeroRedundancyOptimizer with parameters as views of its buckets: wave 1's flat layout took
    # the parameters out of those views and the ranks silently diverged (6e-2 from torch)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    losses = {}
    for name, cls in (("torch", torch.optim.AdamW), ("adamkit", adamkit.AdamW)):
        zm = DDP(_mlp())
        zopt = ZeroRedundancyOptimizer(
            zm.parameters(), optimizer_class=cls, parameters_as_bucket_view=True, **kw
        )
        losses[name] = _train(zm, zopt, rank, 4)
        flat = torch.cat([p.detach().reshape(-1) for p in zm.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], x) for x in gathered), f"ZeRO {name}: ranks diverged"
        losses[name + "-params"] = flat
    torch.testing.assert_close(losses["adamkit-params"], losses["torch-params"], rtol=1e-5, atol=1e-6)


def test_ddp_fused_adamw_matches_torch():
    _spawn(_ddp_checks)


# --------------------------------------------------------------------------------------------------
# every state format and precision option under FSDP2
# --------------------------------------------------------------------------------------------------

FORMATS = {
    "bf16-state": (torch.float32, dict(state_format="bf16")),
    "bf16-kahan": (torch.bfloat16, dict(kahan_sum=True)),
    "bf16-sr": (torch.bfloat16, dict(stochastic_rounding=True)),
    "bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "bf16-master-fp32-state": (torch.bfloat16, dict(master_weights=True, state_format="fp32")),
}


def _format_checks(rank: int) -> None:
    steps = 6
    for name, (dtype, kw) in FORMATS.items():
        runs = {}
        for backend in ("reference", "fused"):
            what = f"{name} {backend}"
            m = _fsdp_mlp(dtype)
            opt = adamkit.AdamW(m.parameters(), lr=LR, backend=backend, **kw)
            losses = _train(m, opt, rank, steps)
            assert losses.isfinite().all() and losses[-1] < 0.9 * losses[0], f"{what}: {losses.tolist()}"
            for pname, p in m.named_parameters():
                st = opt.state[p]
                assert st["step"].item() == steps, f"{what}: {pname} step {st['step']}"
                for k, v in st.items():
                    if k != "step":
                        _assert_same_placement(v, p, f"{what}: {pname} {k}")
            runs[backend] = (m, opt)
        # the native kernel on local shards draws the same rounding bits as the reference backend
        _assert_same_run(*runs["fused"], *runs["reference"], exact=True, what=f"{name} fused vs reference")

        # state dict: torch.save / torch.load(weights_only=True), resumed identically
        m1, o1 = runs["fused"]
        msd, osd = _roundtrip(m1.state_dict()), _roundtrip(o1.state_dict())
        m2 = _fsdp_mlp(dtype)
        m2.load_state_dict(msd)
        o2 = adamkit.AdamW(m2.parameters(), lr=LR, **kw)
        o2.load_state_dict(osd)
        _train(m1, o1, rank, 2)
        _train(m2, o2, rank, 2)
        _assert_same_run(m2, o2, m1, o1, exact=True, what=f"{name} resumed")

    # 8-bit state of sharded parameters is refused before anything changes (its blocks would
    # follow the shards); tensors below min_8bit_size keep fp32 state and run
    m = _fsdp_mlp()
    before = [p.detach().to_local().clone() for p in m.parameters()]
    opt = adamkit.AdamW(m.parameters(), lr=LR, state_format="8bit", min_8bit_size=0)
    with pytest.raises(ValueError, match=r"state_format='8bit' does not support sharded DTensor.*'bf16'"):
        _train(m, opt, rank, 1)
    assert not any(opt.state[p] for p in m.parameters()), "no state was created"
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach().to_local(), b), "no parameter changed"
    m = _fsdp_mlp()
    opt = adamkit.AdamW(m.parameters(), lr=LR, state_format="8bit")  # every tensor < 4096 elements
    _train(m, opt, rank, 1)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in m.parameters())


def test_fsdp2_every_format_trains_and_resumes():
    _spawn(_format_checks)
