"""The planner's per-rank bytes (``per_rank``) against the live tensors of FSDP2 and DDP +
ZeroRedundancyOptimizer runs, to the byte.

One ``torch.multiprocessing.spawn`` of 2 gloo processes runs every check (a spawn costs seconds).
Each rank steps adamkit once and sums, per component, the ``untyped_storage().nbytes()`` of its
local tensors, each storage once: the parameters' local shards (FSDP2 pads every rank's shard to
the first one's rows; ZeRO's bucket views share one storage per rank's bucket), their gradients
(FSDP2's are views of one reduce-scatter output per module) and the optimizer state (adamkit keeps
the step counters of a kernel table in one tensor). The model's tensors split unevenly: 300, 3 and
1 rows over 2 ranks (150/150, 2/1, 1/0: a rank without rows), rows of 5 elements (fp32 under
8 bit: narrower than a block is worth), rows of 300 (8-bit rows of a full and a partial block),
1-D tensors (fp32 under FSDP2's 8 bit, flat blocks on one process) and a frozen bias (parameter
bytes, no gradient or state); the LayerNorm's 5 rows split 3/2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import _local, _spawn
from torch import nn

import adamkit
from adamkit.tools import cli
from adamkit.tools.plan import COMPONENTS, fsdp2_rows, per_rank, state_component

pytestmark = [
    pytest.mark.slow,  # processes on the gloo backend
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2


def build() -> nn.Module:
    """The model (also ``--module test_plan_distributed:build``): 2,717 parameters in 8 tensors, the
    smallest first (ZeroRedundancyOptimizer's partition depends on its sort by size)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.LayerNorm(5), nn.Linear(5, 300), nn.Tanh(), nn.Linear(300, 3), nn.Tanh(), nn.Linear(3, 1)
    )
    m[3].bias.requires_grad_(False)
    return m


# (planner recipe, optimizer class, parameter dtype, options): every state format and precision
# buffer; min_8bit_size=0 so that this tiny model's matrices get 8-bit rows
FSDP2 = [
    ("fp32", "AdamW", torch.float32, {}),
    ("fp32-bf16state", "AdamW", torch.float32, dict(state_format="bf16")),
    ("fp32-8bit", "AdamW", torch.float32, dict(state_format="8bit")),
    ("fp32-amsgrad", "AdamW", torch.float32, dict(amsgrad=True)),
    ("bf16-kahan", "AdamW", torch.bfloat16, dict(kahan_sum=True)),
    ("bf16-kahan-8bit", "AdamW", torch.bfloat16, dict(kahan_sum=True, state_format="8bit")),
    ("bf16-kahan8-8bit", "AdamW", torch.bfloat16, dict(kahan_sum="8bit", state_format="8bit")),
    ("mixed-bf16", "AdamW", torch.bfloat16, dict(master_weights=True, state_format="fp32")),
    ("bf16-sr-8bit", "AdamW", torch.bfloat16, dict(stochastic_rounding=True, state_format="8bit")),
    ("fp32-8bit-lion", "Lion", torch.float32, dict(state_format="8bit")),
    # the variants: slots of the parameter's shape hold the rank's rows; factored and per-row
    # statistics follow the rows or are whole on every rank (Slot.rows)
    ("fp32-adafactor", "Adafactor", torch.float32, {}),
    ("fp32-bf16state-adafactor-m", "Adafactor", torch.float32, dict(beta1=0.9, state_format="bf16")),
    ("fp32-came", "CAME", torch.float32, {}),
    ("fp32-adam-mini", "AdamMini", torch.float32, {}),
    ("fp32-8bit-lamb", "Lamb", torch.float32, dict(state_format="8bit")),
    ("fp32-muon", "Muon", torch.float32, {}),
    ("fp32-8bit-sophia", "SophiaG", torch.float32, dict(state_format="8bit")),
    # 8 bit: m in rows, the statistics of their own shape fp32 (optim.layout.slot_format)
    ("fp32-8bit-adafactor-m", "Adafactor", torch.float32, dict(beta1=0.9, state_format="8bit")),
    ("fp32-8bit-came", "CAME", torch.float32, dict(state_format="8bit")),
    ("fp32-8bit-adam-mini", "AdamMini", torch.float32, dict(state_format="8bit")),
]
# (planner recipe, options, parameters_as_bucket_view)
ZERO = [
    ("fp32", {}, False),
    ("fp32-8bit", dict(state_format="8bit"), True),
    ("fp32-bf16state", dict(state_format="bf16"), True),
    ("fp32-amsgrad", dict(amsgrad=True), False),
]


