"""A wheel carries the native kernel prebuilt (setup.py): installed on a machine without a C
compiler, adamkit still steps on it, picking the level of x86-64 this CPU runs."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, shutil, torch, adamkit
from adamkit.kernels import native
assert shutil.which("gcc") is None and shutil.which("cc") is None, "a compiler is reachable"
torch.manual_seed(0)
ps = [torch.randn(300, 7, requires_grad=True), torch.randn(1000, requires_grad=True)]
qs = [p.detach().clone().requires_grad_() for p in ps]
a = adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="fused", state_format="8bit", min_8bit_size=0)
b = adamkit.AdamW(qs, lr=1e-2, weight_decay=0.1, backend="reference", state_format="8bit", min_8bit_size=0)
for _ in range(3):
    for p, q in zip(ps, qs):
        g = torch.randn(p.shape)
        p.grad, q.grad = g.clone(), g.clone()
    a.step()
    b.step()
tables = sum(len(t.params) for plan in a._plans.values() for t in plan.tables)
diff = max((p - q).abs().max().item() for p, q in zip(ps, qs))
print(json.dumps(dict(file=adamkit.__file__, loaded=native.loaded_from, failure=native.failure(),
                      tables=tables, diff=diff)))
"""


@pytest.mark.slow  # builds and installs a wheel
@pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86-64 Linux"
)
def test_wheel_steps_on_its_prebuilt_kernel_without_a_compiler(tmp_path):
    # built from a copy: setuptools leaves build/ behind in the tree it builds
    proj = tmp_path / "proj"
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, proj / name)
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(proj),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            "-q",
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = out.glob("adamkit-*.whl")
    assert "linux_x86_64" in wheel.name  # machine code inside: a platform wheel
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:  # what installing a wheel does to its files
        names = z.namelist()
        z.extractall(site)
    assert "adamkit/kernels/prebuilt/adamkit_kernel_x86-64-v3.so" in names
    assert "adamkit/kernels/prebuilt/adamkit_kernel_x86-64-v4.so" in names
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    env.update(PATH=str(empty), PYTHONPATH=str(site), ADAMKIT_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(site))  # the wheel's adamkit, not the checkout's
    from adamkit.kernels import native

    flags = native._cpu_flags()
    want = next(level for level, needs in native.LEVELS.items() if needs <= flags)
    assert res["loaded"] == f"prebuilt {want}" and res["tables"] == 2
    # the same arithmetic as the kernel built here: equal to the reference within the native
    # kernel's fp32 bound (test_adam.NATIVE_FP32_TOL; 8-bit state draws the same rounding bits)
    assert res["diff"] < 1e-6
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing was built
