"""Benchmarks: optimizer steps against torch's own implementations, in one process.

Reports the machine's streaming bandwidth, then for each case and implementation the median step
time (after warm-up), the effective bandwidth (bytes per parameter stated), the share of the
streaming limit and the ratio to torch's fused AdamW. Writes a JSON file next to the table.

The share of the streaming limit is taken against the probes timed in the same interleaved rounds
as the case's steps (``case_stream_gbps``): this machine's memory bandwidth changes phase from
minute to minute, so a case measured in a slow phase compared with another case's fast-phase probe
would look slow for no fault of its own. The header reports the best probe of the whole run.

Next to each memory-bound time stands the same implementation's arithmetic-only time for the
case's parameter count (``arithmetic_ms``): steps of one tensor small enough that its buffers stay
in the core's L2 cache, at two sizes; the slope of step time against size is the cost per element
with memory traffic and each step's fixed cost (Python, dispatch) taken out. Beside it stands the
memory-bound time (``memory_ms``): the step's bytes at the streaming probe's bandwidth. The larger
of the two binds: where the arithmetic does, fewer bytes cannot make that step faster.

Gradients: each timed step starts from gradients as ``backward()`` leaves them: one tensor per
parameter, which every implementation reads where it lies. The row "adamkit fused (fresh grads)"
assigns new gradient tensors before every step (as ``zero_grad(set_to_none=True)`` + ``backward()``
does), so the kernel meets new pointers each step.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

GB = 1e9


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def transformer_shapes(d: int = 400, layers: int = 16, vocab: int = 3000, ctx: int = 1024) -> list[tuple]:
    """Tensor shapes of a GPT-style model: 12 tensors per block plus embeddings and final norm."""
    shapes: list[tuple] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln1, attention qkv + proj
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln2, mlp
    shapes += [(d,), (d,)]
    return shapes


CASES: dict[str, Callable[[float], list[tuple]]] = {
    # scale multiplies the parameter count (tests use a tiny scale)
    "a: 32M in 4 tensors": lambda s: [(int(8_000_000 * s),)] * 4,
    "b: 32M in 200 tensors (transformer)": lambda s: transformer_shapes(
        d=max(8, int(400 * math.sqrt(s))), layers=16
    ),
    "c: 2000 tensors of 1K": lambda s: [(1024,)] * 2000,
    "d: training step (100-layer MLP, 32M)": lambda s: mlp_shapes(max(8, int(566 * math.sqrt(s)))),
}
# Cases whose gradients come from a real backward pass (the step then finds them as training
# leaves them: freshly written, partly in cache); their step + zero_grad is timed, not the backward.
TRAINING = {"d: training step (100-layer MLP, 32M)"}
MLP_LAYERS, MLP_BATCH = 100, 32


def mlp_shapes(width: int) -> list[tuple]:
    """Weight and bias shapes of ``MLP_LAYERS`` Linear(width, width) layers (566 wide: 32.1M)."""
    return [(width, width), (width,)] * MLP_LAYERS


# --------------------------------------------------------------------------------------------------
# Implementations: each returns a step function; grads are set up the way that implementation
# receives them in training.
# --------------------------------------------------------------------------------------------------


def _torch_impl(kind: str):
    def make(params):
        kw = {"foreach": False} if kind == "for-loop" else {"foreach": True} if kind == "foreach" else {}
        if kind == "fused":
            kw = {"fused": True}
        return torch.optim.AdamW(params, lr=1e-3, **kw)

    return make


def _adamkit_impl(backend: str, **extra):
    def make(params):
        import adamkit

        return adamkit.AdamW(params, lr=1e-3, backend=backend, **extra)

    return make


@dataclass(frozen=True)
class Impl:
    make: Callable
    fresh_grads: bool = False
    dtype: torch.dtype = torch.float32
    bytes_per_param: float = 28  # payload moved per parameter per step (reads + writes)


def _recipe(precision: str, state: str, bytes_per_param: float) -> Impl:
    """adamkit's fused AdamW on a recipe of the registry (``tools.registry``)."""
    from . import registry

    dtype = registry.PRECISIONS[precision].torch_dtype
    return Impl(
        _adamkit_impl("fused", **registry.recipe_options(precision, state)),
        dtype=dtype,
        bytes_per_param=bytes_per_param,
    )


