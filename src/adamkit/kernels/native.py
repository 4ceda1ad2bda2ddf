"""Build, cache and call the native kernel (``kernel.c``) of the fused backend.

The C source is compiled once per machine with the system's C compiler into a cache directory
(``$ADAMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamkit``, else ``~/.cache/adamkit``), keyed by a
hash of the source, the compiler and the CPU, and loaded with ``ctypes``: about two seconds the first
time on a machine, milliseconds afterwards. ctypes releases the GIL during the call; the kernel
splits each buffer between ``torch.get_num_threads()`` threads of torch's own OpenMP pool (whose
``GOMP_parallel`` this module finds in the process), or of its own where there is none.

Where no compiler is found or the build fails, ``load()`` returns None and the dispatcher
(``optim/dispatch.py``) takes torch's own fused kernel where it serves the formats, else the compiled
or foreach path, with one warning naming the reason.

The kernel works on tensors where they lie. :class:`GroupPlan` keeps, per parameter group and
storage kind, a table of rows (length, stable id, pointers to the optimizer's own state); each step
it passes the parameters' and gradients' current pointers and which rows have a gradient. The
Python work per step is a few C-level ``map`` calls over the group's tensors.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import itertools
import math
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..dist import global_offset, is_dtensor, is_sharded, local

SOURCE = Path(__file__).with_name("kernel.c")
FLAGS = [
    "-O3",
    "-march=native",  # or $ADAMKIT_NATIVE_MARCH (e.g. x86-64-v3: the AVX2 level a wheel carries)
    "-fno-math-errno",  # sqrtf as one instruction (the result is the same)
    "-fno-trapping-math",
    "-ffp-contract=off",  # round every operation as the reference backend does
    "-fopenmp-simd",  # honour the kernel's simd reduction pragma (no OpenMP runtime involved)
    "-shared",
    "-fPIC",
    "-pthread",
]


PARAM_MODES = {"native": 0, "plain": 1, "kahan": 2, "sr": 3, "master": 4, "kahan8": 5}
STATE_FORMATS = {"fp32": 0, "bf16": 1, "8bit": 2}
MAX_SLOTS = 3
N_HP = 16
# The tests switch the native kernel off to exercise the other kernels.
USE_NATIVE = True


class Row(ctypes.Structure):
    """Mirror of ``row_t`` in kernel.c: one tensor and the optimizer's own buffers for it."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("uid", ctypes.c_int64),
        ("aux", ctypes.c_void_p),
        ("slot", ctypes.c_void_p * MAX_SLOTS),
        ("scale", ctypes.c_void_p * MAX_SLOTS),
        ("len", ctypes.c_int64),
        ("index0", ctypes.c_int64),
    ]


