"""The ``adamkit`` command: parses arguments and prints; the work lives in importable modules.

Each subcommand's module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``adamkit plan`` never pays for building a model.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("adamkit.tools.train", "train a small character-level GPT on CPython's bundled docs"),
    "plan": ("adamkit.tools.plan", "plan training memory: params, grads, optimizer state, per device"),
    "bench": ("adamkit.tools.bench", "benchmark optimizer steps against torch (and peers if installed)"),
    "race": ("adamkit.tools.race", "race optimizer/precision recipes on one task; PNG, table, JSON"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # Only the chosen subcommand's module is imported (its arguments are needed to parse).
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
