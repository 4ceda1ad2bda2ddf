"""adamkit under torch.distributed on the CPU (gloo, 2 processes): FSDP2 (``fully_shard``, DTensor
parameters), plain DTensor parameters and DDP.

Each test is one ``torch.multiprocessing.spawn`` that runs several checks (a spawn costs seconds);
a failing check raises in its process and ``spawn`` re-raises it here with the traceback. The model
is a 3-layer MLP whose sizes (7, 3, 1 rows) split unevenly between 2 ranks, the last layer's to
(1, 0) rows: empty local shards included. "Within fp32 rounding" is ``assert_close``'s default
float32 tolerance (rtol 1.3e-6, atol 1e-5).
"""

from __future__ import annotations

import faulthandler
import functools
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
import host_rounding
from adamkit.dist import is_dtensor
from adamkit.kernels import native

pytestmark = [
    pytest.mark.slow,  # processes on the gloo backend
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2
LR = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, world: int) -> None:
    # a rank that dies of a signal says where (its Python stacks on stderr): spawn reports only
    # the signal's name
    faulthandler.enable(all_threads=True)
    host_rounding.install_if_requested()  # as the parent test process (pytest --perturb-rounding)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank)
        # every rank done, and DDP/ZeRO objects (with their gloo work) gone, before the group is:
        # a rank tearing down gloo while the other still talks to it aborts the process
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int = WORLD) -> None:
    mp.spawn(_entry, args=(fn, _free_port(), world), nprocs=world)


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
    return t / dist.get_world_size()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _assert_same_placement(st: torch.Tensor, p: torch.Tensor, what: str) -> None:
    assert is_dtensor(st), f"{what}: a {type(st).__name__}, not a DTensor"
    assert st.device_mesh == p.device_mesh, what
    assert tuple(st.placements) == tuple(p.placements), f"{what}: {st.placements} vs {p.placements}"
    if (
        st.dtype == torch.uint8 or st.shape != p.shape
    ):  # 8-bit rows: (rows, padded row) codes, (rows, blocks) scales
        assert st.shape[0] == p.shape[0] and st.to_local().shape[0] == p.to_local().shape[0], what
    else:
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
    # replicated parameters: 8-bit state in rows, codes replicated like the parameter, the same as
    # on one process (rows of 300 elements: a full and a partial block each)
    full = torch.randn(9, 300, generator=g)
    grads = [torch.randn(9, 300, generator=g) for _ in range(3)]
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
        _assert_same_placement(opt_p.state[p][k], p, f"8-bit replicated DTensor {k}")
        assert torch.equal(_local(opt_p.state[p][k]), opt_q.state[q][k]), f"8-bit replicated DTensor {k}"
    assert opt_q.state[q]["exp_avg"].shape == (9, 320), "rows padded to whole groups"
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
        k: {n: v.full_tensor() if is_dtensor(v) else v for n, v in st.items()}
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
            assert not is_dtensor(o4.state[q][k]), f"{name} {k}: a plain parameter's state"
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


# DDP and ZeroRedundancyOptimizer with each adamkit format, on a model with rows wide enough for
# 8-bit state (300 elements), against torch.optim.AdamW under DDP. Bounds, 6 steps of lr 1e-2:
# fp32 within fp32 rounding; bf16 state: each moment rounded to 2^-8 relative moves each update by
# at most that, 6 x 1e-2 x 2^-8 = 2.3e-4 (bound 1e-3); 8-bit state: codes' relative step <= 2/c,
# a few % on the update, 6 x 1e-2 x 5 % = 3e-3 (bound 6e-3). bf16 parameters (their forward runs in
# bf16, so torch's fp32 run is no reference): ranks agree bit for bit, and the DDP and ZeRO runs
# within 1e-2: they differ by one bf16 ulp in a fifth of the elements with every precision option
# alike (master weights included: it comes from the bf16 forward and backward, not the step), which
# 6 steps grow to 2-5 ulps (measured: at most 3.9e-3).
DDP_FORMATS = {
    "fp32": (torch.float32, {}, None),
    "bf16-state": (torch.float32, dict(state_format="bf16"), 1e-3),
    "8bit": (torch.float32, dict(state_format="8bit", min_8bit_size=0), 6e-3),
    "bf16-kahan": (torch.bfloat16, dict(kahan_sum=True), None),
    "bf16-kahan8-8bit": (torch.bfloat16, dict(kahan_sum="8bit", state_format="8bit", min_8bit_size=0), None),
    "bf16-sr": (torch.bfloat16, dict(stochastic_rounding=True), None),
    "bf16-master": (torch.bfloat16, dict(master_weights=True), None),
}


