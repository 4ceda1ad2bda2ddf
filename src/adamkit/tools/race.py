"""``adamkit race``: train one model with several optimizer/precision recipes and compare them.

Every recipe starts from the same initial weights (same seed), sees the same batches in the same
order and follows the same warmup + cosine lr schedule; only the optimizer, its peak lr (SGD needs
a larger one) and the precision/state options differ. The race writes ``race.json`` (every curve),
``race.md`` (the table) and ``race.png`` (validation loss against steps and against training time;
needs matplotlib, the optional ``adamkit[plot]`` extra).

Library entry points: :func:`race` (returns a :class:`RaceResult`), :func:`write` (the three files),
:func:`markdown`, :func:`to_json`, :func:`plot`. Recipes live in :data:`RECIPES`; adding one is
adding a row. A recipe whose options the installed adamkit does not accept yet is skipped with a
note, never faked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import race_plot, registry, tasks
from .args import positive_int
from .race_plot import PLOT_MISSING, relative_curves  # noqa: F401  (the race's public names)
from .train import TrainResult, fit, warmup_steps

# --------------------------------------------------------------------------------------------------
# Recipes and race settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """An optimizer (a key of ``registry.TRAINABLE``) with a precision, a state format and how the
    gradients reach it (``grads``: a mode of ``train.GRAD_MODES``, e.g. ``"release"``)."""

    name: str
    optimizer: str
    precision: str = "fp32"
    state: str = "default"
    grads: str = "clip_grad_norm"

    def describe(self) -> str:
        parts = [registry.TRAINABLE[self.optimizer].label]
        if self.precision != "fp32":
            parts.append(registry.PRECISIONS[self.precision].about)
        if self.state != "default":
            parts.append(f"{self.state} state")
        if self.grads == "release":
            parts.append("gradient release")
        return ", ".join(parts)


# The contenders, one row each: a new optimizer (a row of registry.TRAINABLE) joins the race with one
# line here, e.g. Recipe("lion", "lion").
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("sgd-momentum", "sgd-momentum"),
        Recipe("torch-adamw", "torch-adamw"),
        Recipe("adamkit-adam", "adam"),
        Recipe("adamkit-adamw", "adamw"),
        Recipe("adamw-release", "adamw", grads="release"),  # no gradient buffer: peak RSS shows it
        Recipe("bf16-kahan", "adamw", precision="bf16-kahan"),
        # bf16 params + int8 Kahan + 8-bit m, v: ~5 B/param of parameters and state
        Recipe("bf16-kahan8-8bit", "adamw", precision="bf16-kahan8", state="8bit"),
        Recipe("bf16-sr", "adamw", precision="bf16-sr"),
        Recipe("bf16-master", "adamw", precision="bf16-master"),
        Recipe("bf16-state", "adamw", state="bf16"),
        Recipe("8bit-state", "adamw", state="8bit"),
        Recipe("lion", "lion"),  # m only: 4 B/param of state
        Recipe("lion-bf16-kahan-8bit", "lion", precision="bf16-kahan", state="8bit"),  # ~1 + 2 B/param
        Recipe("adafactor", "adafactor"),  # factored v: ~0 B/param on matrices
        Recipe("came", "came"),  # m + factored v and confidence: ~4 B/param
        Recipe("adam-mini", "adam-mini"),  # m + one v per row: ~4 B/param
        Recipe("lamb", "lamb"),  # m, v: 8 B/param
        Recipe("muon", "muon"),  # momentum on hidden matrices (4 B/param), AdamW's m, v elsewhere
        Recipe("adopt", "adopt"),  # m, v: 8 B/param; the update normalized by the previous v
        Recipe("stable-adamw", "stable-adamw"),  # m, v: 8 B/param; the lr clipped per tensor
        Recipe("ademamix", "ademamix"),  # m, v and a slow m: 12 B/param
        Recipe("schedule-free", "schedule-free"),  # z, v: 8 B/param; no lr schedule, eval at x
        Recipe("adamw-cautious", "adamw-cautious"),  # AdamW's state; the cautious mask
    )
}

# The learning-rate sweep (``race(..., sweep=True)``): every optimizer of the race at the same
# multiples of its paper's lr (``registry.PAPER_LR``) on the quick race; the best validation loss
# gives the lr it races at (every recipe of that optimizer alike).
LR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
# Another implementation of one algorithm races at that algorithm's lr: the race compares the
# implementations, and a second sweep of the same function would pick by noise (on the quick race
# torch's AdamW and adamkit's differ by 0.01 nats at 3e-3 and 1e-2 and pick different ones).
SWEEP_AS = {"torch-adamw": "adamw"}


@dataclass
class Sweep:
    """The quick race's validation loss of each optimizer at each lr, and the lr chosen."""

    description: str  # the quick race's task and model
    steps: int
    tried: dict[str, dict[float, float | None]]  # optimizer -> lr -> val loss (None: diverged)
    chosen: dict[str, float]  # optimizer -> the lr with the lowest validation loss


