"""``adamkit train``: the command line of :mod:`adamkit.tools.train` (arguments, the run's header,
resuming a saved run, sampling from it)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import registry, tasks
from .args import positive_float, positive_int
from .tasks import GPTConfig
from .train import GRAD_MODES, RECIPE_FIELDS, TrainConfig, load_checkpoint, train, warmup_steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, m = TrainConfig(), GPTConfig()
    names = [k for k in registry.TRAINABLE if k not in registry.TRAIN_ALIASES]
    lrs = ", ".join(f"{k} {registry.TRAINABLE[k].lr:g}" for k in names)
    parser.add_argument(
        "--optimizer",
        choices=list(registry.TRAINABLE),
        metavar="{" + ",".join(names) + "}",
        default=d.optimizer,
        help="adamw/adam: adamkit's; torch-adamw: torch.optim.AdamW; sgd-momentum (or sgd, its earlier "
        "name): torch.optim.SGD, momentum 0.9 (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=d.steps, help="training steps (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="initialisation and data order (default: 0)")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=None, help=f"peak learning rate (default: {lrs})"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help="windows per step (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=registry.TRAIN_PRECISIONS,
        default=d.precision,
        help="parameter precision recipe; bf16-* need an adamkit optimizer (default: %(default)s)",
    )
    parser.add_argument(
        "--state",
        choices=list(registry.STATE_FORMATS),
        default=d.state,
        help="optimizer-state format for adamkit optimizers (default: %(default)s, the optimizer's own)",
    )
    g = parser.add_argument_group("model")
    g.add_argument("--d-model", type=positive_int, default=m.d_model, help="width (default: %(default)s)")
    g.add_argument("--layers", type=positive_int, default=m.n_layers, help="blocks (default: %(default)s)")
    g.add_argument(
        "--heads", type=positive_int, default=m.n_heads, help="attention heads (default: %(default)s)"
    )
    g.add_argument(
        "--context", type=positive_int, default=m.context, help="characters (default: %(default)s)"
    )
    parser.add_argument(
        "--clip",
        type=float,
        default=d.clip,
        help="clip the gradient's global norm to this before each step; 0: off (default: %(default)s)",
    )
    parser.add_argument(
        "--grads",
        choices=GRAD_MODES,
        default=d.grads,
        help="clip_grad_norm: torch's clipping before the step; fused: the optimizer's max_grad_norm "
        "(same result, no extra pass); release: gradient release (no gradient buffer), clipped by the "
        "previous step's global norm; release-per-tensor: gradient release, each tensor clipped to "
        "its own norm (default: %(default)s)",
    )
    parser.add_argument(
        "--accumulate",
        type=positive_int,
        default=d.accumulate,
        metavar="K",
        help="micro-batches (of --batch-size) per step: with --grads release the optimizer folds them "
        "into its moments without a gradient buffer (v: mean of squares); otherwise true gradient "
        "accumulation (default: %(default)s)",
    )
    io = parser.add_argument_group("checkpoints and samples")
    io.add_argument(
        "--save",
        metavar="PATH",
        help="write a checkpoint (model, optimizer, schedule, data order) at every evaluation and at the end",
    )
    io.add_argument(
        "--resume",
        metavar="PATH",
        help="continue a saved run where it stopped, with its settings, the thread count included "
        "(bit-identical to not stopping); "
        "new checkpoints go to --save",
    )
    io.add_argument(
        "--stop-after",
        type=positive_int,
        metavar="STEP",
        help="stop after this step (resume later with --resume)",
    )
    io.add_argument(
        "--sample", type=int, default=0, metavar="N", help="after training, print N generated characters"
    )
    io.add_argument("--prompt", default="The ", help="text the sample starts from (default: 'The ')")
    io.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# argparse flag of each recipe field, for messages
_FLAGS = {
    "steps": "--steps",
    "seed": "--seed",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "precision": "--precision",
    "state": "--state",
    "model": "--d-model/--layers/--heads/--context",
    "clip": "--clip",
    "grads": "--grads",
    "accumulate": "--accumulate",
    "evals": "--evals",
    "threads": "--threads",
}


def _conflicts(given: TrainConfig, saved: TrainConfig) -> list[str]:
    """Recipe options given on the command line (not left at their default) that differ from the saved run."""
    default = TrainConfig()
    return [
        f"{_FLAGS[k]} (the saved run has {getattr(saved, k)})"
        for k in RECIPE_FIELDS
        if getattr(given, k) != getattr(default, k) and getattr(given, k) != getattr(saved, k)
    ]


def describe(config: TrainConfig) -> str:
    """The run's header: every option of the recipe."""
    spec = registry.TRAINABLE[config.optimizer]
    lr = config.lr if config.lr is not None else spec.lr
    m = config.model
    decay = f"weight decay {spec.weight_decay:g} (matrices only)" if spec.weight_decay else "no weight decay"
    clip = f"gradient norm clipped to {config.clip:g}" if config.clip else "no gradient clipping"
    clip += f" ({config.grads})" if config.grads != "clip_grad_norm" else ""
    return (
        f"training a {m.n_layers}-layer GPT (d_model {m.d_model}, {m.n_heads} heads, context {m.context}) "
        f"on pydoc_data.topics\n"
        f"  {spec.label}, lr {lr:g} (warmup {warmup_steps(config.steps)} steps + cosine to 10%), {decay}, "
        f"{clip}\n"
        f"  --precision {config.precision}, --state {config.state}, batch {config.batch_size}"
        f"{f' x {config.accumulate} micro-batches' if config.accumulate > 1 else ''}, "
        f"{config.steps} steps, seed {config.seed}, {config.threads or torch.get_num_threads()} threads"
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = TrainConfig(
            steps=args.steps,
            seed=args.seed,
            optimizer=args.optimizer,
            lr=args.lr,
            batch_size=args.batch_size,
            precision=args.precision,
            state=args.state,
            model=GPTConfig(
                context=args.context, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads
            ),
            threads=args.threads,
            progress=not args.no_progress,
            clip=args.clip or None,
            grads=args.grads,
            accumulate=args.accumulate,
        )
        registry.optimizer_kwargs(config.optimizer, config.precision, config.state)  # fail before building
        if args.sample < 0:
            raise ValueError(f"--sample must be >= 0, got {args.sample}")
        if args.sample:
            bad = sorted(set(args.prompt) - set(tasks.char_corpus().chars))
            if bad or not args.prompt:
                raise ValueError(
                    f"--prompt must be non-empty text of the corpus's characters; not in it: {bad}"
                )
        if args.resume:
            saved, _ = load_checkpoint(args.resume)
            conflicts = _conflicts(config, saved)
            if conflicts:
                raise ValueError(
                    f"--resume continues the saved run with its own settings; drop {', '.join(conflicts)}"
                )
            config = TrainConfig(
                **{k: getattr(saved, k) for k in RECIPE_FIELDS},
                progress=config.progress,
            )
    except ValueError as err:
        print(f"adamkit train: error: {err}", file=sys.stderr)
        return 2
    print(describe(config))
    if args.resume:
        print(f"resuming {args.resume}")
    try:
        result = train(config, save=args.save, resume=args.resume, stop_after=args.stop_after)
    except registry.RecipeUnavailableError as err:
        print(
            f"adamkit train: error: --precision {config.precision} --state {config.state}: {err}",
            file=sys.stderr,
        )
        return 2
    if result.diverged_at is not None:
        print(
            f"adamkit train: the loss became non-finite at step {result.diverged_at}; try a lower --lr "
            "(or --clip 1)",
            file=sys.stderr,
        )
        return 1
    done = len(result.train_losses)
    if done:
        print(
            f"{result.n_params:,} parameters; train loss {result.train_losses[0]:.3f} -> "
            f"{result.final_train_loss():.3f} (mean of the last 10% of steps)"
        )
    print(
        f"validation loss {result.initial_val_loss:.3f} -> {result.curve[-1].val_loss:.3f} at step "
        f"{result.curve[-1].step} (nats/char, mean over {tasks.VAL_BATCHES} fixed batches of held-out text)"
    )
    if done:
        print(
            f"{result.ms_per_step:.0f} ms/step (median); optimizer state "
            f"{result.state_bytes_per_param:.2f} bytes/param; total time {result.total_s:.1f} s"
        )
    if not result.finished:
        print(
            f"stopped after step {done} of {result.steps}"
            + (f"; resume with --resume {args.save}" if args.save else "")
        )
    if args.save:
        print(f"wrote {args.save}")
    if args.sample:
        text = tasks.generate(result.model, tasks.char_corpus(), args.prompt, args.sample, args.temperature)
        print(f"sample (temperature {args.temperature:g}):\n{args.prompt}{text}")
    return 0
