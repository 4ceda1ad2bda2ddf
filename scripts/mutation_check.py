"""Break each of ten behaviours on purpose and check that the test suite notices.

For each mutation: a fresh copy of a commit (``git archive``), one line of the source replaced, a
private kernel cache (C mutations rebuild the native kernel), then ``pytest -x`` over the
test files of the numerical layers (``FILES``, found by name in either layout). A mutation is
*caught* when pytest reports a failure (exit 1); the first failing test is shown, so that a catch
by an unrelated test would show.

    python scripts/mutation_check.py [--commit REV] [--only NAME ...]

Used to show that reorganizing the tests kept what they catch: run it on the commits before and
after, and compare the two tables.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to src/adamkit
    old: str
    new: str
    behaviour: str


MUTATIONS = [
    Mutation(
        "rne-ties",
        "kernels/kernel.c",
        "uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;",
        "uint32_t r = (u + 0x8000u) >> 16;",
        "native: bf16 round to nearest sends ties to even",
    ),
    Mutation(
        "amsgrad-nan",
        "kernels/kernel.c",
        "s[2] = (x > v || x != x) ? x : v; /* torch.maximum: nan wins */",
        "s[2] = (x > v) ? x : v;",
        "native: AMSGrad's running max keeps a nan (torch.maximum)",
    ),
    Mutation(
        "skip-slot2",
        "kernels/kernel.c",
        "s[2] = ok ? s[2] : o2;",
        "s[2] = s[2];",
        "native: skip_nonfinite keeps the third slot (max v) of a skipped element",
    ),
    Mutation(
        "bf16-state-stream",
        "kernels/kernel.c",
        "uint16_t *s = (uint16_t *)R->slot[k] + e;\n            uint32_t w = weyl(i0, seed[k + 1]);",
        "uint16_t *s = (uint16_t *)R->slot[k] + e;\n            uint32_t w = weyl(i0, seed[k]);",
        "native: bf16 state draws its rounding bits from its own stream",
    ),
    Mutation(
        "kahan-comp-rne",
        "kernels/kernel.c",
        "cs[i] = f_to_bf16_sr(P[i] - bf16_to_f(h), w);",
        "cs[i] = f_to_bf16_rne(P[i] - bf16_to_f(h));",
        "native: the bf16 Kahan compensation is rounded stochastically",
    ),
    Mutation(
        "lion-sign-zero",
        "kernels/kernel.c",
        "c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c)",
        "c >= 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c)",
        "native: Lion's sign(0) is 0",
    ),
    Mutation(
        "l2-two-roundings",
        "kernels/kernel.c",
        "if (hp[A_L2] != 0.0f) g = fmaf(*p, hp[A_L2], g);",
        "if (hp[A_L2] != 0.0f) g = g + *p * hp[A_L2];",
        "native: Adam's L2 term is added with one rounding (torch's grad.add(p, alpha=wd))",
    ),
    Mutation(
        "8bit-signs",
        "kernels/native.py",
        "a.signs = sum(1 << k for k, slot in enumerate(alg.active_slots(flags)) if slot.signed)",
        "a.signs = sum(1 << k for k, slot in enumerate(alg.active_slots(flags)) if not slot.signed)",
        "native: 8-bit codes signed or magnitude per slot, from the declaration",
    ),
    Mutation(
        "kahan-from-master",
        "optim/layout.py",
        "return (v - p.detach().float()).to(p.dtype)",
        "return (v.to(p.dtype).float() - p.detach().float()).to(p.dtype)",
        "checkpoint: a master weight converted to a Kahan pair keeps its value",
    ),
    Mutation(
        "maximize",
        "kernels/compose.py",
        "    elif f.maximize:\n        g = -g",
        "    elif f.maximize:\n        g = g",
        "every backend: maximize flips the gradient's sign",
    ),
]

# The test files that hold these behaviours (the numerical layers: kernels, storage, algorithms,
# state), found by name wherever a layout of the tests puts them; the multi-process, wheel, timing
# and tool tests are left out: they take minutes and test distribution, speed or the CLI.
FILES = (
    "test_kernel_parity.py",
    "test_fused.py",
    "test_8bit.py",
    "test_precision.py",
    "test_adam.py",
    "test_lion.py",
    "test_variants.py",
    "test_state.py",
    "test_user_recipes.py",
)


def checkout(commit: str, into: Path) -> None:
    data = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")


def run(m: Mutation, commit: str) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix="adamkit-mutation-") as d:
        work = Path(d)
        checkout(commit, work)
        path = work / "src" / "adamkit" / m.path
        text = path.read_text()
        if text.count(m.old) != 1:
            return "not applied", 0.0, f"{m.old!r} occurs {text.count(m.old)} times"
        path.write_text(text.replace(m.old, m.new))
        env = dict(os.environ, PYTHONPATH=str(work / "src"), ADAMKIT_CACHE_DIR=str(work / "cache"))
        files = sorted(str(f.relative_to(work)) for name in FILES for f in (work / "tests").rglob(name))
        args = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", *files]
        t = time.perf_counter()
        r = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
        verdict = {0: "SURVIVED", 1: "caught"}.get(r.returncode, f"error (pytest exit {r.returncode})")
        return verdict, elapsed, failed[0].removeprefix("FAILED ")[:120] if failed else r.stdout[-300:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commit", default="HEAD")
    ap.add_argument("--only", nargs="*", help="mutation names")
    args = ap.parse_args()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.commit], cwd=ROOT, capture_output=True, text=True
    )
    print(f"commit {rev.stdout.strip()}\n")
    print("| mutation | behaviour | verdict | seconds | first failing test |")
    print("|---|---|---|---|---|")
    survived = 0
    for m in MUTATIONS:
        if args.only and m.name not in args.only:
            continue
        verdict, sec, detail = run(m, args.commit)
        survived += verdict != "caught"
        print(f"| {m.name} | {m.behaviour} | {verdict} | {sec:.0f} | {detail} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