def _schedule_free_impl(params):
    import adamkit

    return adamkit.ScheduleFreeAdamW(params, lr=1e-3, backend="fused")


def implementations() -> dict[str, Impl]:
    """name -> implementation. Bytes per parameter: fp32 AdamW reads p, g, m, v and writes p, m, v
    (28 B); bf16 moments save 8, 8-bit moments 12 (plus 2 B of scale per 32); bf16 parameters with
    a bf16 Kahan buffer read and write 2 + 2 B instead of 4 (an int8 one 1 + 1). Peers appear only if
    installed."""
    bf16 = torch.bfloat16
    impls: dict[str, Impl] = {
        "torch for-loop": Impl(_torch_impl("for-loop")),
        "torch foreach": Impl(_torch_impl("foreach")),
        "torch fused": Impl(_torch_impl("fused")),
        "adamkit reference": Impl(_adamkit_impl("reference")),
        "adamkit foreach": Impl(_adamkit_impl("foreach")),
        "adamkit fused": Impl(_adamkit_impl("fused")),
        "adamkit fused (fresh grads)": Impl(_adamkit_impl("fused"), fresh_grads=True, bytes_per_param=28),
        "adamkit fused, bf16 state": _recipe("fp32", "bf16", bytes_per_param=20),
        "adamkit fused, 8-bit state": _recipe("fp32", "8bit", bytes_per_param=16 + 8 / 32),
        # the cautious mask: a counting pass (reads g, m, v: 12 B) before the step
        "adamkit fused, cautious": Impl(_adamkit_impl("fused", cautious=True), bytes_per_param=28),
        # Schedule-Free AdamW: reads p, g, z, v, writes p, z, v (28 B, as AdamW)
        "adamkit fused ScheduleFreeAdamW": Impl(_schedule_free_impl),
        "torch fused, bf16 params": Impl(_torch_impl("fused"), dtype=bf16, bytes_per_param=14),
        "adamkit fused, bf16 + Kahan, bf16 state": _recipe("bf16-kahan", "default", bytes_per_param=18),
        "adamkit fused, bf16 + Kahan, 8-bit state": _recipe(
            "bf16-kahan", "8bit", bytes_per_param=14 + 8 / 32
        ),
        # p 2 + 2, g 2, the int8 compensation 1 + 1, m and v 1 + 1 each, their scales
        "adamkit fused, bf16 + int8 Kahan, 8-bit state": _recipe(
            "bf16-kahan8", "8bit", bytes_per_param=12 + 8 / 32
        ),
    }
    try:
        import optimi  # type: ignore[import-not-found]

        impls["optimi AdamW"] = Impl(lambda ps: optimi.AdamW(ps, lr=1e-3))
    except ImportError:
        pass
    try:
        import schedulefree  # type: ignore[import-not-found]

        def package_schedule_free(ps):
            opt = schedulefree.AdamWScheduleFree(ps, lr=1e-3)  # foreach; divides the gradients in place
            opt.train()
            return opt

        impls["schedulefree AdamWScheduleFree"] = Impl(package_schedule_free, fresh_grads=True)
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        impls["bitsandbytes AdamW8bit"] = Impl(
            lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), bytes_per_param=16
        )
    except ImportError:
        pass
    try:
        from torchao.optim import AdamW8bit  # type: ignore[import-not-found]

        impls["torchao AdamW8bit"] = Impl(lambda ps: AdamW8bit(ps, lr=1e-3), bytes_per_param=16)
    except ImportError:
        pass
    return impls


@dataclass
class Row:
    case: str
    impl: str
    params: int
    tensors: int
    ms: float
    bytes_per_param: float
    gbps: float
    pct_stream: float  # of the case's own probes (case_stream_gbps)
    vs_torch_fused: float | None
    arithmetic_ms: float | None = None  # the same parameters' arithmetic alone (in cache)
    memory_ms: float | None = None  # the step's bytes at the case's streaming probe's bandwidth
    binds: str | None = None  # "arithmetic" or "memory": the larger of the two limits
    case_stream_gbps: float | None = None  # the best probe timed in this case's rounds