class Args(ctypes.Structure):
    """Mirror of ``args_t`` in kernel.c."""

    _fields_ = [
        ("nrows", ctypes.c_int64),
        ("sel", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("hp", ctypes.c_float * N_HP),
        ("step", ctypes.c_int64),
        ("alg", ctypes.c_int32),
        ("pmode", ctypes.c_int32),
        ("sfmt", ctypes.c_int32),
        ("nslots", ctypes.c_int32),
        ("ams", ctypes.c_int32),
        ("skip", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
        ("signs", ctypes.c_int32),
        ("cautious", ctypes.c_int32),
        ("fp32_slots", ctypes.c_int32),
        ("omp_parallel", ctypes.c_void_p),
    ]


ABI_VERSION = 6  # kernel.c's ABI_VERSION: the layout of Row and Args, its entry points


@functools.cache
def _ids(lib) -> dict:
    return {}


def algorithm_id(lib, alg) -> int:
    """The kernel's id of ``alg``'s body (``Algorithm.native``, a name in kernel.c's ALGORITHMS);
    -1 where the library has no such body (the step then refuses it, changing nothing)."""
    ids = _ids(lib)
    if alg.native not in ids:
        ids[alg.native] = lib.adamkit_algorithm(alg.native.encode())
    return ids[alg.native]


def abi_problem(lib) -> str | None:
    """Why ``lib`` does not match this module's mirror of its structs, or None."""
    try:
        fn = lib.adamkit_abi
    except AttributeError:
        return "the library has no adamkit_abi (built from an older kernel.c)"
    fn.argtypes, fn.restype = [ctypes.POINTER(ctypes.c_int64)], None
    out = (ctypes.c_int64 * 5)()
    fn(out)
    want = (ABI_VERSION, ctypes.sizeof(Row), ctypes.sizeof(Args), N_HP, MAX_SLOTS)
    if tuple(out) != want:
        return f"its ABI (version, sizes) {tuple(out)} differs from this adamkit's {want}"
    return None


def supports(alg, fmt, param_dtype: torch.dtype, device: torch.device) -> bool:
    """Formats the native kernel implements: fp32 or bf16 parameters, fp32/bf16/8-bit state, for
    algorithms with a native body."""
    if alg.native is None or device.type != "cpu":
        return False
    if fmt.param not in PARAM_MODES or fmt.state not in STATE_FORMATS:
        return False
    return param_dtype == (torch.float32 if fmt.param == "native" else torch.bfloat16)


def cache_dir() -> Path:
    d = os.environ.get("ADAMKIT_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adamkit"


def find_compiler(env: str, names: tuple[str, ...]) -> str | None:
    """The compiler named by ``$env`` (possibly with arguments), else the first of ``names`` on
    PATH; None if there is none that runs."""
    cc = os.environ.get(env) or next((c for c in names if shutil.which(c)), None)
    return cc if cc and shutil.which(cc.split()[0]) else None


def _cpu_id() -> str:
    # -march=native code must not be loaded on another CPU sharing the cache (e.g. a network home)
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


_failure: str | None = None


def failure() -> str | None:
    """Why the native kernel is unavailable (after ``load()`` returned None)."""
    return _failure


def build_flags() -> list[str]:
    """FLAGS, with ``-march`` from ``$ADAMKIT_NATIVE_MARCH`` where set (a shared cache for CPUs
    of several kinds, or testing the x86-64-v3 kernel a wheel carries on an AVX-512 machine)."""
    march = os.environ.get("ADAMKIT_NATIVE_MARCH")
    return [f"-march={march}" if f == "-march=native" and march else f for f in FLAGS]


def kernel_name(cc: str, version: str) -> str:
    """The cached library's file name: a hash of the source, the whole ``$CC`` (``ccache gcc``,
    ``gcc -m32``: its words change the build), the flags, the compiler's version and the CPU."""
    parts = [SOURCE.read_bytes(), cc.encode(), " ".join(build_flags()).encode(), version.encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_id().encode()])).hexdigest()[:16]
    return f"adamkit_kernel_{key}.so"


def _build(cc: str, out: Path) -> str | None:
    """Compile the kernel to ``out`` unless it is there; returns why it failed, or None."""
    if out.exists():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    try:
        cmd = [*cc.split(), *build_flags(), "-o", tmp, str(SOURCE)]
        # the first use on a machine waits for this: say so, once (the result is cached)
        print(
            f"adamkit: building the native kernel for this CPU, once (~30 s; cached in {out.parent})",
            file=sys.stderr,
            flush=True,
        )
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return f"{cc} failed: {r.stderr.strip()[-300:]}"
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load():
    """The loaded library (``adamkit_step``, ``adamkit_grad_overlap``): built here for this CPU,
    else a wheel's prebuilt one; None where neither is available (``failure()`` says why)."""
    global _failure
    if os.environ.get("ADAMKIT_NATIVE", "1") == "0":
        _failure = "disabled by ADAMKIT_NATIVE=0"
        return None
    lib = _build_and_load()
    if lib is not None and (why := abi_problem(lib)) is not None:
        _failure, lib = f"the kernel built here does not match: {why}", None
    if lib is None:
        lib = _load_prebuilt()  # a wheel's kernel, where this machine cannot build one
    if lib is None:
        return None
    lib.adamkit_step.argtypes = [ctypes.POINTER(Args)]
    lib.adamkit_step.restype = ctypes.c_int
    lib.adamkit_grad_overlap.argtypes = [
        ctypes.POINTER(Args),
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int64,
    ]
    lib.adamkit_grad_overlap.restype = ctypes.c_int64
    p = ctypes.c_void_p
    lib.adamkit_ieee.argtypes = [ctypes.c_int32, ctypes.c_int64, p, p, p, ctypes.c_float, p]
    lib.adamkit_ieee.restype = ctypes.c_int
    lib.adamkit_algorithm.argtypes = [ctypes.c_char_p]
    lib.adamkit_algorithm.restype = ctypes.c_int32
    _failure = None
    return lib


IEEE_OPS = {"sqrt": 0, "div": 1, "div_scalar": 2, "scalar_div": 3, "fma_scalar": 4, "fma": 5}


def ieee(op: str, a: torch.Tensor, b: torch.Tensor | None = None, c: torch.Tensor | None = None, s=0.0):
    """One correctly rounded elementwise operation (``IEEE_OPS``) on fp32 CPU tensors, by the
    kernel's IEEE instructions; a new tensor. The C loop reads every operand at the result's
    length, so operands of other shapes (a per-row statistic against its matrix) are broadcast
    here first, as torch's own operation would. The caller checks ``load()``."""
    ts = [t for t in (a, b, c) if t is not None]
    shape = torch.broadcast_shapes(*(t.shape for t in ts))
    a, b, c = (None if t is None else t.expand(shape).contiguous() for t in (a, b, c))
    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    ptr = _DATA_PTR
    rc = load().adamkit_ieee(
        IEEE_OPS[op], a.numel(), ptr(a), None if b is None else ptr(b), None if c is None else ptr(c),
        float(s), ptr(out),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"adamkit_ieee: unknown op {op!r}")
    return out


# The wheel's kernels (setup.py), by x86-64 level, and the CPU flags each needs (/proc/cpuinfo).
PREBUILT = Path(__file__).with_name("prebuilt")
_V3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
LEVELS = {
    "x86-64-v4": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": _V3,
}
loaded_from: str | None = None  # "built here" or "prebuilt <level>": what load() found


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def _load_prebuilt():
    """The best prebuilt kernel this CPU runs, or None (keeping the reason a build failed)."""
    global loaded_from
    flags = _cpu_flags()
    for level, needs in LEVELS.items():
        path = PREBUILT / f"adamkit_kernel_{level}.so"
        if path.exists() and needs <= flags:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                continue
            if abi_problem(lib) is not None:  # a wheel's kernel from another adamkit version
                continue
            loaded_from = f"prebuilt {level}"
            return lib
    return None


def _build_and_load():
    """Build (once per machine, cached) and load the kernel for this CPU; None with ``_failure``
    set where there is no compiler or the build fails."""
    global _failure, loaded_from
    cc = find_compiler("CC", ("gcc", "cc", "clang"))
    if cc is None:
        _failure = "no C compiler found (set CC)"
        return None
    try:
        ver = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        _failure = f"{cc} --version: {type(e).__name__}: {e}"
        return None
    march = os.environ.get("ADAMKIT_NATIVE_MARCH")
    if march in LEVELS and not LEVELS[march] <= _cpu_flags():
        # it would build, then stop the process with an illegal instruction at the first step
        _failure = f"ADAMKIT_NATIVE_MARCH={march}: this CPU lacks {sorted(LEVELS[march] - _cpu_flags())}"
        return None
    name = kernel_name(cc, ver.stdout)
    # an unwritable cache directory (read-only home) falls back to a per-user temporary one
    user = os.getuid() if hasattr(os, "getuid") else 0
    dirs = [cache_dir(), Path(tempfile.gettempdir()) / f"adamkit-{user}"]
    for d in dirs:
        try:
            _failure = _build(cc, d / name)
            if _failure is not None:  # the compiler itself failed: another directory will not help
                return None
            lib = ctypes.CDLL(str(d / name))
            break
        except (OSError, subprocess.SubprocessError) as e:
            _failure = f"{type(e).__name__}: {e}"
    else:
        return None
    loaded_from = "built here" + (f" (-march={march})" if march else "")
    return lib


@functools.cache
def openmp_parallel() -> int | None:
    """The address of ``GOMP_parallel`` in the OpenMP runtime torch's own parallel operations use,
    so that the kernel runs on torch's thread pool (see kernel.c); None where torch does not
    parallelize with OpenMP or its runtime is not found (the kernel then starts threads itself)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as f:  # the runtime torch loaded: libgomp, or Intel's or LLVM's
            loaded = {line.split()[-1] for line in f if "omp" in line and ".so" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    candidates = [p for p in loaded if os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp"))]
    for path in sorted(candidates, key=lambda p: (not p.startswith(torch_dir), p)):  # torch's first
        try:
            # already loaded, so this is the same instance (and pool), not a second runtime
            return ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


# --------------------------------------------------------------------------------------------------
# Tables: the kernel's view of a parameter group
# --------------------------------------------------------------------------------------------------

_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_LOCAL = operator.attrgetter("_local_tensor")  # a DTensor's local shard


def eligible(p: torch.Tensor) -> bool:
    """Whether the kernel can step ``p`` where it lies: a dense contiguous CPU tensor (for a DTensor,
    its local shard). Others run per tensor (the dispatcher's fallbacks)."""
    t = local(p)
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
        return False
    return t.device.type == "cpu" and t.is_contiguous()


def _ptrs(ts) -> array.array:
    return array.array("Q", map(_DATA_PTR, ts))


class Table:
    """The rows of one storage kind (formats, dtype) of one group: stepped by one kernel call.

    The optimizer's own buffers per row (state slots, scales, Kahan / master buffer) are fixed while
    the table lives: the optimizer rebuilds its tables whenever it replaces state (load_state_dict).
    Step counters of the rows live in one fp32 tensor (4 B per *tensor*) that ``state["step"]``
    entries are 0-D views of, so a step advances them in one operation."""

    def __init__(self, lib, alg, fmt, members: list[int], params: list, state, uids: list[int], flags):
        self.lib = lib
        self.members = members  # indices of the rows' parameters in their group
        self.get = operator.itemgetter(*members) if len(members) > 1 else (lambda seq: (seq[members[0]],))
        self.params = [params[i] for i in members]
        self.dt = is_dtensor(self.params[0])  # DTensor rows: the kernel works on the local shards
        self.locals = list(map(_LOCAL, self.params)) if self.dt else self.params
        self.param_ptrs = _ptrs(self.locals)
        self.psize = self.locals[0].element_size()
        names = [s.name for s in alg.active_slots(flags)]
        n = len(members)
        rows = (Row * n)()
        keep = []  # the buffers the rows point into: alive while the table is
        for j, (p, loc, uid) in enumerate(zip(self.params, self.locals, uids)):
            st = state[p]
            r = rows[j]
            # the local shard's length: a DTensor's numel() is its global one
            r.n, r.uid = loc.numel(), uid
            # 8-bit rows (quant8): the row length, groups lie inside rows; else one row of n
            coded = [n for n, s in zip(names, alg.active_slots(flags)) if not s.weights]
            in_rows = fmt.state == "8bit" and bool(coded) and local(st[coded[0]]).dim() == 2
            r.len = max(1, math.prod(p.shape[1:])) if in_rows else r.n
            r.index0 = global_offset(p)  # rounding bits follow the whole tensor's positions
            aux = next((st[k] for k in ("kahan_comp", "kahan_comp8", "master_weight") if k in st), None)
            if aux is not None:
                r.aux = local(aux).data_ptr()
                keep.append(aux)
            for k, name in enumerate(names):
                r.slot[k] = local(st[name]).data_ptr()
                keep.append(st[name])
                if name + "_scale" in st:
                    r.scale[k] = local(st[name + "_scale"]).data_ptr()
                    keep.append(st[name + "_scale"])
        self.rows, self.keep = rows, keep
        # the parameters' byte spans sorted by start, with the furthest end so far (the overlap
        # check's index): built once, as parameters do not move while the table lives
        spans, reach = [], 0
        for lo, hi in sorted((ptr, ptr + rows[j].n * self.psize) for j, ptr in enumerate(self.param_ptrs)):
            reach = max(reach, hi)
            spans += (lo, hi, reach)
        self.spans = array.array("Q", spans)
        # step counters: one buffer, state["step"] its 0-D views
        self.steps = torch.tensor([float(state[p]["step"]) for p in self.params], dtype=torch.float32)
        for j, p in enumerate(self.params):
            state[p]["step"] = self.steps[j]
        a = self.args = Args()
        a.rows = ctypes.addressof(rows)
        a.param = self.param_ptrs.buffer_info()[0]
        a.alg, a.pmode, a.sfmt = algorithm_id(lib, alg), PARAM_MODES[fmt.param], STATE_FORMATS[fmt.state]
        # ams: the algorithm's optional slot is kept (Adam's max v with amsgrad)
        a.nslots, a.skip = len(names), int(flags.skip_nonfinite)
        a.ams = int(any(slot.option is not None for slot in alg.active_slots(flags)))
        # 8-bit codes: signed or magnitude codes per slot, as the algorithm declares its slots
        a.signs = sum(1 << k for k, slot in enumerate(alg.active_slots(flags)) if slot.signed)
        a.cautious = int(flags.on("cautious"))
        # a copy of the weights keeps fp32 whatever the state format (Slot.weights); with fp32
        # state every slot is, and the common case's own loops serve it
        a.fp32_slots = sum(
            1 << k for k, slot in enumerate(alg.active_slots(flags)) if slot.weights and fmt.state != "fp32"
        )
        a.omp_parallel = openmp_parallel()

    def _uniform_step(self) -> float | None:
        """The rows' common step count, or None where they differ. Read from the counters each
        step: they are the state dict's, which an in-place checkpoint load may set."""
        s = self.steps
        return float(s[0]) if s.numel() and bool((s == s[0]).all()) else None

    def moved(self) -> bool:
        """True if a parameter no longer lives where the table has it (model.to(), p.data = ...)."""
        locals_ = list(map(_LOCAL, self.params)) if self.dt else self.params
        return array.array("Q", map(_DATA_PTR, locals_)) != self.param_ptrs

    def step(self, grads: list, has: list[bool], all_have: bool, scalars_of) -> None:
        """Step the rows whose parameter has a gradient. ``grads``/``has`` are the whole group's."""
        gs = self.get(grads)
        if all_have:
            sel = None
        else:
            mine = self.get(has)
            if not any(mine):
                return
            sel = list(itertools.compress(range(len(gs)), mine))
            if len(sel) == len(gs):
                sel = None
        if self.dt:
            gs = [None if g is None else g._local_tensor for g in gs]
        keep = []
        chosen = gs if sel is None else [gs[j] for j in sel]
        if not all(map(_IS_CONTIGUOUS, chosen)):
            # a gradient assigned by hand with other strides: read a contiguous copy (in the
            # parameter's element order, as the per-tensor backends read it)
            gs = [g if g is None or g.is_contiguous() else g.contiguous() for g in gs]
            keep = gs
        gp = (
            array.array("Q", (0 if g is None else g.data_ptr() for g in gs)) if sel is not None else _ptrs(gs)
        )
        a = self.args
        a.grad = gp.buffer_info()[0]
        sel_arr = None if sel is None else array.array("q", sel)
        a.nthreads = torch.get_num_threads()
        # steps: every row with a gradient advances; rows of one step number share one call
        uniform = self._uniform_step() if sel is None else None
        if uniform is not None:
            calls = [(uniform + 1, sel_arr)]
        else:
            idx = torch.tensor(sel) if sel is not None else None
            vals = (self.steps if idx is None else self.steps[idx]).tolist()
            by_step: dict[float, list[int]] = {}
            for j, v in zip(sel if sel is not None else range(len(vals)), vals):
                by_step.setdefault(v + 1, []).append(j)
            calls = [(s, array.array("q", js)) for s, js in by_step.items()]
        for step, rows in calls:
            a.sel = None if rows is None else rows.buffer_info()[0]
            a.nrows = len(self.members) if rows is None else len(rows)
            self._copy_aliased(gs, gp, keep)
            hp = [float(x) for x in scalars_of(step)]
            a.hp[: len(hp)] = hp
            a.step = int(step)
            _check(self.lib.adamkit_step(ctypes.byref(a)))
        if sel is None:
            self.steps.add_(1)
        else:
            self.steps.index_add_(0, torch.tensor(sel), torch.ones(len(sel)))
        del keep

    def step_one(self, j: int, g: torch.Tensor, scalars_of) -> None:
        """Step row ``j`` alone with gradient ``g`` (gradient release: a parameter stepped inside
        backward as soon as its gradient is ready). Work independent of the table's size."""
        if self.dt:
            g = g._local_tensor
        if not g.is_contiguous():
            g = g.contiguous()
        if not hasattr(self, "_one"):
            self._one = array.array("Q", bytes(8 * len(self.members)))  # grad pointers by row
        gp, keep = self._one, [g]
        gp[j] = g.data_ptr()
        sel = array.array("q", [j])
        a = self.args
        a.grad, a.sel, a.nrows = gp.buffer_info()[0], sel.buffer_info()[0], 1
        a.nthreads = torch.get_num_threads()
        self._copy_aliased({j: g}, gp, keep)
        step = float(self.steps[j]) + 1
        hp = [float(x) for x in scalars_of(step)]
        a.hp[: len(hp)] = hp
        a.step = int(step)
        _check(self.lib.adamkit_step(ctypes.byref(a)))
        self.steps[j] += 1
        gp[j] = 0
        del keep

    def _copy_aliased(self, gs: list, gp: array.array, keep: list) -> None:
        """Gradients overlapping memory the step writes (another parameter, or its own at another
        offset) are copied first: the per-tensor backends read each gradient before writing."""
        a, spans = self.args, self.spans
        while (
            bad := self.lib.adamkit_grad_overlap(
                ctypes.byref(a), self.psize, spans.buffer_info()[0], len(spans) // 3
            )
        ) >= 0:
            copy = gs[bad].clone()
            keep.append(copy)
            gp[bad] = copy.data_ptr()


def _check(rc: int) -> None:
    if rc == -1:
        raise MemoryError("adamkit's native kernel could not allocate its work table")
    if rc != 0:
        raise RuntimeError(
            f"adamkit's native kernel refused the call ({rc}): an algorithm, format or slot count it "
            "does not have (nothing was changed)"
        )


class GroupPlan:
    """The native kernel's tables for one parameter group, and the parameters it does not serve.

    Built when the group first steps, and again whenever it no longer matches (parameters added,
    moved or re-typed, options changed, a parameter stepped for the first time)."""

    def __init__(self, lib, alg, params: list, state, formats_of, uid_base: int, flags, options: tuple):
        self.ids = list(map(id, params))
        self.flags, self.options = flags, options
        kinds: dict[tuple, list[int]] = {}
        self.loose: list[int] = []  # indices of parameters with state that the kernel does not serve
        planned = [False] * len(params)
        for i, p in enumerate(params):
            if p not in state or "step" not in state[p]:
                continue  # never stepped: no state yet (a gradient later makes the plan rebuild)
            planned[i] = True
            fmt = formats_of(p)
            t = local(p)
            # the cautious mask counts over the whole tensor: a shard's rows cannot (reference)
            whole = not (flags.on("cautious") and is_sharded(p))
            if eligible(p) and supports(alg, fmt, t.dtype, t.device) and whole:
                kinds.setdefault((fmt, t.dtype, is_dtensor(p)), []).append(i)
            else:
                self.loose.append(i)
        self.unplanned = [not x for x in planned]
        self.tables = [
            Table(lib, alg, fmt, members, params, state, [uid_base + i for i in members], flags)
            for (fmt, _, _), members in kinds.items()
        ]
        # group index -> (table, row): gradient release steps one row at a time
        self.row_of = {i: (t, j) for t in self.tables for j, i in enumerate(t.members)}

    def matches(self, params: list, has: list[bool], flags, options: tuple) -> bool:
        return (
            flags == self.flags
            and options == self.options
            and list(map(id, params)) == self.ids
            and not any(itertools.compress(self.unplanned, has))
            and not any(t.moved() for t in self.tables)
        )
