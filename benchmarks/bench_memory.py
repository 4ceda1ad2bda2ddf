"""Peak memory of an optimizer's first steps: how much the process's peak RSS grows over the
parameters and gradients the model already holds, against the optimizer state's own bytes.

Each contender runs in a fresh process (peak RSS only ever grows): it allocates N parameters of
a transformer-like set of shapes and their gradients, touches them, records the peak RSS, runs two
steps, and records it again. torch's fused AdamW grows it by its state (2x the fp32 parameters'
bytes) plus a fixed amount (~74 MiB here, the same for every contender, torch's included); the
flat layout adamkit used to have needed 6x.

    python benchmarks/bench_memory.py --params 64e6 --json benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONTENDERS = {
    "torch fused": ("torch.optim.AdamW(ps, fused=True)", "float32"),
    "adamkit fused": ("adamkit.AdamW(ps, backend='fused')", "float32"),
    "adamkit fused, bf16 state": ("adamkit.AdamW(ps, backend='fused', state_format='bf16')", "float32"),
    "adamkit fused, 8-bit state": ("adamkit.AdamW(ps, backend='fused', state_format='8bit')", "float32"),
    "torch fused, bf16 params": ("torch.optim.AdamW(ps, fused=True)", "bfloat16"),
    "adamkit fused, bf16 + Kahan, 8-bit state": (
        "adamkit.AdamW(ps, backend='fused', state_format='8bit')",
        "bfloat16",
    ),
    "adamkit fused, Lion 8-bit state": ("adamkit.Lion(ps, backend='fused', state_format='8bit')", "bfloat16"),
}

CHILD = """
import resource, json, torch, adamkit
torch.set_flush_denormal(True)
n, dtype = {n}, torch.{dtype}
sizes, left = [], n
while left > 0:  # transformer-like: mostly matrices of 1M-4M, a few small tensors
    s = min(left, (1 << 22) if len(sizes) % 3 else (1 << 20) + 4096)
    sizes.append(s)
    left -= s
ps = [torch.randn(s, dtype=dtype).requires_grad_() for s in sizes]
for p in ps:
    p.grad = torch.randn_like(p)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
opt = {make}
for _ in range(2):
    opt.step()
after = peak()
state = sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
print(json.dumps(dict(growth=after - before, state=state, params=sum(p.nbytes for p in ps))))
"""


def measure(name: str, n: int) -> dict:
    make, dtype = CONTENDERS[name]
    code = CHILD.format(n=n, dtype=dtype, make=make)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(name=name, growth_vs_params=r["growth"] / r["params"], growth_vs_state=r["growth"] / r["state"])
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=64e6, help="parameters (default 64e6)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    rows = [measure(name, int(args.params)) for name in CONTENDERS]
    print(f"peak RSS growth over the first two steps, {int(args.params) / 1e6:.0f}M parameters")
    print("| optimizer | params MiB | state MiB | peak growth MiB | growth - state MiB | growth / params |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['params'] / 2**20:.0f} | {r['state'] / 2**20:.0f} "
            f"| {r['growth'] / 2**20:.0f} "
            f"| {(r['growth'] - r['state']) / 2**20:.0f} | {r['growth_vs_params']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