# one tensor at each size, stepped in cache (fp32 AdamW: 16 B of buffers per element, 1 MiB at the
# larger size, inside every current x86 core's L2)
ARITH_SIZES = (1 << 14, 1 << 16)


def arithmetic_ns(impl: Impl, calls: int = 40, repeats: int = 5) -> float:
    """Nanoseconds of arithmetic per parameter: the slope of step time between two in-cache sizes
    (``ARITH_SIZES``), each the best of ``repeats`` rounds of ``calls`` steps, the two sizes timed
    in alternation."""
    runners = [_Runner(impl, [(n,)]) for n in ARITH_SIZES]
    for r in runners:
        r.step()  # state, tables, kernel build

    def timed(r: _Runner) -> float:
        return sum(r.step() for _ in range(calls)) / calls

    best = [math.inf, math.inf]
    for _ in range(repeats):
        for i, r in enumerate(runners):
            best[i] = min(best[i], timed(r))
    return max(0.0, (best[1] - best[0]) / (ARITH_SIZES[1] - ARITH_SIZES[0]) * 1e9)


def _probe(n: int):
    """Streaming probes: copy (8 B/elem), triad (12 B/elem) and a compiled loop with AdamW's access
    pattern and trivial math (4 reads + 3 writes, 28 B/elem). Several concurrent streams reach more
    bandwidth than one, so the best of them is the fair ceiling for an optimizer step."""
    a, b, c, d = (torch.rand(n) for _ in range(4))

    def r4w3(p, g, m, v):
        p.copy_(p + g)
        m.copy_(m + g)
        v.copy_(v * g)

    r4w3c = torch.compile(r4w3, dynamic=False)
    return [
        (lambda: c.copy_(a), 8),
        (lambda: torch.add(a, b, alpha=0.5, out=c), 12),
        (lambda: r4w3c(a, b, c, d), 28),
    ]


class _Runner:
    """One implementation on one case, ready to step; ``step()`` returns the seconds it took."""

    def __init__(self, impl: Impl, shapes):
        self.params = [torch.randn(s, dtype=impl.dtype).requires_grad_() for s in shapes]
        self.grads = [torch.randn(s, dtype=impl.dtype) for s in shapes]
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.opt = impl.make(self.params)
        self.fresh = impl.fresh_grads

    def step(self) -> float:
        if self.fresh:
            for p, g in zip(self.params, self.grads):
                p.grad = g.clone()  # a new tensor, as backward() without hooks would leave
        t = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - t


