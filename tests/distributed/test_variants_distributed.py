"""The variants under FSDP2 (gloo, 2 processes, one spawn for every check; helpers of
test_distributed): Sophia-G, elementwise, steps each rank's shard exactly as one process steps the
whole tensor; LAMB, Muon, Adafactor, CAME and Adam-mini reduce over the whole tensor through
torch.distributed and equal one process (their factored and per-row statistics split with the rows
or kept whole on every rank); what cannot be placed is refused clearly, before anything changes."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import _fsdp_mlp, _mlp, _roundtrip, _spawn

import adamkit

# float64, 4 steps whose column means (and 1-D vectors' means) are all-reduced, summed in another
# order than one process: each reduction differs by a few ulps (measured at most 5.6e-17 on
# parameters of magnitude < 1); 1e-14 leaves 100x for the 4 steps' propagation
TOL64 = 1e-14

pytestmark = [
    pytest.mark.slow,  # processes on the gloo backend
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def _fsdp_wide() -> torch.nn.Module:
    """An MLP whose hidden matrix has rows of 300 (8-bit rows of a full and a partial block)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(5, 300),
        torch.nn.Tanh(),
        torch.nn.Linear(300, 4),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 1),
    )
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(m)


def _batch(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(6, 5, generator=g)
    return x, torch.sin(3 * x.sum(1))


def _backward(model, rank: int, dtype=torch.float32) -> None:
    x, y = _batch(rank)
    (model(x.to(dtype)).squeeze(-1) - y.to(dtype)).pow(2).mean().backward()


def _lockstep(m, plain, opt, popt, rank: int, dtype, steps: int = 4) -> list[float]:
    """``steps`` steps of the sharded run and of one process fed its all-gathered gradients; the
    sharded run's losses."""
    losses = []
    for _ in range(steps):
        x, y = _batch(rank)
        loss = (m(x.to(dtype)).squeeze(-1) - y.to(dtype)).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        for p, q in zip(m.parameters(), plain.parameters()):
            q.grad = p.grad.full_tensor()
        opt.step()
        popt.step()
        opt.zero_grad()
        popt.zero_grad()
    return losses


def _assert_one_process(m, plain, opt, popt, what: str, tol: float, exact_state: bool = False) -> None:
    """Each parameter and state tensor of the sharded run (gathered) against one process: within
    ``tol``, the state bit for bit with ``exact_state``."""
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        torch.testing.assert_close(
            p.detach().full_tensor(), q.detach(), rtol=0, atol=tol, msg=f"{what}: {name}"
        )
        for k, st in opt.state[p].items():
            if k == "step":
                continue
            want = popt.state[q][k]
            assert st.to_local().dtype == want.dtype, (what, name, k)
            t = 0.0 if exact_state else tol
            torch.testing.assert_close(st.full_tensor(), want, rtol=0, atol=t, msg=f"{what}: {name} {k}")


def _checks(rank: int, out_dir: str) -> None:
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
    # gradients, bit for bit: LAMB gathers the rows' sums of squares and adds them in row order,
    # Muon (its AdamW fallback on the biases included) gathers each matrix's update
    # Lion, ADOPT and AdEMAMix are elementwise: each shard steps as the whole tensor does, bit for
    # bit (fp64 under backend="fused": the compiled kernel, whose shards of one row or one element,
    # and of none, once exceeded dynamo's recompile limit);
    # StableAdamW's RMS is a mean over the whole tensor (DTensor's all-reduce: another order of
    # summation than one process's), within TOL64; the cautious mask counts over the whole tensor
    for cls, kw, tol in (
        (adamkit.Lamb, dict(lr=1e-2, weight_decay=0.1), 0.0),
        (adamkit.Muon, dict(lr=2e-2, adamw_lr=1e-2), 0.0),
        (adamkit.Lion, dict(lr=1e-3, weight_decay=0.1), 0.0),
        (adamkit.ADOPT, dict(lr=1e-2, weight_decay=0.1), 0.0),
        (adamkit.AdEMAMix, dict(lr=1e-2, weight_decay=0.1, t_alpha_beta3=3), 0.0),
        (adamkit.StableAdamW, dict(lr=1e-2, weight_decay=0.1), TOL64),
        # the cautious mask's count is over the whole tensor (an integer sum: exact on any split)
        (adamkit.AdamW, dict(lr=1e-2, weight_decay=0.1, cautious=True), 0.0),
        (adamkit.Lion, dict(lr=1e-3, weight_decay=0.1, cautious=True), 0.0),
        # Schedule-Free: elementwise; its eval()/train() switch runs on each rank's shards
        (adamkit.ScheduleFreeAdamW, dict(lr=1e-2, weight_decay=0.1, warmup_steps=2), 0.0),
    ):
        for backend in ("reference", "fused"):
            m, plain = _fsdp_mlp(torch.float64), _mlp(torch.float64)
            opt = cls(m.parameters(), backend=backend, **kw)
            popt = cls(plain.parameters(), backend=backend, **kw)
            _lockstep(m, plain, opt, popt, rank, torch.float64)
            _assert_one_process(m, plain, opt, popt, f"{cls.__name__} {backend}", tol)
            if cls is adamkit.ScheduleFreeAdamW:
                opt.eval()
                popt.eval()
                _assert_one_process(m, plain, opt, popt, f"{cls.__name__} {backend} eval mode", tol)
                opt.train()
                popt.train()
                _lockstep(m, plain, opt, popt, rank, torch.float64, steps=2)
                _assert_one_process(m, plain, opt, popt, f"{cls.__name__} {backend} trained again", tol)
            for p in m.parameters():
                assert all(
                    tuple(v.placements) == tuple(p.placements) for k, v in opt.state[p].items() if k != "step"
                )
            if cls is adamkit.Muon:  # the matrices took Muon's path, the biases AdamW's
                assert [("momentum_buffer" in opt.state[p]) for p in m.parameters()] == [
                    p.dim() == 2 for p in m.parameters()
                ]

    # 3. Adafactor (with and without beta1), CAME and Adam-mini keep statistics of other shapes:
    # those of the rows are split with the parameter's rows, the rest kept whole on every rank, and
    # the update's means reach across ranks through torch.distributed: within TOL64 of one process
    # in float64 (fp32 state), bit for bit in bf16 state
    cases = (
        (adamkit.Adafactor, dict(lr=1e-2)),
        (adamkit.Adafactor, dict(lr=1e-2, beta1=0.9)),
        (adamkit.CAME, dict(lr=1e-3)),
        (adamkit.AdamMini, dict(lr=1e-2, weight_decay=0.1)),
    )
    for cls, kw in cases:
        dtype, tol = torch.float64, TOL64
        for backend, state in (("reference", "fp32"), ("fused", "fp32"), ("fused", "bf16")):
            what = f"{cls.__name__} {kw} {backend} {state}"
            m, plain = _fsdp_mlp(dtype), _mlp(dtype)
            opt = cls(m.parameters(), backend=backend, state_format=state, **kw)
            popt = cls(plain.parameters(), backend=backend, state_format=state, **kw)
            losses = _lockstep(m, plain, opt, popt, rank, dtype)
            assert losses[-1] < losses[0], (what, losses)
            # bf16 state: its rounding draws from global positions (statistics of the rows
            # numbered from the shard's first row, whole-tensor ones from 0 on every rank), so it
            # equals one process bit for bit (values a few ulps apart round alike here). Before,
            # a whole-tensor slot of a one-element shard took that shard's numbering: Adam-mini's
            # one v of a bias differed between ranks, its parameter by 2.2e-5
            _assert_one_process(m, plain, opt, popt, what, tol, exact_state=state == "bf16")
            # state dicts: torch.save / torch.load(weights_only=True) into a new sharded run, which
            # goes on bit for bit; one process's state dict loads into the sharded run alike
            if backend == "fused" and state == "fp32":
                m2 = _fsdp_mlp(dtype)
                m2.load_state_dict(m.state_dict())
                o2 = cls(m2.parameters(), backend=backend, state_format=state, **kw)
                o2.load_state_dict(_roundtrip(opt.state_dict()))
                m3 = _fsdp_mlp(dtype)
                m3.load_state_dict(m.state_dict())
                o3 = cls(m3.parameters(), backend=backend, state_format=state, **kw)
                o3.load_state_dict(_roundtrip(popt.state_dict()))
                for mm, oo in ((m, opt), (m2, o2), (m3, o3)):
                    x, y = _batch(rank)
                    (mm(x.to(dtype)).squeeze(-1) - y.to(dtype)).pow(2).mean().backward()
                    oo.step()
                for (name, p), q, r in zip(m.named_parameters(), m2.parameters(), m3.parameters()):
                    assert torch.equal(p.detach().to_local(), q.detach().to_local()), (
                        f"{what}: resumed {name}"
                    )
                    torch.testing.assert_close(r.detach().to_local(), p.detach().to_local(), rtol=0, atol=tol)
                    for k, st in opt.state[p].items():
                        if k != "step":
                            assert tuple(o2.state[q][k].placements) == tuple(st.placements), (what, k)
                            assert torch.equal(o2.state[q][k].to_local(), st.to_local()), (what, k)

    # DCP (torch.distributed.checkpoint) with torch's optimizer state dict helpers: saved sharded,
    # loaded into a new run (after torch's lr-0 initialization step), which goes on bit for bit
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # (Schedule-Free: torch's lr-0 initialization step advances its k; the loaded groups set it back)
    for cls, kw in (
        *cases, (adamkit.Lamb, dict(lr=1e-2)), (adamkit.Muon, dict(lr=2e-2)),
        (adamkit.ADOPT, dict(lr=1e-2, weight_decay=0.1)), (adamkit.AdEMAMix, dict(lr=1e-2, t_alpha_beta3=3)),
        (adamkit.StableAdamW, dict(lr=1e-2)), (adamkit.AdamW, dict(lr=1e-2, cautious=True)),
        (adamkit.ScheduleFreeAdamW, dict(lr=1e-2, warmup_steps=2)),
    ):  # fmt: skip
        m = _fsdp_mlp(torch.float64)
        opt = cls(m.parameters(), backend="fused", state_format="fp32", **kw)
        for _ in range(2):
            _backward(m, rank, torch.float64)
            opt.step()
            opt.zero_grad()
        where = os.path.join(out_dir, f"{cls.__name__}-{sorted(kw)}")
        dcp.save({"optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=where)
        m2 = _fsdp_mlp(torch.float64)
        m2.load_state_dict(m.state_dict())
        o2 = cls(m2.parameters(), backend="fused", state_format="fp32", **kw)
        sd = {"optim": get_optimizer_state_dict(m2, o2)}
        dcp.load(sd, checkpoint_id=where)
        set_optimizer_state_dict(m2, o2, sd["optim"])
        for mm, oo in ((m, opt), (m2, o2)):
            _backward(mm, rank, torch.float64)
            oo.step()
        assert [g.get("k") for g in o2.param_groups] == [g.get("k") for g in opt.param_groups]
        for (name, p), q in zip(m.named_parameters(), m2.parameters()):
            assert torch.equal(p.detach().to_local(), q.detach().to_local()), f"DCP {cls.__name__}: {name}"
            for k, st in opt.state[p].items():
                if k != "step":
                    assert torch.equal(o2.state[q][k].to_local(), st.to_local()), f"DCP {cls.__name__}: {k}"

    # 4. state_format='8bit': the parameter-shaped slots (m; Adam-mini's m) in 8-bit rows placed
    # like the parameter, the statistics of their own shape in fp32 (their own flat blocks would be
    # cut by the shards): trains as the fp32-state run does (final loss within 5 %), and resumes
    # from torch.save / torch.load(weights_only=True) bit for bit
    for cls, kw in (
        (adamkit.Adafactor, dict(lr=1e-2, beta1=0.9)),
        (adamkit.CAME, dict(lr=1e-3)),
        (adamkit.AdamMini, dict(lr=1e-2)),
    ):
        final = {}
        for state in ("fp32", "8bit"):
            m = _fsdp_wide()
            opt = cls(m.parameters(), state_format=state, min_8bit_size=0, **kw)
            losses = []
            for _ in range(6):
                x, y = _batch(rank)
                loss = (m(x).squeeze(-1) - y).pow(2).mean()
                loss.backward()
                losses.append(loss.item())
                opt.step()
                opt.zero_grad()
            final[state] = losses[-1]
            assert losses[-1] < losses[0], (cls.__name__, state, losses)
        assert abs(final["8bit"] - final["fp32"]) <= 0.05 * final["fp32"], (cls.__name__, final)
        for k, v in opt.state[m[2].weight].items():
            if k == "step":
                continue
            slot = next(sl for sl in cls.algorithm.slots if sl.name == k.removesuffix("_scale"))
            if slot.shape is None:  # rows: uint8 codes and their scales, placed like the parameter
                assert tuple(v.placements) == tuple(m[2].weight.placements), (cls.__name__, k)
                assert v.to_local().dtype == (torch.bfloat16 if k.endswith("_scale") else torch.uint8), k
            else:
                assert v.to_local().dtype == torch.float32 and not k.endswith("_scale"), (cls.__name__, k)
        m2 = _fsdp_wide()
        m2.load_state_dict(m.state_dict())
        o2 = cls(m2.parameters(), state_format="8bit", min_8bit_size=0, **kw)
        o2.load_state_dict(_roundtrip(opt.state_dict()))
        for mm, oo in ((m, opt), (m2, o2)):
            _backward(mm, rank)
            oo.step()
        for (name, p), q in zip(m.named_parameters(), m2.parameters()):
            assert torch.equal(p.detach().to_local(), q.detach().to_local()), (
                f"{cls.__name__} 8-bit resumed {name}"
            )

    # 5. refused at the first step, parameters and state untouched: a parameter with statistics of
    # their own shape sharded along another dim than 0 (tensor parallel)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for cls in (adamkit.AdamMini, adamkit.Adafactor, adamkit.CAME):
        full = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
        w = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(1)]))
        w.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
        opt = cls([w], lr=1e-2)
        with pytest.raises(ValueError, match="split along dim 0 only"):
            opt.step()
        assert torch.equal(w.detach().full_tensor(), full) and not opt.state[w], cls.__name__


def test_variants_under_fsdp2(tmp_path):
    _spawn(functools.partial(_checks, out_dir=str(tmp_path)))
