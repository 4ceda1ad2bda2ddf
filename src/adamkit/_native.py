"""Build, cache and call the native kernel (``_kernel.c``) of the fused backend.

The C source is compiled once per machine with the system's C compiler into a cache directory
(``$ADAMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamkit``, else ``~/.cache/adamkit``), keyed by a
hash of the source, the compiler and the CPU, and loaded with ``ctypes``: about two seconds the first
time on a machine, milliseconds afterwards. ctypes releases the GIL during the call; the kernel
splits each buffer between ``torch.get_num_threads()`` threads of torch's own OpenMP pool (whose
``GOMP_parallel`` this module finds in the process), or of its own where there is none.

Where no compiler is found or the build fails, ``load()`` returns None and the fused backend uses
its ``torch.compile`` kernel instead (which needs a C++ compiler too; without one, ``auto`` falls
back to foreach).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import _quant
from ._math import Scalars

SOURCE = Path(__file__).with_name("_kernel.c")
FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",  # sqrtf as one instruction (the result is the same)
    "-fno-trapping-math",
    "-ffp-contract=off",  # round every operation as the reference backend does
    "-fopenmp-simd",  # honour the kernel's simd reduction pragma (no OpenMP runtime involved)
    "-shared",
    "-fPIC",
    "-pthread",
]

PARAM_MODES = {"native": 0, "plain": 1, "kahan": 2, "sr": 3, "master": 4}
STATE_FORMATS = {"fp32": 0, "bf16": 1, "8bit": 2}
N_HP = len(Scalars.FIELDS)


class Args(ctypes.Structure):
    """Mirror of ``args_t`` in _kernel.c."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("aux", ctypes.c_void_p),
        ("mom", ctypes.c_void_p * 3),
        ("scale", ctypes.c_void_p * 3),
        ("hp", ctypes.c_float * N_HP),
        ("seed", ctypes.c_uint32 * 4),
        ("pmode", ctypes.c_int32),
        ("sfmt", ctypes.c_int32),
        ("amsgrad", ctypes.c_int32),
        ("skip", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
        ("nseg", ctypes.c_int64),
        ("seg_lo", ctypes.c_void_p),
        ("seg_grad", ctypes.c_void_p),
        ("omp_parallel", ctypes.c_void_p),
    ]


def supports(fmt, param_dtype: torch.dtype, device: torch.device) -> bool:
    """Formats the native kernel implements: fp32 or bf16 parameters, fp32/bf16/8-bit moments."""
    if device.type != "cpu" or fmt.param not in PARAM_MODES or fmt.state not in STATE_FORMATS:
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


def _build(cc: str, out: Path) -> str | None:
    """Compile the kernel to ``out`` unless it is there; returns why it failed, or None."""
    if out.exists():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    try:
        cmd = [*cc.split(), *FLAGS, "-o", tmp, str(SOURCE)]
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
    """The loaded library's ``adamkit_step``, or None where it cannot be built here."""
    global _failure
    if os.environ.get("ADAMKIT_NATIVE", "1") == "0":
        _failure = "disabled by ADAMKIT_NATIVE=0"
        return None
    cc = find_compiler("CC", ("gcc", "cc", "clang"))
    if cc is None:
        _failure = "no C compiler found (set CC)"
        return None
    try:
        ver = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        _failure = f"{cc} --version: {type(e).__name__}: {e}"
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + ver.stdout.encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    name = f"adamkit_kernel_{key}.so"
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
    fn = lib.adamkit_step
    fn.argtypes = [ctypes.POINTER(Args)]
    fn.restype = None
    _failure = None
    return fn


@functools.cache
def openmp_parallel() -> int | None:
    """The address of ``GOMP_parallel`` in the OpenMP runtime torch's own parallel operations use,
    so that the kernel runs on torch's thread pool (see _kernel.c); None where torch does not
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


def make_args(flat: dict, fmt) -> Args:
    """The kernel's view of a bucket's flat buffers (pointers stay valid while the bucket lives)."""
    a = Args()
    a.n = flat["param"].numel()
    if a.n % _quant.BLOCK:
        raise ValueError(f"flat buffers must hold whole blocks of {_quant.BLOCK} elements, not {a.n}")
    a.param = flat["param"].data_ptr()
    a.grad = flat["grad"].data_ptr()
    aux = flat.get("kahan_comp", flat.get("master_weight"))
    a.aux = aux.data_ptr() if aux is not None else None
    for k, name in enumerate(("exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
        if name not in flat:  # max_exp_avg_sq: amsgrad only
            continue
        a.mom[k] = flat[name].data_ptr()
        if fmt.state == "8bit":
            a.scale[k] = flat[name + "_scale"].data_ptr()
    a.omp_parallel = openmp_parallel()
    a.pmode = PARAM_MODES[fmt.param]
    a.sfmt = STATE_FORMATS[fmt.state]
    return a


def step(fn, a: Args, scalars: list[float], seeds: list[int], flags, segments=None) -> None:
    """One step of a bucket. ``segments``: ``(starts, grad_pointers)`` of stretches of the flat
    buffers whose gradients are read from elsewhere (see ``args_t``)."""
    if flags.amsgrad and not a.mom[2]:
        raise RuntimeError("amsgrad was switched on after the state was built; rebuild the optimizer")
    a.amsgrad = int(flags.amsgrad)
    a.skip = int(flags.skip_nonfinite)
    a.hp[:] = scalars
    a.seed[:] = seeds
    a.nthreads = torch.get_num_threads()
    if not segments:
        fn(ctypes.byref(a))
        return
    starts, ptrs = segments
    lo = (ctypes.c_int64 * (len(starts) + 1))(*starts, a.n)
    gp = (ctypes.c_void_p * len(ptrs))(*ptrs)
    a.nseg, a.seg_lo, a.seg_grad = len(ptrs), ctypes.addressof(lo), ctypes.addressof(gp)
    try:
        fn(ctypes.byref(a))
    finally:  # the arrays die with this call: never leave the kernel pointing at them
        a.nseg, a.seg_lo, a.seg_grad = 0, None, None