def _live(params, state: dict) -> dict[str, int]:
    """Bytes per planner component of the local tensors of ``params``, their gradients and their
    optimizer ``state``, each storage counted once."""
    out = dict.fromkeys(COMPONENTS, 0)
    seen: set[int] = set()

    def add(component: str, t: torch.Tensor) -> None:
        s = _local(t).untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out[component] += s.nbytes()

    for p in params:
        add("params", p.detach())
        if p.grad is not None:
            add("grads", p.grad)
        for k, v in state.get(p, {}).items():
            add(state_component(k), v)
    return out


def _step(model: nn.Module, opt, rank: int, dtype) -> None:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank)).to(dtype)
    model(x).float().pow(2).mean().backward()
    opt.step()  # the gradients stay: they are counted


def _checks(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    for recipe, cls, dtype, kw in FSDP2:
        m = build().to(dtype)
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(m)
        opt = getattr(adamkit, cls)(m.parameters(), lr=1e-3, min_8bit_size=0, **kw)
        _step(m, opt, rank, dtype)
        live = _live(list(m.parameters()), opt.state)
        want = per_rank(build(), recipe, parallel="fsdp2", devices=WORLD, min_8bit_size=0).ranks[rank]
        assert live == want, f"FSDP2 {recipe} rank {rank}: live {live} vs planned {want}"

    for recipe, kw, bucket_view in ZERO:
        m = DDP(build())
        zopt = ZeroRedundancyOptimizer(
            m.parameters(),
            optimizer_class=adamkit.AdamW,
            parameters_as_bucket_view=bucket_view,
            lr=1e-3,
            min_8bit_size=0,
            **kw,
        )
        _step(m, zopt, rank, torch.float32)
        plan = per_rank(build(), recipe, parallel="ddp+zero", devices=WORLD, min_8bit_size=0)
        params = list(m.parameters())
        # the planner's partition is ZeroRedundancyOptimizer's, rank by rank
        parts = zopt._partition_parameters()
        index = {id(p): i for i, p in enumerate(params)}
        got = [sorted(index[id(p)] for g in groups for p in g["params"]) for groups in parts]
        assert got == [sorted(a) for a in plan.assignment], f"ZeRO {recipe}: {got} vs {plan.assignment}"
        live = _live(params, zopt.optim.state)
        want = plan.ranks[rank]
        assert live == want, f"ZeRO {recipe} (bucket view {bucket_view}) rank {rank}: {live} vs {want}"
        del m, zopt


def test_per_rank_bytes_equal_live_fsdp2_and_zero_shards():
    _spawn(_checks, WORLD)


def test_fsdp2_rows_are_torch_chunk_pieces():
    for rows in range(0, 12):
        for world in range(1, 6):
            pieces = [c.shape[0] for c in torch.chunk(torch.empty(rows, 1), world)] if rows else []
            assert fsdp2_rows(rows, world) == pieces + [0] * (world - len(pieces)), (rows, world)


def test_per_rank_cli_and_errors(capsys):
    argv = ["plan", "--module", "test_plan_distributed:build", "--per-rank", "fsdp2", "--devices", "2"]
    assert cli.main([*argv, "--recipe", "bf16-kahan-8bit", "--min-8bit-size", "0"]) == 0
    out = capsys.readouterr().out
    want = per_rank(build(), "bf16-kahan-8bit", devices=2, min_8bit_size=0)
    assert f"{want.total(0):,}" in out and f"{want.total(1):,}" in out and "rank 1" in out
    assert cli.main([*argv, "--compare", "fp32,fp32-8bit", "--json"]) == 0
    got = [[r["bytes"] for r in d["ranks"]] for d in __import__("json").loads(capsys.readouterr().out)]
    assert got == [list(per_rank(build(), r, devices=2).ranks) for r in ("fp32", "fp32-8bit")]
    assert cli.main([*argv, "--zero", "3"]) == 2
    assert "--per-rank" in capsys.readouterr().err
    for kwargs, match in (
        (dict(parallel="tp"), "parallel must be one of"),
        (dict(devices=0), "devices must be"),
        (dict(recipe="fp32-sgd"), "not 'sgd'"),
        (dict(recipe="bf16-kahan-accum"), "gradient-accumulation"),
    ):
        with pytest.raises(ValueError, match=match):
            per_rank(build(), **{"recipe": "fp32", **kwargs})
    with pytest.raises(ValueError, match="0-D"):
        per_rank([(4, 4), ()], "fp32")
    # ZeRO keeps whole tensors: Adafactor's factored state is counted there
    assert per_rank([(4, 4), ()], "fp32-adafactor", parallel="ddp+zero").ranks[1]["v"] == 4
