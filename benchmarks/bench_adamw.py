"""AdamW step benchmark: the same as ``adamkit bench``; writes benchmarks/results/bench.json.

python benchmarks/bench_adamw.py --threads 2 --compile-overhead
"""

import sys
from pathlib import Path

from adamkit.tools.cli import main

if __name__ == "__main__":
    out = Path(__file__).parent / "results" / "bench.json"
    sys.exit(main(["bench", "--json", str(out), *sys.argv[1:]]))
