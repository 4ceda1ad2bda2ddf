#!/usr/bin/env bash
# The whole test suite, three times over what can differ between machines of one kind:
#   1. as this host computes;
#   2. as on a host whose vector math library rounds fp32 sqrt and division 1 ulp off in a fifth
#      of the elements (tests/host_rounding.py): nothing may depend on this host's rounding;
#   3. the native kernel's parity with the reference, on the x86-64-v3 (AVX2) build a wheel
#      carries, where this CPU has more (AVX-512).
# Arguments go to the first run (e.g. -x, -k EXPR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" -m pytest "$@"
"$PY" -m pytest --perturb-rounding
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    ADAMKIT_NATIVE_MARCH=x86-64-v3 "$PY" -m pytest tests/test_kernel_parity.py tests/test_state.py
fi