def _wide(dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 300), nn.Tanh(), nn.Linear(300, 2), nn.Tanh(), nn.Linear(2, 1)).to(
        dtype
    )


def _ddp_format_checks(rank: int) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def flat(m):
        return torch.cat([p.detach().float().reshape(-1) for p in m.parameters()])

    kw = dict(lr=LR, weight_decay=0.1)
    tm = DDP(_wide(torch.float32))
    _train(tm, torch.optim.AdamW(tm.parameters(), **kw), rank, 6)
    ref = flat(tm)
    for name, (dtype, options, bound) in DDP_FORMATS.items():
        runs = {}
        for mode in ("DDP", "ZeRO"):
            m = DDP(_wide(dtype))
            if mode == "DDP":
                opt = adamkit.AdamW(m.parameters(), **kw, **options)
            else:
                opt = ZeroRedundancyOptimizer(
                    m.parameters(), optimizer_class=adamkit.AdamW,
                    parameters_as_bucket_view=dtype == torch.float32, **kw, **options,
                )  # fmt: skip
            _train(m, opt, rank, 6)
            f = runs[mode] = flat(m)
            gathered = [torch.empty_like(f) for _ in range(WORLD)]
            dist.all_gather(gathered, f)
            assert all(torch.equal(gathered[0], x) for x in gathered), f"{mode} {name}: ranks diverged"
            if dtype == torch.float32:
                tol = {} if bound is None else dict(rtol=0, atol=bound)
                torch.testing.assert_close(f, ref, msg=f"{mode} {name} vs torch AdamW", **tol)
        if dtype == torch.bfloat16:
            torch.testing.assert_close(runs["ZeRO"], runs["DDP"], rtol=0, atol=1e-2, msg=name)


def test_ddp_and_zero_every_format():
    _spawn(_ddp_format_checks)


# --------------------------------------------------------------------------------------------------
# every state format and precision option under FSDP2
# --------------------------------------------------------------------------------------------------

FORMATS = {
    "bf16-state": (torch.float32, dict(state_format="bf16")),
    "bf16-kahan": (torch.bfloat16, dict(kahan_sum=True)),
    "bf16-kahan8-8bit": (torch.bfloat16, dict(kahan_sum="8bit", state_format="8bit")),
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

        # full-precision values (an fp32 checkpoint, read whole on every rank): each rank keeps its
        # shard of the value and of its remainder; gathered, equal to one process loading them
        g = torch.Generator().manual_seed(5)
        values = [torch.randn(p.shape, generator=g) for p in m1.parameters()]
        m1_plain = _mlp(dtype)
        o_plain = adamkit.AdamW(m1_plain.parameters(), lr=LR, **kw)
        o_plain.load_full_precision_params(values)
        o1.load_full_precision_params(values)
        for (pname, p), q in zip(m1.named_parameters(), m1_plain.parameters()):
            assert torch.equal(p.detach().full_tensor(), q.detach()), f"{name}: {pname} loaded"
            for k, v in o_plain.state[q].items():
                if k in ("kahan_comp", "kahan_comp8", "master_weight"):
                    assert torch.equal(o1.state[p][k].full_tensor(), v), f"{name}: {pname} {k} loaded"

    # 8-bit state of a DTensor split along another dim than 0 is refused before anything changes
    # (its rows would be cut between ranks); tensors below min_8bit_size keep fp32 state and run
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    full = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    p = nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(1)]))
    p.grad = distribute_tensor(torch.ones(4, 300), mesh, [Shard(1)])
    opt = adamkit.AdamW([p], lr=LR, state_format="8bit", min_8bit_size=0)
    with pytest.raises(
        ValueError, match=r"state_format='8bit' needs DTensor parameters split along dim 0.*'bf16'"
    ):
        opt.step()
    assert not opt.state[p], "no state was created"
    assert torch.equal(p.detach().full_tensor(), full), "no parameter changed"
    m = _fsdp_mlp()
    opt = adamkit.AdamW(m.parameters(), lr=LR, state_format="8bit")  # every tensor < 4096 elements
    _train(m, opt, rank, 1)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in m.parameters())


