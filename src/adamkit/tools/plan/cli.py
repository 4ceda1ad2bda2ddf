"""``adamkit plan``: parse the arguments into one call of ``plan()`` or ``per_rank()``, print."""

from __future__ import annotations

import argparse
import json
import sys

from ..presets import PRESETS
from .models import model_from_callable, model_from_config, model_from_count, model_from_preset
from .per_rank import PARALLEL, per_rank
from .recipes import BLOCK_SIZE, MIN_8BIT_SIZE, OPTIMIZERS, PRECISIONS, STATE_FORMATS
from .report import plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``adamkit plan`` arguments."""
    src = parser.add_argument_group("model (one of)").add_mutually_exclusive_group(required=True)
    src.add_argument("--params", metavar="N", help="a parameter count: 70e9, 7.5B, 124M")
    src.add_argument("--preset", choices=list(PRESETS), help="a built-in model shape")
    src.add_argument(
        "--config", metavar="PATH", help="a local Hugging Face config.json or its folder (offline)"
    )
    src.add_argument(
        "--module",
        metavar="MODULE:CALLABLE",
        help="a function returning an nn.Module, built on the meta device",
    )
    rec = parser.add_argument_group("recipe")
    rec.add_argument(
        "--recipe",
        metavar="SPEC",
        help="precision[-state][-optimizer][-amsgrad][-accum], e.g. mixed-bf16 (default), fp32, "
        f"bf16-kahan-8bit, bf16-sr-lion. Precisions: {', '.join(PRECISIONS)}; states: "
        f"{', '.join(STATE_FORMATS)}",
    )
    rec.add_argument("--compare", metavar="SPEC,SPEC,...", help="several recipes side by side")
    rec.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        default="adamw",
        help="the optimizer of recipes that name none (default: %(default)s)",
    )
    rec.add_argument(
        "--state-format",
        choices=["auto", "param", "fp32", "bf16", "8bit"],
        default="auto",
        help="state storage of recipes that name none; auto: fp32 with master weights, else the "
        "parameters' dtype (default: %(default)s)",
    )
    rec.add_argument("--amsgrad", action="store_true", help="Adam/AdamW keep max_v")
    rec.add_argument(
        "--grad-accum",
        action="store_true",
        help="an fp32 gradient-accumulation buffer (with --gradient-release: none, optimizer accumulation)",
    )
    rec.add_argument(
        "--gradient-release",
        action="store_true",
        help="step each parameter in backward and free its gradient: one gradient at a time",
    )
    rec.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="8-bit group length")
    rec.add_argument(
        "--min-8bit-size", type=int, default=MIN_8BIT_SIZE, help="smallest tensor stored in 8 bit"
    )
    dev = parser.add_argument_group("devices and activations")
    dev.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0, help="ZeRO stage")
    dev.add_argument("--devices", type=int, default=1, help="data-parallel devices to shard over")
    dev.add_argument(
        "--per-rank",
        choices=list(PARALLEL),
        help="exact bytes of each of --devices ranks as FSDP2 (fully_shard) or DDP + "
        "ZeroRedundancyOptimizer lay them out, with an adamkit optimizer (instead of ZeRO stages)",
    )
    dev.add_argument("--device-memory", type=float, metavar="GB", help="memory per device: fits yes/no")
    dev.add_argument("--batch-size", type=int, help="micro-batch per device, for activations")
    dev.add_argument("--seq-len", type=int, help="sequence length, for activations")
    dev.add_argument(
        "--recompute",
        choices=["none", "selective", "full"],
        default="none",
        help="activation recomputation: selective drops the attention scores, full keeps layer inputs",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run ``adamkit plan``: 0 on success, 2 on bad input (the message goes to stderr)."""
    try:
        if args.recipe and args.compare:
            raise ValueError("give --recipe or --compare, not both")
        if args.params is not None:
            model = model_from_count(args.params)
        elif args.preset is not None:
            model = model_from_preset(args.preset)
        elif args.config is not None:
            model = model_from_config(args.config)
        else:
            model = model_from_callable(args.module)
        recipes = [s.strip() for s in args.compare.split(",") if s.strip()] if args.compare else args.recipe
        if args.per_rank:
            extra = (args.zero, args.batch_size, args.seq_len, args.device_memory, args.grad_accum)
            if any(x not in (None, 0, False) for x in extra):
                raise ValueError(
                    "--per-rank counts parameters, gradients and optimizer state per rank: it takes no "
                    "--zero, --batch-size, --seq-len, --device-memory or --grad-accum"
                )
            names = recipes if isinstance(recipes, list) else [recipes or "mixed-bf16"]
            ranked = [
                per_rank(
                    model,
                    r,
                    parallel=args.per_rank,
                    devices=args.devices,
                    optimizer=args.optimizer,
                    state_format=None if args.state_format == "param" else args.state_format,
                    amsgrad=args.amsgrad,
                    block_size=args.block_size,
                    min_8bit_size=args.min_8bit_size,
                )
                for r in names
            ]
            if args.json:
                print(json.dumps([r.to_dict() for r in ranked], indent=2))
            else:
                print("\n\n".join(r.table() for r in ranked))
            return 0
        result = plan(
            model,
            recipes or "mixed-bf16",
            optimizer=args.optimizer,
            state_format=None if args.state_format == "param" else args.state_format,
            amsgrad=args.amsgrad,
            grad_accum=args.grad_accum,
            gradient_release=args.gradient_release,
            zero_stage=args.zero,
            devices=args.devices,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            recompute=args.recompute,
            device_memory=args.device_memory,
            block_size=args.block_size,
            min_8bit_size=args.min_8bit_size,
        )
    except (ValueError, TypeError) as e:
        print(f"adamkit plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0
