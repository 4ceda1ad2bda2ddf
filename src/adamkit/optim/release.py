"""Gradient release: each parameter stepped inside backward by a post-accumulate-grad hook, its
gradient freed; optimizer accumulation over k backward passes (``accumulation_steps``); DDP
buckets stepped after their all-reduce (``adamkit.release_comm_hook``); the check of the user's
training loop on the first backward (``release_check``). :class:`ReleaseMixin` holds the
optimizer's side of it; ``optim/base.py`` the rest of the optimizer."""

from __future__ import annotations

import math
import threading
import warnings
from typing import TYPE_CHECKING

import torch

from .. import dist
from ..kernels import native
from ..kernels.compose import N_STREAMS, Item, decode_all, encode_all, index_and_seeds
from ..storage.formats import compute_dtype, mix_seed
from .options import STORAGE_OPTIONS
from .step_scale import clip_coef

if TYPE_CHECKING:
    from .base import Optimizer


class Release:
    """Gradient release: each parameter is stepped by a post-accumulate-grad hook as soon as its
    gradient is accumulated in backward, and its gradient freed (``p.grad = None``), so the step's
    peak memory holds one gradient at a time instead of all of them.

    Clipping (``max_grad_norm``) uses the *previous* step's global norm: the global norm of this
    step is known only after the last hook, when every other parameter has already been stepped.
    The hooks add up the squared norms on the device (no host synchronization per tensor); the
    step closes at ``optimizer.step()`` (or when a parameter's hook fires again), which reads the
    sum once. The first step is not clipped.

    With optimizer accumulation (``accumulation_steps=k``) the hooks of a window's first k-1
    backward passes fold their gradients into the state (``Algorithm.accumulation``) and the k-th
    steps; a callback queued on autograd's engine at each backward's first hook counts the
    backward passes, so ``step()``/``zero_grad()`` calls between them change nothing."""

    def __init__(self, observe: bool = True):
        self.handles: list = []
        self.where: dict[int, tuple[int, int]] = {}  # id(p) -> (group index, position)
        self.seen: set[int] = set()
        # group index -> its native plan, checked once per backward: each hook then steps its one
        # row directly (validating the plan per hook would cost O(group size) per parameter)
        self.checked: dict[int, object] = {}
        self.sq: torch.Tensor | None = None  # this step's sum of squared gradient norms
        self.scale = 1.0  # the clipping multiplier from the previous step's norm
        self.micro = 0  # accumulation: backward passes done in this window (0 .. k-1)
        self.in_backward = False  # accumulation: the end-of-backward callback is queued
        self.task = -1  # accumulation: autograd's id of the backward that queued it
        # accumulation: parameters folded in this window, not yet stepped (id -> (p, index, i))
        self.pending: dict[int, tuple] = {}
        # DDP (adamkit.release_comm_hook): buckets are stepped after their all-reduce, maybe on
        # the process group's thread while backward goes on, so one bucket at a time
        self.ddp = False
        self.lock = threading.Lock()
        self.ddp_done: set[int] = set()  # stepped by the comm hook in this backward
        # release_check: the first backward keeps its gradients until step() (or zero_grad())
        # has checked the training loop (Optimizer._observed_step); id(p) -> (p, grad, version)
        self.observing = observe
        self.observed: dict[int, tuple] = {}

    def register(self, opt: Optimizer, index: int) -> None:
        ref = _weak(opt)
        for i, p in enumerate(opt.param_groups[index]["params"]):
            self.where[id(p)] = (index, i)
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(lambda q: _hook(ref, q)))

    def end_step(self, opt: Optimizer, micro_batches: int = 1) -> None:
        self.seen.clear()
        self.checked.clear()
        if self.sq is None:
            return
        # a window of k micro-batches: the root mean square of their norms
        norm, self.sq = (self.sq / micro_batches).sqrt(), None
        value = float(norm)  # the one host synchronization of the step
        if opt.max_grad_norm is not None and math.isfinite(value):
            opt.last_grad_norm = value
            if opt.release_clipping == "previous_step":
                self.scale = clip_coef(opt.max_grad_norm, norm)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _weak(obj):
    import weakref

    return weakref.ref(obj)


def _hook(ref, p: torch.Tensor) -> None:
    opt = ref()  # the hooks outlive a deleted optimizer: then they do nothing
    if opt is not None:
        opt._release_hook(p)


def _end_backward(ref) -> None:
    opt = ref()
    if opt is not None:
        opt._end_micro_batch()


