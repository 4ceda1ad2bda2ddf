"""``adamkit train``: train a small character-level GPT on CPython's bundled documentation.

The library entry point is :func:`train` (a :class:`TrainConfig` in, a :class:`TrainResult` out);
:func:`fit` is the training loop itself, shared with ``adamkit race``. The command line only parses
arguments and prints.

Every run uses a warmup + cosine learning-rate schedule (:func:`warmup_cosine`; Schedule-Free
AdamW: the same warmup inside the optimizer, then a constant lr, and evaluation in its eval mode),
the same batches for a given seed whatever the optimizer, and reports the held-out validation
loss: the mean cross-entropy (nats per character) over a fixed set of windows from the last 10% of
the corpus.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import registry, tasks
from .tasks import GPTConfig

DEFAULT_STEPS = 600  # ~90 ms/step on 2 cores: about a minute of training


# --------------------------------------------------------------------------------------------------
# Library
# --------------------------------------------------------------------------------------------------


def warmup_steps(steps: int) -> int:
    """The default warmup of :func:`warmup_cosine`: 5% of the steps, at least 1."""
    return max(1, round(0.05 * steps))


def _constant(step: int) -> float:
    """lr multiplier of Schedule-Free runs (their optimizer warms up itself)."""
    return 1.0


def warmup_cosine(steps: int, warmup: int | None = None, final: float = 0.1) -> Callable[[int], float]:
    """lr multiplier for ``LambdaLR``: linear warmup to 1, then cosine decay to ``final`` at ``steps``.

    ``warmup`` defaults to :func:`warmup_steps`.
    """
    warmup = warmup_steps(steps) if warmup is None else warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (moments, step counters, buffers)."""

    def nbytes(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return value.nbytes
        if isinstance(value, dict):
            return sum(nbytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(nbytes(v) for v in value)
        return 0

    return sum(nbytes(s) for s in optimizer.state.values())


@torch.no_grad()
def evaluate(task, model: nn.Module, batches: list[tasks.Batch], opt=None) -> float:
    """Mean loss over ``batches`` (each batch weighs the same) with the model in eval mode, and a
    Schedule-Free optimizer ``opt`` in its eval mode (the parameters hold the average x)."""
    was_training = model.training
    model.eval()
    switch = getattr(opt, "train_mode", False)
    if switch:
        opt.eval()
    try:
        return sum(task.loss(model, b).item() for b in batches) / len(batches)
    finally:
        if switch:
            opt.train()
        model.train(was_training)


class _PeakRSS:
    """Peak resident-memory growth of this process over a block of code, on Linux.

    Before the block it runs the garbage collector, returns freed heap to the OS (``malloc_trim``)
    and resets the kernel's high-water mark (``/proc/self/clear_refs``); after it, the result is
    the peak resident size (``VmHWM``) minus the resident size at the start: model, gradients,
    optimizer state, activations and allocator overhead of the block. Where the reset is refused it
    falls back to ``getrusage`` (peak since process start: a lower bound, 0 if an earlier peak was
    higher). ``None`` where neither is available.
    """

    def __enter__(self) -> _PeakRSS:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc only
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.exact = _reset_hwm()
        self.start = _status_kib("VmRSS") if self.exact else _maxrss_kib()
        self.bytes: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        end = _status_kib("VmHWM") if self.exact else _maxrss_kib()
        if self.start is not None and end is not None:
            self.bytes = max(0, end - self.start) * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    # ru_maxrss: KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


@dataclass
class EvalPoint:
    step: int
    wall_s: float  # training time so far (evaluations excluded)
    val_loss: float


@dataclass
class TrainResult:
    """What one training run measured. Losses are mean cross-entropy in nats."""

    task: str
    optimizer: str
    precision: str
    state: str
    lr: float
    steps: int
    seed: int
    n_params: int
    train_losses: list[float]  # one per step
    curve: list[EvalPoint]  # validation loss at step 0 and at evenly spaced steps, the last included
    ms_per_step: float  # median wall time of one step (forward, backward, optimizer, scheduler)
    train_s: float  # total training time, evaluations excluded
    total_s: float  # wall time of the whole run, model building and evaluations included
    state_bytes_per_param: float  # bytes in optimizer.state / number of parameters, after training
    peak_rss_bytes: int | None  # peak resident-memory growth during the run (see _PeakRSS)
    diverged_at: int | None = None  # the step whose loss was not finite; training stopped there
    untimed_s: float = 0.0  # untimed warm-up before this run, if any (``adamkit race`` does one)
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (for sampling)

    @property
    def finished(self) -> bool:
        """Every step of the schedule ran (not stopped early on purpose, not diverged)."""
        return self.diverged_at is None and len(self.train_losses) == self.steps

    @property
    def val_loss(self) -> float:
        """The final validation loss (NaN if the run diverged)."""
        return math.nan if self.diverged_at is not None else self.curve[-1].val_loss

    @property
    def initial_val_loss(self) -> float:
        return self.curve[0].val_loss

    def final_train_loss(self, last: int | None = None) -> float:
        """Mean training loss of the last ``last`` steps (default: the last 10%, at least 1)."""
        last = max(1, len(self.train_losses) // 10) if last is None else last
        tail = self.train_losses[-last:]
        return sum(tail) / len(tail)


CHECKPOINT_VERSION = 1


def checkpoint_dict(model, optimizer, scheduler, sampler, losses, step_s, curve, meta) -> dict:
    """Everything a resumed run needs to continue bit for bit; loads with ``weights_only=True``."""
    return {
        "version": CHECKPOINT_VERSION,
        "meta": dict(meta or {}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler_rng": sampler.generator.get_state(),
        "train_losses": list(losses),
        "step_s": list(step_s),
        "curve": [{"step": p.step, "wall_s": p.wall_s, "val_loss": p.val_loss} for p in curve],
    }


def fit(
    task,
    optimizer: str = "adamw",
    *,
    steps: int,
    seed: int = 0,
    lr: float | None = None,
    precision: str = "fp32",
    state: str = "default",
    evals: int = 10,
    progress: bool = True,
    desc: str | None = None,
    clip: float | None = None,
    grads: str = "clip_grad_norm",
    accumulate: int = 1,
    save: str | Path | None = None,
    resume: dict | None = None,
    stop_after: int | None = None,
    meta: dict | None = None,
) -> TrainResult:
    """Train ``task``'s model from the initialisation of ``seed`` with one optimizer recipe.

    ``task`` is a :class:`~adamkit.tools.tasks.CharTask`, :class:`~adamkit.tools.tasks.DigitsTask` or any
    object with ``name``, ``build_model(seed)``, ``sampler(seed)``, ``val_batches()`` and
    ``loss(model, batch)``. The lr follows :func:`warmup_cosine`; ``lr=None`` takes the optimizer's
    default from :data:`~adamkit.tools.registry.TRAINABLE`. The validation loss is measured before training
    and at ``evals`` evenly spaced steps (the last one included). A non-finite training loss stops
    the run; the result then says where (``diverged_at``) and holds what was measured until then.

    ``save`` writes a checkpoint (:func:`checkpoint_dict`: model, optimizer, scheduler, the batch
    sampler's RNG and the curves so far, plus ``meta``) at every evaluation and at the end;
    ``resume`` (a loaded checkpoint) continues it, bit for bit as if it had not stopped.
    ``stop_after`` ends the run after that step (an interruption on purpose, to resume later).
    ``grads``: how ``clip`` is applied: ``"clip_grad_norm"`` (torch's, before the step), ``"fused"``
    (the optimizer's ``max_grad_norm``: the same result, no extra pass) or ``"release"``
    (``gradient_release=True``; clipping by the previous step's global norm) or
    ``"release-per-tensor"`` (gradient release, each tensor clipped to its own norm).
    ``accumulate``: micro-batches per step (each of the task's batch size). With ``grads="release"``
    the optimizer folds them (``accumulation_steps``: no gradient buffer; v takes the mean of the
    squared micro-batch gradients); otherwise true gradient accumulation (each micro-batch's loss
    divided by ``accumulate``, summed in ``p.grad``, clipped and stepped once). The training loss
    logged is the micro-batches' mean.
    ``model`` and ``optimizer`` of the run are kept on the result's ``model`` attribute for sampling.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(evals, int) or evals < 1:
        raise ValueError(f"evals must be a positive integer, got {evals!r}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer, got {accumulate!r}")
    lr = registry.TRAINABLE[optimizer].lr if lr is None and optimizer in registry.TRAINABLE else lr
    t_start = time.perf_counter()
    with _PeakRSS() as peak:
        model = registry.cast_model(task.build_model(seed), precision)
        if grads not in GRAD_MODES:
            raise ValueError(f"unknown grads mode {grads!r}; choose one of {', '.join(GRAD_MODES)}")
        engine: dict = {}
        if grads != "clip_grad_norm":
            engine = {"max_grad_norm": clip} if clip is not None else {}
            if grads.startswith("release"):
                engine["gradient_release"] = True
                if grads == "release-per-tensor" and clip is not None:
                    engine["release_clipping"] = "per_tensor"
                if accumulate > 1:
                    engine["accumulation_steps"] = accumulate
        spec = registry.TRAINABLE.get(optimizer)
        schedule_free = spec is not None and spec.schedule_free
        if schedule_free:  # its own warmup, then a constant lr
            engine["warmup_steps"] = warmup_steps(steps)
        opt = registry.build_optimizer(model, optimizer, lr=lr, precision=precision, state=state, **engine)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _constant if schedule_free else warmup_cosine(steps))
        sample = task.sampler(seed)
        val = task.val_batches()
        eval_at = {round(steps * (i + 1) / evals) for i in range(evals)}
        losses: list[float] = []
        step_s: list[float] = []
        diverged_at: int | None = None
        if (save is not None or resume is not None) and not hasattr(sample, "generator"):
            raise ValueError(f"the {task.name} task's batch sampler cannot be checkpointed")
        if resume is not None:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            sample.generator.set_state(resume["sampler_rng"])
            losses, step_s = list(resume["train_losses"]), list(resume["step_s"])
            curve = [EvalPoint(**p) for p in resume["curve"]]
        else:
            curve = [EvalPoint(0, 0.0, evaluate(task, model, val, opt))]
        first = len(losses) + 1
        last = steps if stop_after is None else min(steps, stop_after)

        def checkpoint() -> None:
            if save is not None:
                state = checkpoint_dict(model, opt, sched, sample, losses, step_s, curve, meta)
                torch.save(state, save)

        bar = tqdm(
            range(first, last + 1),
            desc=desc or optimizer,
            disable=not progress,
            leave=True,
            unit="step",
            initial=first - 1,
            total=steps,
        )
        for step in bar:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if accumulate == 1:
                loss = task.loss(model, sample())
                loss.backward()
            else:
                loss = 0.0
                for _ in range(accumulate):
                    micro = task.loss(model, sample())
                    # true accumulation sums the gradients of loss/k; the optimizer's folds the
                    # gradients of each micro-batch's loss and divides by k itself
                    (micro if grads.startswith("release") else micro / accumulate).backward()
                    loss = loss + micro.detach() / accumulate
            if clip is not None and grads == "clip_grad_norm":
                # Rescale the whole gradient to norm <= clip: one outlier batch cannot throw Adam's
                # moments (and the weights) far off, which at lr 3e-3 spiked one seed in three.
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step_s.append(time.perf_counter() - t0)
            if not math.isfinite(losses[-1]):
                diverged_at = step  # stop: every later step would be NaN too
                break
            if step in eval_at:
                curve.append(EvalPoint(step, sum(step_s), evaluate(task, model, val, opt)))
                checkpoint()
            if progress and (step % 10 == 0 or step == steps):
                recent = step_s[-10:]
                bar.set_postfix(loss=f"{losses[-1]:.3f}", ms_step=f"{1000 * sum(recent) / len(recent):.0f}")
        if diverged_at is None:
            checkpoint()
        if getattr(opt, "train_mode", False):
            # Schedule-Free: the model keeps x, the point its validation loss was measured at (what
            # --sample then samples from); the checkpoint above holds y in train mode, to resume
            opt.eval()
        bar.close()
        n_params = sum(p.numel() for p in model.parameters())
        sbytes = state_bytes(opt)
    return TrainResult(
        task=task.name,
        optimizer=optimizer,
        precision=precision,
        state=state,
        lr=float(lr),
        steps=steps,
        seed=seed,
        n_params=n_params,
        train_losses=losses,
        curve=curve,
        ms_per_step=1000 * statistics.median(step_s) if step_s else math.nan,
        train_s=sum(step_s),
        total_s=time.perf_counter() - t_start,
        state_bytes_per_param=sbytes / n_params,
        peak_rss_bytes=peak.bytes,
        diverged_at=diverged_at,
        model=model,
    )


@dataclass
class TrainConfig:
    """Settings of :func:`train`. ``lr=None`` takes the optimizer's default (``registry.TRAINABLE``)."""

    steps: int = DEFAULT_STEPS
    seed: int = 0
    optimizer: str = "adamw"
    lr: float | None = None
    batch_size: int = 32
    precision: str = "fp32"
    state: str = "default"
    model: GPTConfig = field(default_factory=GPTConfig)
    threads: int | None = None  # torch.set_num_threads for the run; None leaves torch's default
    evals: int = 10
    progress: bool = True
    # Gradient-norm clipping at 1.0 (as nanoGPT): without it, at lr 3e-3 one seed in three had a
    # loss spike (seed 1: validation 1.86 against 1.47 with clipping).
    clip: float | None = 1.0
    grads: str = "clip_grad_norm"  # GRAD_MODES: torch's clipping, the fused one, gradient release
    accumulate: int = 1  # micro-batches per step: true accumulation, or the optimizer's with release


# How the gradient reaches the optimizer (--grads): see fit().
GRAD_MODES = ("clip_grad_norm", "fused", "release", "release-per-tensor")

# The fields of TrainConfig that define the run (a resumed run must agree on them).
RECIPE_FIELDS = (
    "steps",
    "seed",
    "optimizer",
    "lr",
    "batch_size",
    "precision",
    "state",
    "model",
    "clip",
    "grads",
    "accumulate",
    "evals",
    "threads",  # torch splits its reductions between threads: another count changes the bits
)


def config_to_dict(config: TrainConfig) -> dict:
    return {k: asdict(config.model) if k == "model" else getattr(config, k) for k in RECIPE_FIELDS}


def load_checkpoint(path: str | Path) -> tuple[TrainConfig, dict]:
    """A checkpoint written by ``train(..., save=path)``: its run's settings and its contents.

    Raises:
        ValueError: if the file is missing or not an ``adamkit train`` checkpoint.
    """
    try:
        ckpt = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {str(path)!r}") from None
    except Exception as err:  # a pickle error, a truncated file, another program's file
        raise ValueError(f"{str(path)!r} is not a readable checkpoint ({err})") from err
    if (
        not isinstance(ckpt, dict)
        or ckpt.get("version") != CHECKPOINT_VERSION
        or "config" not in ckpt["meta"]
    ):
        raise ValueError(f"{str(path)!r} is not an adamkit train checkpoint (version {CHECKPOINT_VERSION})")
    cfg = dict(ckpt["meta"]["config"])
    cfg["model"] = GPTConfig(**cfg["model"])
    return TrainConfig(**cfg), ckpt


def train(
    config: TrainConfig | None = None,
    *,
    save: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the character-level GPT with ``config`` (default ``TrainConfig()``); return the measurements.

    ``save``: write a checkpoint there (at every evaluation and at the end), with every setting
    that changes the run's bits, the thread count included (torch splits its reductions between
    threads). ``resume``: continue the run saved there with its settings (``config`` supplies only
    ``progress``; a ``threads`` other than the saved run's is refused: the run would no longer be
    bit-identical). ``stop_after``: stop after that step, e.g. to resume later.
    """
    config = TrainConfig() if config is None else config
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be >= 1, got {config.threads}")
    ckpt = None
    if resume is not None:
        saved, ckpt = load_checkpoint(resume)
        if config.threads is not None and saved.threads is not None and config.threads != saved.threads:
            raise ValueError(
                f"threads={config.threads} differs from the saved run's {saved.threads}: the resumed run "
                "would not be bit-identical to one that never stopped; leave threads unset"
            )
        config = TrainConfig(
            **{k: getattr(saved, k) for k in RECIPE_FIELDS},
            progress=config.progress,
        )
        if config.threads is None:  # a checkpoint from before threads were saved
            config = replace(config, threads=torch.get_num_threads())
    elif config.threads is None:  # saved with the run: the count it ran with
        config = replace(config, threads=torch.get_num_threads())
    torch.set_flush_denormal(True)  # denormals slow fp32 CPU math ~20x
    task = tasks.CharTask(config.model, batch_size=config.batch_size)
    before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return fit(
            task,
            config.optimizer,
            steps=config.steps,
            seed=config.seed,
            lr=config.lr,
            precision=config.precision,
            state=config.state,
            evals=config.evals,
            progress=config.progress,
            clip=config.clip,
            grads=config.grads,
            accumulate=config.accumulate,
            save=save,
            resume=ckpt,
            stop_after=stop_after,
            meta={"config": config_to_dict(config)},
        )
    finally:
        torch.set_num_threads(before)