class _TrainRunner(_Runner):
    """A training step of an MLP of ``shapes`` (``mlp_shapes``): forward and backward untimed,
    then ``step()`` + ``zero_grad()`` timed, as a training loop runs them."""

    def __init__(self, impl: Impl, shapes):
        width = shapes[0][0]
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(len(shapes) // 2):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        self.model = torch.nn.Sequential(*layers).to(impl.dtype)
        self.params = list(self.model.parameters())
        self.x = torch.randn(MLP_BATCH, width, dtype=impl.dtype)
        self.opt = impl.make(self.params)

    def step(self) -> float:
        self.model(self.x).float().square().mean().backward()
        t = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - t


def interleaved_medians(fns: list[Callable[[], float]], warmup: int, repeats: int) -> list[float]:
    """Median seconds of each function, timed in rounds (one call of each per round): on a shared
    machine whose speed drifts, every implementation then sees the same conditions."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times[i].append(fn())
    return [statistics.median(t) for t in times]


def _timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run


def bench(
    cases: list[str] | None = None,
    impls: list[str] | None = None,
    scale: float = 1.0,
    warmup: int = 3,
    repeats: int = 9,
    threads: int | None = None,
    progress: Callable[[str], None] = lambda s: None,
    arithmetic: bool = True,
) -> dict:
    """Run the benchmark; returns a dict with ``stream_gbps`` and ``rows`` (JSON-ready).

    Per case, every implementation is built first and then timed in interleaved rounds together
    with the streaming probes, so ratios compare like with like. With ``arithmetic``, each
    implementation's in-cache cost per parameter is measured first (``arithmetic_ns``)."""
    torch.set_flush_denormal(True)  # denormals slow fp32 CPU math ~20x
    if threads:
        torch.set_num_threads(threads)
    all_impls = implementations()
    chosen = impls or list(all_impls)
    unknown = [i for i in chosen if i not in all_impls]
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; available: {list(all_impls)}")
    for case in cases or list(CASES):
        if case not in CASES:
            raise ValueError(f"unknown case {case!r}; available: {list(CASES)}")
    n_probe = max(1_000_000, int(32_000_000 * scale))
    probes = _probe(n_probe)
    arith: dict[str, float] = {}
    if arithmetic:
        for name in chosen:
            progress(f"{name}: arithmetic alone, in cache ...")
            arith[name] = arithmetic_ns(all_impls[name])
    rows, stream = [], 0.0
    for case in cases or list(CASES):
        shapes = CASES[case](scale)
        n = sum(math.prod(s) for s in shapes)
        progress(f"{case}: {len(chosen)} implementations, {warmup} warm-up + {repeats} timed rounds ...")
        runner = _TrainRunner if case in TRAINING else _Runner
        runners = [runner(all_impls[name], shapes) for name in chosen]
        fns = [_timed(fn) for fn, _ in probes] + [r.step for r in runners]
        medians = interleaved_medians(fns, warmup, repeats)
        case_stream = max(n_probe * nb / t / GB for (_, nb), t in zip(probes, medians))
        stream = max(stream, case_stream)
        case_rows = []
        for name, sec in zip(chosen, medians[len(probes) :]):
            bpp = all_impls[name].bytes_per_param
            gbps = n * bpp / sec / GB
            row = Row(case, name, n, len(shapes), sec * 1e3, bpp, gbps, 100 * gbps / case_stream, None)
            row.case_stream_gbps = case_stream
            if name in arith:
                row.arithmetic_ms = arith[name] * n * 1e-6
            case_rows.append(row)
            progress(f"{case:38s} {name:42s} {sec * 1e3:8.2f} ms")
        ref = next((r.ms for r in case_rows if r.impl == "torch fused"), None)
        for r in case_rows:
            r.vs_torch_fused = ref / r.ms if ref else None
            if r.arithmetic_ms is not None:
                r.memory_ms = n * r.bytes_per_param / (case_stream * GB) * 1e3
                r.binds = "arithmetic" if r.arithmetic_ms > r.memory_ms else "memory"
        rows += case_rows
        del runners, fns
        gc.collect()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stream_gbps": stream,
        "rows": [asdict(r) for r in rows],
    }


_OVERHEAD_SCRIPT = r"""
import json, os, time, torch, adamkit
torch.set_flush_denormal(True)
# fp32 for the native kernel; fp16 for the compiled one (without the native kernel, fp32 AdamW
# would run torch's own fused kernel, which compiles nothing)
dtype = getattr(torch, os.environ.get("ADAMKIT_BENCH_DTYPE", "float32"))
ps = [torch.randn(1_000_000).to(dtype).requires_grad_() for _ in range(4)]
for p in ps: p.grad = torch.randn_like(p)
# what any torch optimizer costs in a fresh process (torch.optim imports dynamo on first use)
t = time.perf_counter()
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
torch_first = time.perf_counter() - t
t = time.perf_counter()
opt = adamkit.AdamW(ps, backend="fused")  # finds (or builds) the native kernel
opt.step()  # builds the kernel's tables (and compiles, on torch.compile's kernel)
first = time.perf_counter() - t
ts = []
for _ in range(9):
    t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
ts.sort()
print(json.dumps({"first": first, "steady": ts[4], "torch_first": torch_first}))
"""