def unavailable(recipe: Recipe) -> str | None:
    """Why the installed adamkit cannot run ``recipe`` (``None`` if it can).

    Builds the recipe's optimizer over a tiny model: an option adamkit does not accept yet raises.
    """
    probe = registry.cast_model(nn.utils.skip_init(nn.Linear, 2, 2), recipe.precision)  # no RNG draw
    try:
        registry.build_optimizer(probe, recipe.optimizer, precision=recipe.precision, state=recipe.state)
    except registry.RecipeUnavailableError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class Setting:
    """A task at a size: the default race, or ``--quick`` (a tiny model and few steps, for tests)."""

    steps: int
    make_task: Callable[[], Any]
    model: str  # a few words for the report
    # Tiny models gain nothing from a second thread, and on a busy machine (another process on a
    # core) two threads wait on each other at every op: one thread keeps --quick under a minute.
    threads: int | None = None  # None: torch's default


SETTINGS: dict[tuple[str, bool], Setting] = {
    # ~90 ms/step on 2 cores: 400 steps is ~40 s per recipe, < 7 min for all nine.
    ("gpt", False): Setting(
        400, lambda: tasks.CharTask(tasks.GPTConfig(), batch_size=32), "GPT 4x128, context 64"
    ),
    ("gpt", True): Setting(
        60,
        lambda: tasks.CharTask(tasks.GPTConfig(context=32, d_model=32, n_layers=2, n_heads=2), batch_size=16),
        "GPT 2x32, context 32",
        threads=1,
    ),
    ("digits", False): Setting(600, lambda: tasks.DigitsTask(hidden=128, batch_size=64), "MLP 64-128-128-10"),
    ("digits", True): Setting(
        100, lambda: tasks.DigitsTask(hidden=32, batch_size=32), "MLP 64-32-32-10", threads=1
    ),
}
TASKS = ("gpt", "digits")


# --------------------------------------------------------------------------------------------------
# The race
# --------------------------------------------------------------------------------------------------


@dataclass
class RaceResult:
    task: str
    description: str  # the task and model in words
    steps: int
    seed: int
    threads: int
    runs: dict[str, TrainResult]  # recipe name -> result, in race order
    recipes: dict[str, Recipe]
    skipped: dict[str, str] = field(default_factory=dict)  # recipe name -> why it was not run
    failed: dict[str, str] = field(default_factory=dict)  # recipe name -> the error that stopped it
    sweep: Sweep | None = None  # where the lrs came from (None: the registry's)