def test_fsdp2_every_format_trains_and_resumes():
    _spawn(_format_checks)


# --------------------------------------------------------------------------------------------------
# world-size invariance (8-bit rows, global rounding positions) and DCP resharding
# --------------------------------------------------------------------------------------------------


class _Shapes(nn.Module):
    """One parameter of each layout, with FSDP2's uneven dim-0 chunks: 7 rows of 300 (8-bit rows of
    a full and a partial block; 4/3 rows at 2 ranks, 3/3/1 at 3), 2 rows of 130 (a rank without
    rows at 3), a 3-D tensor (rows of 120), and what keeps fp32 state under state_format='8bit': a
    1-D tensor (one row, which the shards cut) and rows of 8 (narrower than a block is worth)."""

    SHAPES = {"w1": (7, 300), "w2": (2, 130), "w3": (5, 3, 40), "b": (300,), "w4": (4, 8)}
    QUANTIZED = ("w1", "w2", "w3")

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in self.SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=g).to(dtype)))


def _shapes_model(dtype, sharded: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    m = _Shapes(dtype)
    return fully_shard(m) if sharded else m


def _feed(model: nn.Module, opt, steps: range) -> None:
    """Steps with gradients that do not depend on the world size: each step's full gradients from a
    fixed seed, cut to each rank's shard locally (FSDP2's reduce-scatter sums in an order that
    depends on the world size, which would change their last bits)."""
    from torch.distributed.tensor import distribute_tensor

    for k in steps:
        g = torch.Generator().manual_seed(100 + k)
        for p in model.parameters():
            full = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
            full[0] = 0.0 if k % 2 else full[0]  # exact zeros in some rows: their codes stay zero
            if is_dtensor(p):
                p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            else:
                p.grad = full
        opt.step()
        opt.zero_grad()


def _full_state(model: nn.Module, opt) -> dict:
    """Every parameter and state tensor of a run, whole (gathered from the shards), by name."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.full_tensor() if is_dtensor(p) else p).detach().clone()
        for k, v in opt.state[p].items():
            out[f"{name}.{k}"] = (v.full_tensor() if is_dtensor(v) else v).detach().clone()
    return out


def _assert_same_state(a: dict, b: dict, what: str, names=None) -> None:
    keys = sorted(k for k in a if names is None or k.split(".")[0] in names)
    assert keys == sorted(k for k in b if names is None or k.split(".")[0] in names), f"{what}: keys"
    for k in keys:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, (
            f"{what}: {k} {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        )
        ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
        same = x.view(ints[x.dtype]) == y.view(ints[y.dtype]) if x.dtype in ints else x == y
        assert bool(same.all()), f"{what}: {k} differs in {int((~same).sum())} of {same.numel()} elements"


# (name, parameter dtype, optimizer, options): every format whose bits could follow the shards:
# 8-bit codes and their dither, stochastic rounding of bf16 parameters and of bf16 state, Kahan
INVARIANT = [
    ("adamw-8bit", torch.float32, "AdamW", dict(state_format="8bit", weight_decay=0.1)),
    ("lion-8bit", torch.float32, "Lion", dict(state_format="8bit", lr=1e-3, weight_decay=0.1)),
    ("bf16-sr-8bit", torch.bfloat16, "AdamW", dict(stochastic_rounding=True, state_format="8bit")),
    ("bf16-kahan-bf16-state", torch.bfloat16, "AdamW", dict(kahan_sum=True, state_format="bf16")),
    ("bf16-kahan8-8bit", torch.bfloat16, "AdamW", dict(kahan_sum="8bit", state_format="8bit")),
    ("fp32-bf16-state", torch.float32, "AdamW", dict(state_format="bf16", amsgrad=True)),
]
# (name, parameter dtype, options) of the DCP round trips
DCP = [
    ("fp32", torch.float32, dict(weight_decay=0.1)),
    ("8bit", torch.float32, dict(state_format="8bit", weight_decay=0.1)),
    ("bf16-sr-bf16-state", torch.bfloat16, dict(stochastic_rounding=True, state_format="bf16")),
]
VARIANTS = ("sharded", "flatten", "full")


def _options(variant: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return {
        "sharded": StateDictOptions(),
        "flatten": StateDictOptions(flatten_optimizer_state_dict=True),
        "full": StateDictOptions(full_state_dict=True),
    }[variant]


def _invariance_run(name, dtype, cls, kw, backend, sharded=True):
    m = _shapes_model(dtype, sharded)
    opt = getattr(adamkit, cls)(m.parameters(), backend=backend, min_8bit_size=0, **{"lr": LR, **kw})
    _feed(m, opt, range(3))
    return m, opt


def _sharding_checks(rank: int, out_dir: str) -> None:
    """At this world size: the invariance runs (saved by rank 0 for the test to compare), then,
    at world size 2, DCP checkpoints of each format (and the uninterrupted continuation); at
    world sizes 1 and 3, those checkpoints loaded and continued."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    world = dist.get_world_size()
    results = {}
    for name, dtype, cls, kw in INVARIANT:
        for backend in ("reference", "fused"):
            m, opt = _invariance_run(name, dtype, cls, kw, backend)
            for pname, p in m.named_parameters():
                st = opt.state[p]
                eight = kw.get("state_format") == "8bit" and pname in _Shapes.QUANTIZED
                assert (st["exp_avg"].dtype == torch.uint8) == eight, f"{name}: {pname} format"
                for k, v in st.items():
                    if k != "step":
                        _assert_same_placement(v, p, f"{name} {backend}: {pname} {k}")
            results[f"{name}/{backend}"] = _full_state(m, opt)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"invariance-ws{world}.pt"))

    for name, dtype, kw in DCP:
        if world == 2:  # save after 3 steps, then continue 2 more (the uninterrupted run)
            m = _shapes_model(dtype)
            opt = adamkit.AdamW(m.parameters(), lr=LR, min_8bit_size=0, **kw)
            _feed(m, opt, range(3))
            for variant in VARIANTS:
                o = _options(variant)
                sd = {
                    "model": get_model_state_dict(m, options=o),
                    "optim": get_optimizer_state_dict(m, opt, options=o),
                }
                dcp.save(sd, checkpoint_id=os.path.join(out_dir, f"{name}-{variant}"))
            saved = _full_state(m, opt)
            _feed(m, opt, range(3, 5))
            final = _full_state(m, opt)  # a collective: every rank gathers
            if rank == 0:
                torch.save({"saved": saved, "final": final}, os.path.join(out_dir, f"{name}.pt"))
            continue
        want = torch.load(os.path.join(out_dir, f"{name}.pt"), weights_only=True)
        for variant in VARIANTS:
            what = f"DCP {name} {variant} saved at world size 2, loaded at {world}"
            m = _shapes_model(dtype)
            opt = adamkit.AdamW(m.parameters(), lr=LR, min_8bit_size=0, **kw)
            o = _options(variant)
            # the templates (torch initializes the state with an lr-0 step of zero gradients)
            sd = {
                "model": get_model_state_dict(m, options=o),
                "optim": get_optimizer_state_dict(m, opt, options=o),
            }
            dcp.load(sd, checkpoint_id=os.path.join(out_dir, f"{name}-{variant}"))
            set_model_state_dict(m, sd["model"], options=o)
            set_optimizer_state_dict(m, opt, sd["optim"], options=o)
            _assert_same_state(_full_state(m, opt), want["saved"], what + ": loaded")
            _feed(m, opt, range(3, 5))
            _assert_same_state(_full_state(m, opt), want["final"], what + ": continued")
            if name == "8bit" and variant == "sharded":
                # a single process's (unsharded) state dict loads into the sharded run, and back
                pm = _shapes_model(dtype, sharded=False)
                popt = adamkit.AdamW(pm.parameters(), lr=LR, min_8bit_size=0, **kw)
                _feed(pm, popt, range(3))
                plain = _full_state(pm, popt)
                m2 = _shapes_model(dtype)
                set_model_state_dict(m2, pm.state_dict(), options=_options("full"))
                o2 = adamkit.AdamW(m2.parameters(), lr=LR, min_8bit_size=0, **kw)
                o2.load_state_dict(_roundtrip(popt.state_dict()))
                # rows: the same codes as the sharded run's; the 1-D tensor's flat 8-bit state
                # (a plain tensor is one row) becomes fp32 (decoded) under sharding
                _assert_same_state(
                    _full_state(m2, o2), want["saved"], what + ": from one process", _Shapes.QUANTIZED
                )
                _assert_same_state(plain, want["saved"], what + ": one process", _Shapes.QUANTIZED)
                assert o2.state[m2.b]["exp_avg"].dtype == torch.float32
                full_sd = o2.state_dict()
                full_sd["state"] = {
                    k: {n: v.full_tensor() if is_dtensor(v) else v for n, v in st.items()}
                    for k, st in full_sd["state"].items()
                }
                back = adamkit.AdamW(pm.parameters(), lr=LR, min_8bit_size=0, **kw)
                back.load_state_dict(_roundtrip(full_sd))
                _assert_same_state(
                    _full_state(pm, back), plain, what + ": back to one process", ("w1", "w2", "w3", "w4")
                )


