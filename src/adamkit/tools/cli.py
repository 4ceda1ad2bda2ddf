"""The ``adamkit`` command: parses arguments and prints; the work lives in importable modules.

Each subcommand's module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``adamkit plan`` never pays for building a model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    summary: str  # one line, in the list of commands
    about: str  # a paragraph, at the top of the command's --help
    examples: tuple[str, ...]


COMMANDS = {
    "train": Command(
        "adamkit.tools.train_cli",
        "train a small character-level GPT on the documentation every CPython carries",
        "Trains a 0.8M-parameter GPT on CPython's pydoc_data.topics (no download) with one optimizer "
        "and precision recipe, and reports the held-out validation loss, step time and optimizer "
        "memory. About a minute on 2 cores.",
        (
            "adamkit train",
            "adamkit train --precision bf16-kahan --state 8bit --seed 1",
            "adamkit train --save run.pt --stop-after 300 && adamkit train --resume run.pt --save run.pt",
            "adamkit train --sample 300",
        ),
    ),
    "plan": Command(
        "adamkit.tools.plan.cli",
        "plan training memory: parameters, gradients, optimizer state, per device",
        "Breaks training memory into parameters, gradients, master weights, moments, Kahan buffers, "
        "8-bit scales and (optionally) activations, per device under ZeRO 0-3. Nothing is allocated.",
        (
            "adamkit plan --params 7e9",
            "adamkit plan --preset llama-3-8b --compare mixed-bf16,bf16-sr-8bit --device-memory 80",
            "adamkit plan --config path/to/config.json --zero 3 --devices 8",
            "adamkit plan --module mymodel:build   # mymodel.py in the current directory",
            "adamkit plan --preset gpt2 --per-rank fsdp2 --devices 8 --recipe bf16-kahan-8bit",
        ),
    ),
    "bench": Command(
        "adamkit.tools.bench",
        "time optimizer steps against torch (and optimi, bitsandbytes, torchao if installed)",
        "Times AdamW steps of torch's and adamkit's implementations in one process, interleaved round "
        "by round, against a memory-streaming probe. Minutes at full scale; run it on a quiet machine.",
        (
            "adamkit bench --threads 2 --cases b",
            'adamkit bench --impls "torch fused,adamkit fused" --scale 0.25 --repeats 5',
        ),
    ),
    "race": Command(
        "adamkit.tools.race",
        "race optimizer and precision recipes on one task; writes a picture, a table and JSON",
        "Trains the same model from the same weights on the same batches with each recipe and writes "
        "race.png (loss relative to fp32 AdamW, optimizer memory, step time), race.md and race.json.",
        (
            "adamkit race --quick",
            "adamkit race --threads 2 --out docs/race",
            "adamkit race --recipes adamkit-adamw,bf16-sr,8bit-state --steps 200",
        ),
    ),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and names every option's default (unless its help does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    import torch

    import adamkit

    return f"adamkit {adamkit.__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamkit",
        description="Adam-family optimizers for PyTorch: faster and leaner drop-ins for "
        "torch.optim.Adam/AdamW. These commands train with them, race them, plan their memory and "
        "benchmark them.",
        epilog="Run 'adamkit COMMAND --help' for a command's options and examples.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=cmd.summary,
            description=textwrap.fill(cmd.about, 100),
            epilog="examples:\n" + "\n".join(f"  {e}" for e in cmd.examples),
            formatter_class=HelpFormatter,
        )
        # Only the chosen subcommand's module is imported (its arguments are needed to parse).
        if argv and argv[0] == name:
            importlib.import_module(cmd.module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command].module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