class ReleaseMixin:
    """The optimizer's gradient-release methods (mixed into ``optim.base.Optimizer``)."""

    def _observed_step(self) -> None:
        """End gradient release's first, observed backward (``release_check``): refuse the habits
        release cannot honour while nothing has been stepped, else run the hooks that backward
        deferred, in the order they fired (each steps its parameter and frees its gradient, as
        release does), and release from now on.

        Release consumes each gradient inside backward. A loop that changes gradients between
        backward and ``step()`` (``clip_grad_norm_`` would see none and return 0; ``unscale_``
        would unscale nothing), that is driven by GradScaler (it could not skip an inf step), or
        that runs several backward passes per ``step()`` (each would be a step) would train
        silently wrong."""
        rel = self._release
        observed, rel.observed = rel.observed, {}
        if getattr(self, "found_inf", None) is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "adamkit: GradScaler cannot drive gradient_release=True (nothing was stepped): release "
                "steps each parameter inside backward, before GradScaler could check the gradients "
                "for inf/nan; train with bf16 autocast (no loss scaling), or gradient_release=False, "
                "or skip_nonfinite=True to skip non-finite elements inside the step"
            )
        changed = [p for p, g, v in observed.values() if p.grad is not g or g._version != v]
        if changed:
            raise RuntimeError(
                "adamkit: the gradients were changed between backward and step() (nothing was "
                "stepped): with gradient_release=True each gradient is consumed and freed inside "
                "backward, so what runs after it (torch.nn.utils.clip_grad_norm_, which would see no "
                "gradients and return 0; GradScaler.unscale_) cannot apply. Pass max_grad_norm= to "
                "the optimizer for clipping (its norm is folded into the step), and drop the "
                "gradient changes from the loop; release_check=False skips this check"
            )
        rel.observing = False
        for p, _, _ in observed.values():
            self._release_hook(p)

    def remove_gradient_release(self) -> None:
        """Stop gradient release: remove its hooks from the parameters (a parameter's gradient is
        then kept until ``step()``, as without release). State, groups and step counts are kept;
        ``step()`` steps the gradients that backward leaves from now on. Refused inside an
        accumulation window (its folded micro-batches would be lost)."""
        rel = self._release
        if rel is None:
            return
        self._check_window("remove_gradient_release()")
        if rel.observed:
            self._observed_step()
        rel.remove()
        self._release = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; under gradient release it also closes the first, observed step
        (as it closes every released step: ``step()`` is optional there)."""
        if self._release is not None and self._release.observed:
            self._observed_step()
        super().zero_grad(set_to_none)

    @torch._disable_dynamo
    @torch.no_grad()
    def _release_hook(self, p: torch.Tensor) -> None:
        """Step one parameter whose gradient backward has just accumulated, then free the gradient
        (gradient_release=True): the dispatcher's ordinary path on a one-row selection."""
        rel = self._release
        g = p.grad
        if rel is None or g is None or rel.ddp:  # DDP: the comm hook steps after the all-reduce
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1 and not dist.is_dtensor(p):
            raise RuntimeError(
                "adamkit: gradient_release=True in a multi-process job on plain parameters "
                "(DistributedDataParallel): the hook would step with this rank's gradient before "
                "DDP's all-reduce; register adamkit.release_comm_hook(optimizer) on the DDP model "
                "(ddp.register_comm_hook(None, ...)), use FSDP2 (fully_shard), or "
                "gradient_release=False"
            )
        if g.is_sparse:
            raise RuntimeError(f"adamkit.{type(self).__name__} does not support sparse gradients")
        k = self.accumulation_steps
        if rel.observing:
            # The first backward: nothing is stepped yet. Its gradients are kept until step() (or
            # zero_grad()) checks that the loop leaves them alone (_observed_step).
            if id(p) in rel.observed:
                rel.observed.clear()
                raise RuntimeError(
                    "adamkit: a second backward before step() (nothing was stepped): with "
                    "gradient_release=True each backward is one optimizer step. To accumulate k "
                    "micro-batches per step, pass accumulation_steps=k (and, with transformers' "
                    "Trainer, gradient_accumulation_steps=1); a loop that never calls step() must "
                    "call opt.step() (or zero_grad()) after its first backward, which ends this "
                    "check (release_check=False skips it)"
                )
            rel.observed[id(p)] = (p, g, g._version)
            return
        if k == 1 and id(p) in rel.seen:  # a second backward without step(): close the previous step
            rel.end_step(self)
        rel.seen.add(id(p))
        index, i = rel.where[id(p)]
        group = self.param_groups[index]
        params = group["params"]
        hp = self._hyper(index, group)
        if k > 1:
            task = torch._C._current_graph_task_id()
            if rel.in_backward and task != rel.task:
                # The previous backward raised after some of its hooks had folded or stepped:
                # autograd drops a failed backward's callbacks, so it was never counted and the
                # window would never close (every later backward folding, none stepping). It
                # counts as a micro-batch whose missing gradients are zero, as true accumulation
                # goes on with the partial sums left in .grad when the error is caught.
                warnings.warn(
                    "adamkit: a backward pass raised inside an accumulation window; its gradients "
                    "folded so far stay in the window, which counts it as a micro-batch",
                    stacklevel=2,
                )
                self._end_micro_batch()
            if not rel.in_backward:  # this backward's first hook: count it when it ends
                ref = _weak(self)
                torch.autograd.Variable._execution_engine.queue_callback(lambda: _end_backward(ref))
                rel.in_backward, rel.task = True, task
        if "step" not in self.state.get(p, {}):
            # state for the whole group at once: the native kernel's tables are built once, not
            # once per parameter as each first gradient arrives
            for q in params:
                if q.requires_grad:
                    self._init_state(q, group)
        if self.max_grad_norm is not None:
            # fp32 (fp64 for fp64 gradients) as total_norm sums: bf16 squares would overflow
            wide = torch.float64 if g.dtype == torch.float64 else torch.float32
            sq = torch.linalg.vector_norm(dist.local(g), 2.0, dtype=wide).square()
            rel.sq = sq if rel.sq is None else rel.sq + sq.to(rel.sq.device)
        if k > 1 and rel.micro < k - 1:  # not the window's last backward: fold, do not step
            uid = 1 + sum(len(gr["params"]) for gr in self.param_groups[:index]) + i
            self._fold(p, g, group, hp, uid, self._release_scale(g))
            rel.pending[id(p)] = (p, index, i)
            p.grad = None
            return
        rel.pending.pop(id(p), None)
        self._release_step(p, g, index, i, hp, self._release_scale(g))
        p.grad = None

    def _release_scale(self, g: torch.Tensor) -> float:
        """The gradient multiplier of a released parameter: the previous step's global-norm
        clipping coefficient, or with ``release_clipping="per_tensor"`` this tensor's own
        ``min(1, max_grad_norm / (||g|| + 1e-6))`` (one host read per tensor)."""
        if self.release_clipping != "per_tensor" or self.max_grad_norm is None:
            return self._release.scale
        wide = torch.float64 if g.dtype == torch.float64 else torch.float32
        return clip_coef(self.max_grad_norm, torch.linalg.vector_norm(dist.local(g), 2.0, dtype=wide))

    def _release_step(
        self, p: torch.Tensor, g: torch.Tensor, index: int, i: int, hp: dict, gscale: float
    ) -> None:
        """Step parameter ``i`` of group ``index`` alone with gradient ``g`` (gradient release)."""
        rel, k = self._release, self.accumulation_steps
        group = self.param_groups[index]
        params = group["params"]
        if index not in rel.checked:  # once per backward: is the group's native plan current?
            plan = self._plans.get(index)
            flags = self.algorithm.flags(group, hp)
            options = tuple(group[k] for k in STORAGE_OPTIONS)
            none = [False] * len(params)
            ok = plan is not None and group["backend"] in ("auto", "fused") and native.USE_NATIVE
            rel.checked[index] = (
                plan if ok and self._plan_current(plan, params, none, flags, options) else None
            )
        plan = rel.checked[index]
        hit = plan.row_of.get(i) if plan is not None else None
        if hit is not None:  # one row of a table: O(1) in the group's size
            table, j = hit
            table.step_one(j, g, self._scalars_of(hp, self.algorithm.flags(group, hp), gscale, k))
        else:  # the dispatcher (builds the plan the first time), on a one-parameter selection
            grads = [None] * len(params)
            has = [False] * len(params)
            grads[i], has[i] = g, True
            base = 1 + sum(len(gr["params"]) for gr in self.param_groups[:index])
            self._step_group(index, group, hp, grads, has, base, gscale, k)
            rel.checked.pop(index, None)  # a plan may have been built: check it at the next hook

    @torch.no_grad()
    def _fold(self, p: torch.Tensor, g: torch.Tensor, group: dict, hp: dict, uid: int, gscale: float) -> None:
        """Fold one micro-batch's gradient of ``p`` into its state (``Algorithm.accumulation``),
        in the state's format; the parameter and its step count are unchanged. Per tensor, on
        torch operations: the native kernel has no fold body, and only the window's last
        micro-batch (the ordinary kernel) writes the parameter."""
        alg, rel = self.algorithm, self._release
        st = self.state[p]
        fmt = self._formats(group, p)
        t = {name: dist.local(v) for name, v in st.items() if name != "step"}
        t["param"], t["grad"] = dist.local(p), dist.local(g)
        f = alg.flags(group, hp)
        step = float(st["step"]) + 1
        pp, gg, slots = decode_all(alg, fmt, t, f, compute_dtype(t["param"].dtype))
        sign = -gscale if group["maximize"] else gscale
        if sign != 1.0:
            gg = gg * sign
        new = alg.accumulation.fold(pp, gg, slots, hp, f, self.accumulation_steps)
        index, _ = index_and_seeds(Item(t, fmt, step, uid, dist.global_offset(p)))
        # rounding streams of their own: each micro-batch's, apart from the step's (bf16/8-bit state)
        seeds = [mix_seed(step, uid, 200 + 8 * rel.micro + j) for j in range(N_STREAMS)]
        out = encode_all(alg, fmt, t, pp, new, f, index, seeds)
        for slot, value in zip(alg.active_slots(f), new):
            if value is not None:
                t[slot.name].copy_(out[slot.name])
                if slot.name + "_scale" in out:
                    t[slot.name + "_scale"].copy_(out[slot.name + "_scale"])

    @torch.no_grad()
    def _release_bucket(self, params: list, grads: list) -> None:
        """Step the parameters of one DDP bucket with their all-reduced gradients
        (:func:`adamkit.release_comm_hook`); ``p.grad`` is left to DDP and freed by ``step()``."""
        rel = self._release
        with rel.lock:
            for p, g in zip(params, grads):
                where = rel.where.get(id(p))
                if where is None:  # not one of this optimizer's parameters
                    continue
                index, i = where
                group = self.param_groups[index]
                hp = self._hyper(index, group)
                if "step" not in self.state.get(p, {}):
                    for q in group["params"]:
                        if q.requires_grad:
                            self._init_state(q, group)
                g = g.view_as(p)
                if self.max_grad_norm is not None:
                    wide = torch.float64 if g.dtype == torch.float64 else torch.float32
                    sq = torch.linalg.vector_norm(g, 2.0, dtype=wide).square()
                    rel.sq = sq if rel.sq is None else rel.sq + sq
                self._release_step(p, g, index, i, hp, self._release_scale(g))
                rel.ddp_done.add(id(p))

    @torch.no_grad()
    def _end_micro_batch(self) -> None:
        """Called by autograd when an accumulation backward ends: count it; at the window's end,
        step the parameters folded in it that had no gradient in its last micro-batch (as true
        accumulation would, with their summed gradient: their last share is zero), and close the
        clipping norm."""
        rel, k = self._release, self.accumulation_steps
        if rel is None:
            return
        rel.in_backward = False
        rel.micro += 1
        if rel.micro < k:
            return
        rel.micro = 0
        pending, rel.pending = list(rel.pending.values()), {}
        for p, index, i in pending:
            # a zero gradient for the one step, handed to it directly (p.grad stays None)
            hp = self._hyper(index, self.param_groups[index])
            self._release_step(p, torch.zeros_like(p), index, i, hp, self._release.scale)
        rel.end_step(self, k)

    def _check_window(self, what: str) -> None:
        rel = self._release
        if rel is not None and (rel.micro or rel.pending):
            if rel.in_backward and torch._C._current_graph_task_id() != rel.task:
                raise RuntimeError(
                    f"adamkit: {what} after a backward pass that raised inside an accumulation "
                    f"window ({rel.micro} of {self.accumulation_steps} micro-batches done before "
                    "it): the moments hold a partial sum; run the window's remaining backward "
                    "passes first (the interrupted one counts as a micro-batch)"
                )
            raise RuntimeError(
                f"adamkit: {what} inside an accumulation window ({rel.micro} of "
                f"{self.accumulation_steps} micro-batches folded): the moments hold a partial sum "
                "that only the window's last backward completes; call it between windows"
            )