def test_world_size_invariance_and_dcp_resharding(tmp_path):
    """Every format gives the same parameters and state, bit for bit, at world sizes 1, 2 and 3
    (FSDP2, the same gradients), and as one process without sharding for the >= 2-D parameters;
    DCP checkpoints saved at world size 2 load at 1 and 3 (sharded, flattened, full state dicts)
    and continue exactly as the uninterrupted run (fed the same gradients, fp32 included)."""
    for world in (2, 1, 3):  # 2 first: it writes the checkpoints
        _spawn(functools.partial(_sharding_checks, out_dir=str(tmp_path)), world)
    runs = {w: torch.load(tmp_path / f"invariance-ws{w}.pt", weights_only=True) for w in (1, 2, 3)}
    for key in runs[1]:
        for w in (2, 3):
            _assert_same_state(runs[w][key], runs[1][key], f"{key}: world size {w} vs 1")
    for name, dtype, cls, kw in INVARIANT:  # one process, plain tensors
        m, opt = _invariance_run(name, dtype, cls, kw, "fused", sharded=False)
        names = ("w1", "w2", "w3", "w4") if kw.get("state_format") == "8bit" else None
        _assert_same_state(
            _full_state(m, opt), runs[2][f"{name}/fused"], f"{name}: one process vs world size 2", names
        )