def _describe_error(err: Exception) -> str:
    """``Type: message (at file:line)``, the line being the innermost frame of the traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def parse_recipes(text: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, checked against :data:`RECIPES` (``None``: all of them)."""
    if text is None:
        return list(RECIPES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise ValueError(
            f"unknown recipe(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(RECIPES)}"
        )
    return list(dict.fromkeys(names))


def race(
    task: str = "gpt",
    recipes: list[str] | None = None,
    *,
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    evals: int = 10,
    untimed_steps: int = 2,
    threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    sweep: bool = False,
) -> RaceResult:
    """Train ``task``'s model once per recipe (default: every registered one) and collect the runs.

    ``sweep``: first the learning-rate sweep (:data:`LR_GRID` times each optimizer's paper lr, on
    the quick race of ``task``), then every recipe at its optimizer's best lr there; otherwise at
    the registry's lr (``registry.TRAINABLE``).

    Each recipe first runs a throwaway run of ``untimed_steps`` steps (its time goes to
    ``TrainResult.untimed_s``), so one-time costs such as compilation are not timed.
    Unavailable recipes are skipped (``log`` gets a note; ``RaceResult.skipped`` says why); a recipe
    whose run raises is reported in ``RaceResult.failed`` and the race goes on.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    names = list(RECIPES) if recipes is None else parse_recipes(",".join(recipes))
    setting = SETTINGS[(task, quick)]
    steps = setting.steps if steps is None else steps
    threads = setting.threads if threads is None else threads
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        found = None
        if sweep:
            optimizers = list(
                dict.fromkeys(SWEEP_AS.get(RECIPES[n].optimizer, RECIPES[n].optimizer) for n in names)
            )
            found = sweep_lrs(task, optimizers, seed=seed, log=log)
            torch.set_num_threads(before if threads is None else threads)
        result = _race(task, names, setting, steps, seed, evals, untimed_steps, progress, log, found)
        result.sweep = found
        return result
    finally:
        torch.set_num_threads(before)


def sweep_lrs(
    task: str, optimizers: list[str], *, seed: int = 0, log: Callable[[str], None] = print
) -> Sweep:
    """Each optimizer at ``LR_GRID`` times its paper's lr on the quick race of ``task`` (fp32,
    default state); the chosen lr is the one with the lowest final validation loss."""
    setting = SETTINGS[(task, True)]
    the_task = setting.make_task()
    before = torch.get_num_threads()
    if setting.threads is not None:
        torch.set_num_threads(setting.threads)
    torch.set_flush_denormal(True)
    tried: dict[str, dict[float, float | None]] = {}
    chosen: dict[str, float] = {}
    try:
        for name in optimizers:
            tried[name] = {}
            for k in LR_GRID:
                lr = float(f"{registry.PAPER_LR[name] * k:.3g}")
                run = fit(the_task, name, steps=setting.steps, seed=seed, lr=lr, evals=1, progress=False)
                ok = run.diverged_at is None and math.isfinite(run.val_loss)
                tried[name][lr] = run.val_loss if ok else None
            finite = {lr: v for lr, v in tried[name].items() if v is not None}
            if not finite:
                raise RuntimeError(f"every lr of the sweep diverged for {name}: {sorted(tried[name])}")
            chosen[name] = min(finite, key=finite.get)
            log(
                f"lr sweep {name}: "
                + ", ".join(
                    f"{lr:g} {'diverged' if v is None else f'{v:.3f}'}" for lr, v in tried[name].items()
                )
                + f" -> {chosen[name]:g}"
            )
    finally:
        torch.set_num_threads(before)
    return Sweep(f"{the_task.description} ({setting.model})", setting.steps, tried, chosen)


def _race(
    task: str,
    names: list[str],
    setting: Setting,
    steps: int,
    seed: int,
    evals: int,
    untimed_steps: int,
    progress: bool,
    log: Callable[[str], None],
    found: Sweep | None = None,
) -> RaceResult:
    torch.set_flush_denormal(True)  # denormals slow fp32 CPU math ~20x
    the_task = setting.make_task()
    result = RaceResult(
        task=task,
        description=f"{the_task.description} ({setting.model})",
        steps=steps,
        seed=seed,
        threads=torch.get_num_threads(),
        runs={},
        recipes={n: RECIPES[n] for n in names},
    )
    for i, name in enumerate(names, 1):
        recipe = RECIPES[name]
        why = unavailable(recipe)
        if why is not None:
            result.skipped[name] = why
            log(f"skipping {name}: {why}")
            continue
        kwargs = dict(seed=seed, precision=recipe.precision, state=recipe.state, grads=recipe.grads)
        if found is not None:
            kwargs["lr"] = found.chosen[SWEEP_AS.get(recipe.optimizer, recipe.optimizer)]
        try:
            # A throwaway run first: one-time costs (compiling adamkit's fused kernels, allocator
            # growth) would otherwise land on whichever recipe happens to run first.
            t0 = time.perf_counter()
            if untimed_steps:
                fit(the_task, recipe.optimizer, steps=untimed_steps, evals=1, progress=False, **kwargs)
            untimed_s = time.perf_counter() - t0
            run = fit(
                the_task,
                recipe.optimizer,
                steps=steps,
                evals=evals,
                progress=progress,
                desc=f"[{i}/{len(names)}] {name}",
                **kwargs,
            )
        except Exception as err:  # one broken recipe must not cost the others their results
            result.failed[name] = _describe_error(err)
            log(f"{name} failed: {result.failed[name]}")
            continue
        run.untimed_s = untimed_s
        result.runs[name] = run
        if run.diverged_at is not None:
            log(f"{name}: the loss became non-finite at step {run.diverged_at}; the run stopped there")
    return result


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------

SCHEDULE = (
    "linear warmup over the first 5% of steps, then cosine decay to 10% of the peak lr "
    "(Schedule-Free: the same warmup inside the optimizer, then a constant lr, evaluated at its average x)"
)
MEMORY_NOTE = (
    "peak RSS growth: the process's peak resident memory during the recipe's run minus its resident "
    "memory at the start (Linux VmHWM, reset before each run): model, gradients, optimizer state, "
    "activations and allocator overhead. Noisy at the ~1 MiB level."
)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _fmt(x: float | None, spec: str) -> str:
    return "—" if _finite(x) is None else format(x, spec)


def markdown(result: RaceResult) -> str:
    """The race's table and notes, in Markdown."""
    lines = [
        f"# adamkit race: {result.description}",
        "",
        f"{result.steps} steps, seed {result.seed}, {result.threads} threads; every recipe starts from the "
        f"same weights and sees the same batches; lr schedule: {SCHEDULE}.",
        "",
        "| recipe | optimizer | peak lr | train loss | val loss | ms/step | state B/param | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in result.runs.items():
        val = "diverged" if run.diverged_at is not None else _fmt(run.val_loss, ".3f")
        mib = None if run.peak_rss_bytes is None else run.peak_rss_bytes / 2**20
        cells = [
            name,
            result.recipes[name].describe(),
            f"{run.lr:g}",
            _fmt(run.final_train_loss(), ".3f"),
            val,
            f"{run.ms_per_step:.1f}",
            f"{run.state_bytes_per_param:.2f}",
            _fmt(mib, ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "- train loss: mean cross-entropy (nats) of the last 10% of steps; val loss: after the last step, "
        "mean over a fixed held-out set.",
        "- ms/step: median wall time of a training step (forward, backward, optimizer step); "
        "evaluations are not counted.",
        "- state B/param: bytes of the tensors in `optimizer.state` divided by the number of parameters.",
        f"- {MEMORY_NOTE}",
    ]
    lrs = sorted({(run.lr, result.recipes[n].optimizer) for n, run in result.runs.items()})
    if result.sweep is not None:
        lines.append(
            f"- peak lr: each optimizer's best of {len(LR_GRID)} multiples of its paper's lr on the quick "
            "race (the lr sweep below); every recipe of an optimizer races at that lr, torch's AdamW at "
            "adamkit's (one algorithm, two implementations)."
        )
    elif len({lr for lr, _ in lrs}) > 1:
        lines.append(
            "- peak lr differs per optimizer: "
            + ", ".join(f"{registry.TRAINABLE[o].label} {lr:g}" for lr, o in lrs)
            + " (SGD has no per-coordinate scaling and needs a larger lr)."
        )
    if any(run.untimed_s for run in result.runs.values()):
        lines.append(
            "- one-time warm-up before timing (a few untimed steps; compilation included): "
            + ", ".join(f"{n} {run.untimed_s:.1f} s" for n, run in result.runs.items())
            + "."
        )
    for name, why in result.skipped.items():
        lines.append(f"- skipped {name}: {why}")
    for name, why in result.failed.items():
        lines.append(f"- failed {name}: {why}")
    if result.sweep is not None:
        lines += ["", *sweep_markdown(result.sweep)]
    return "\n".join(lines) + "\n"


def sweep_markdown(sweep: Sweep) -> list[str]:
    """The lr sweep's table: validation loss at each multiple of the paper's lr, the chosen one bold."""
    head = " | ".join(f"x{k:g}" for k in LR_GRID)
    lines = [
        f"lr sweep: {sweep.steps} steps of the quick race ({sweep.description}), validation loss at each "
        "multiple of the optimizer's paper lr (`registry.PAPER_LR`); **bold**: the lr it races at.",
        "",
        f"| optimizer | paper lr | {head} | chosen lr |",
        "|---|---|" + "---|" * len(LR_GRID) + "---|",
    ]
    for name, tried in sweep.tried.items():
        cells = []
        for lr, v in tried.items():
            text = "diverged" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if lr == sweep.chosen[name] else text)
        lines.append(
            f"| {name} | {registry.PAPER_LR[name]:g} | {' | '.join(cells)} | {sweep.chosen[name]:g} |"
        )
    return lines


def to_json(result: RaceResult) -> dict[str, Any]:
    """Every curve and summary number of the race, JSON-ready (non-finite numbers become null)."""
    return {
        "task": result.task,
        "description": result.description,
        "steps": result.steps,
        "seed": result.seed,
        "threads": result.threads,
        "schedule": SCHEDULE,
        "memory": MEMORY_NOTE,
        "recipes": {
            name: {
                "optimizer": result.recipes[name].describe(),
                "optimizer_name": result.recipes[name].optimizer,
                "precision": run.precision,
                "state": run.state,
                "lr": run.lr,
                "n_params": run.n_params,
                "final_train_loss": _finite(run.final_train_loss()),
                "val_loss": _finite(run.val_loss),
                "initial_val_loss": _finite(run.initial_val_loss),
                "ms_per_step": run.ms_per_step,
                "train_s": run.train_s,
                "untimed_s": run.untimed_s,
                "state_bytes_per_param": run.state_bytes_per_param,
                "peak_rss_bytes": run.peak_rss_bytes,
                "diverged_at": run.diverged_at,
                "curve": [
                    {"step": p.step, "wall_s": p.wall_s, "val_loss": _finite(p.val_loss)} for p in run.curve
                ],
                "train_losses": [_finite(x) for x in run.train_losses],
            }
            for name, run in result.runs.items()
        },
        "skipped": dict(result.skipped),
        "failed": dict(result.failed),
        "lr_sweep": None
        if result.sweep is None
        else {
            "description": result.sweep.description,
            "steps": result.sweep.steps,
            "grid": list(LR_GRID),
            "tried": {
                o: [{"lr": lr, "val_loss": _finite(v)} for lr, v in t.items()]
                for o, t in result.sweep.tried.items()
            },
            "chosen": dict(result.sweep.chosen),
        },
    }


def plot(result: RaceResult | dict[str, Any], path: str | Path | None = None) -> Any:
    """The race's picture (:func:`adamkit.tools.race_plot.plot`) of a run from :func:`race` or its
    :func:`to_json` dictionary."""
    return race_plot.plot(to_json(result) if isinstance(result, RaceResult) else result, path)


def write(
    result: RaceResult, out: str | Path, log: Callable[[str], None] = print, png: bool = True
) -> list[Path]:
    """Write ``race.json``, ``race.md`` and (if ``png`` and matplotlib is installed) ``race.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "race.json", out / "race.md"]
    files[0].write_text(json.dumps(to_json(result), indent=1) + "\n")
    files[1].write_text(markdown(result))
    if not png:
        return files
    try:
        plot(result, out / "race.png")
        files.append(out / "race.png")
    except ImportError as err:
        log(f"not writing race.png: {err}")
    return files


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", choices=TASKS, default="gpt", help="gpt: char-level GPT; digits: sklearn MLP"
    )
    parser.add_argument(
        "--recipes",
        default=None,
        help=f"comma-separated subset of: {', '.join(RECIPES)} (default: all; unavailable ones are skipped)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (< 1 minute)")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="steps per recipe (default: per task)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order (default: 0)")
    parser.add_argument(
        "--evals", type=positive_int, default=10, help="validation points per run (default: 10)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch.set_num_threads (default: torch's; 1 with --quick)",
    )
    parser.add_argument("--out", default="adamkit-race", help="output directory (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="write race.json and race.md only")
    parser.add_argument(
        "--replot",
        metavar="DIR",
        help="train nothing: redraw DIR/race.png from DIR/race.json (a race written earlier)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="first sweep each optimizer's lr on the quick race (6 multiples of its paper's lr), "
        "then race every recipe at its optimizer's best",
    )


def _missing_dependency(args: argparse.Namespace) -> str | None:
    """What the run would need and lacks, with the command that installs it (checked before any work)."""
    import importlib.util

    if args.task == "digits" and importlib.util.find_spec("sklearn") is None:
        return "--task digits needs scikit-learn: pip install 'adamkit[digits]' (or pip install scikit-learn)"
    if (args.replot or not args.no_plot) and importlib.util.find_spec("matplotlib") is None:
        return PLOT_MISSING + ("" if args.replot else "; or pass --no-plot")
    return None


def run(args: argparse.Namespace) -> int:
    try:
        names = parse_recipes(args.recipes)
    except ValueError as err:
        print(f"adamkit race: error: {err}", file=sys.stderr)
        return 2
    missing = _missing_dependency(args)
    if missing:
        print(f"adamkit race: error: {missing}", file=sys.stderr)
        return 2
    if args.replot:
        source = Path(args.replot) / "race.json"
        if not source.is_file():
            print(f"adamkit race: error: no race.json in {args.replot!r}", file=sys.stderr)
            return 2
        plot(json.loads(source.read_text()), source.with_name("race.png"))
        print(f"wrote {source.with_name('race.png')}")
        return 0
    setting = SETTINGS[(args.task, args.quick)]
    steps = args.steps or setting.steps
    print(f"racing on {args.task} ({setting.model}): {steps} steps per recipe, seed {args.seed}")
    for n in names:
        r = RECIPES[n]
        lr = "from the sweep" if args.sweep else f"{registry.TRAINABLE[r.optimizer].lr:g}"
        print(f"  {n:<14} {r.describe():<52} peak lr {lr}")
    print(f"lr schedule: {SCHEDULE} ({warmup_steps(steps)} warmup steps)")
    result = race(
        args.task,
        names,
        quick=args.quick,
        steps=args.steps,
        seed=args.seed,
        evals=args.evals,
        threads=args.threads,
        progress=not args.no_progress,
        sweep=args.sweep,
    )
    if not result.runs:
        print("adamkit race: error: no recipe ran (see the notes above)", file=sys.stderr)
        return 1
    print()
    print(markdown(result), end="")
    files = write(result, args.out, png=not args.no_plot)
    print("\nwrote " + ", ".join(str(f) for f in files))
    if result.failed:
        print(
            f"adamkit race: error: {len(result.failed)} recipe(s) failed: {', '.join(result.failed)}",
            file=sys.stderr,
        )
        return 1
    return 0
