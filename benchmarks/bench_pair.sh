#!/usr/bin/env bash
# Two versions of adamkit, one process each, in the order old, new, new, old (the machine's memory
# bandwidth drifts between processes: each version sees the drift from both sides):
#   git archive <old commit> | tar -x -C /tmp/old
#   bash benchmarks/bench_pair.sh /tmp/old/src src
set -euo pipefail
old=${1:?old src directory}
new=${2:?new src directory}
impls="torch fused,adamkit fused,adamkit fused, bf16 state,adamkit fused, 8-bit state,adamkit fused, bf16 + Kahan, 8-bit state"
for src in "$old" "$new" "$new" "$old"; do
  echo "=== $src"
  PYTHONPATH=$src .venv/bin/python -m adamkit bench --threads 2 --cases a,b,c,d --impls "$impls" \
    --repeats 5 --no-arithmetic | grep -E '^\|'
done