def compile_overhead(cache_dir: str) -> dict:
    """First-step overhead of the fused backend in fresh processes: construction and first step,
    less a steady step, after the imports any torch.optim optimizer triggers. Cold: empty kernel
    caches under ``cache_dir`` (the native kernel is built, inductor compiles); warm: the same
    caches, filled by the cold run. Measured for the native kernel and for torch.compile's
    (``ADAMKIT_NATIVE=0`` and fp16 parameters, which only it serves)."""
    out = {}
    for kernel, native in (("", "1"), ("compiled_", "0")):
        env = dict(
            os.environ,
            TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
            ADAMKIT_CACHE_DIR=os.path.join(cache_dir, "adamkit"),
            ADAMKIT_NATIVE=native,
            ADAMKIT_BENCH_DTYPE="float32" if native == "1" else "float16",
        )
        for label in ("cold", "warm"):
            res = subprocess.run(
                [sys.executable, "-c", _OVERHEAD_SCRIPT], env=env, capture_output=True, text=True, check=True
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            out[kernel + label] = r["first"] - r["steady"]
            out.setdefault("torch_optim_first_construction", r["torch_first"])
    return out


def format_table(result: dict) -> str:
    lines = [
        f"torch {result['torch']}, {result['threads']} threads, "
        f"streaming limit {result['stream_gbps']:.1f} GB/s (the run's best probe; each row's memory ms "
        "and % of stream are against the probes timed in its case's rounds, the stream column)",
        "",
        "| case | implementation | ms (median) | arithmetic ms (in cache) | memory ms (at stream) | binds "
        "| B/param | GB/s | stream GB/s | % of stream | vs torch fused |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = f"{r['vs_torch_fused']:.2f}x" if r["vs_torch_fused"] else "-"
        arith = f"{r['arithmetic_ms']:.2f}" if r.get("arithmetic_ms") is not None else "-"
        mem = f"{r['memory_ms']:.2f}" if r.get("memory_ms") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['ms']:.2f} | {arith} | {mem} | {r.get('binds') or '-'} "
            f"| {r['bytes_per_param']:.0f} | {r['gbps']:.1f} | {r['case_stream_gbps']:.1f} "
            f"| {r['pct_stream']:.0f}% | {ratio} |"
        )
    if "compile_overhead_s" in result:
        c = result["compile_overhead_s"]
        lines += [
            "",
            f"fused first-step overhead: cold {c['cold']:.2f} s, warm (on-disk cache) {c['warm']:.2f} s; "
            f"torch.compile kernel (fp16/fp64): cold {c['compiled_cold']:.2f} s, "
            f"warm {c['compiled_warm']:.2f} s (a fresh process's first torch.optim.AdamW costs "
            f"{c['torch_optim_first_construction']:.2f} s of imports, not counted)",
        ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .args import positive_float, positive_int

    cases = "; ".join(CASES)
    parser.add_argument(
        "--cases",
        default="a,b,c,d",
        help=f"comma-separated subset of the cases ({cases}; d times step + zero_grad after a real backward)",
    )
    names = "; ".join(implementations())  # peers appear only when installed
    parser.add_argument(
        "--impls",
        default=None,
        metavar="NAME,NAME,...",
        help=f"comma-separated implementations (default: all). Installed here: {names}",
    )
    parser.add_argument(
        "--scale",
        type=positive_float,
        default=1.0,
        help="multiply every case's parameter count (0.1 for a quick look)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=9, help="timed rounds per implementation; the median is kept"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed rounds first (allocation, kernel builds, caches)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--json", default="bench.json", help="where to write the JSON results")
    parser.add_argument(
        "--no-arithmetic",
        dest="arithmetic",
        action="store_false",
        help="skip the in-cache (arithmetic-only) time of each implementation",
    )
    parser.add_argument(
        "--compile-overhead",
        action="store_true",
        help="also time the fused kernel's cold and warm first step",
    )


def _parse_impls(text: str) -> list[str]:
    """Comma-separated names, where names may contain commas themselves ("adamkit fused, 8-bit
    state"): the longest run of parts that names an implementation wins."""
    known, parts, out = implementations(), [p.strip() for p in text.split(",")], []
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            name = ", ".join(parts[i:j])
            if name in known or j == i + 1:
                out.append(name)  # an unknown single part is reported by bench()
                i = j
                break
    return out


def run(args: argparse.Namespace) -> int:
    letters = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = [next((k for k in CASES if k.startswith(f"{c}:")), c) for c in letters]
    impls = _parse_impls(args.impls) if args.impls else None
    try:
        result = bench(
            cases, impls, args.scale, args.warmup, args.repeats, args.threads, progress=print,
            arithmetic=args.arithmetic,
        )  # fmt: skip
    except ValueError as err:
        print(f"adamkit bench: error: {err} (see adamkit bench --help)", file=sys.stderr)
        return 2
    if args.compile_overhead:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            result["compile_overhead_s"] = compile_overhead(d)
    print()
    print(format_table(result))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.json}")
    return 0
