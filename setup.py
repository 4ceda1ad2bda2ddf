"""Build hook: a wheel carries the native kernel prebuilt for x86-64 (AVX2 and AVX-512 levels), so
that a machine without a C compiler still gets it; ``kernels/native.py`` picks the level the CPU
supports at run time. Where the build machine's compiler cannot build a level, the wheel simply
lacks it (the kernel is then built at first use, as from a source checkout). Editable installs
build nothing: a checkout builds the kernel for its own CPU (``-march=native``) at first use."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

# the kernel's flags without -march=native (kernels/native.py, FLAGS)
BASE_FLAGS = [
    "-O3",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=off",
    "-fopenmp-simd",
    "-shared",
    "-fPIC",
    "-pthread",
]
LEVELS = ("x86-64-v3", "x86-64-v4")  # AVX2 + FMA; AVX-512 (F, BW, CD, DQ, VL)


class BuildWithKernel(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or platform.machine() not in ("x86_64", "AMD64"):
            return
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            print("adamkit: no C compiler: the wheel carries no prebuilt kernel", file=sys.stderr)
            return
        src = os.path.join("src", "adamkit", "kernels", "kernel.c")
        out_dir = os.path.join(self.build_lib, "adamkit", "kernels", "prebuilt")
        os.makedirs(out_dir, exist_ok=True)
        # both levels at once: each build is one compiler process of ~25 s on one core
        builds = {
            level: subprocess.Popen(
                [
                    *cc.split(),
                    *BASE_FLAGS,
                    f"-march={level}",
                    "-o",
                    os.path.join(out_dir, f"adamkit_kernel_{level}.so"),
                    src,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for level in LEVELS
        }
        for level, build in builds.items():
            if build.wait() != 0:
                print(f"adamkit: {cc} cannot build the {level} kernel; left out", file=sys.stderr)


class BinaryDistribution(Distribution):
    """The wheel holds machine code: tag it for the platform, not as pure Python."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithKernel}, distclass=BinaryDistribution)
