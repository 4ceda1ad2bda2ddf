"""The generic optimizer every adamkit algorithm is a thin subclass of.

It owns what algorithms share: parameter groups (validated when a group is created or changed, not
re-validated every step), lazy state in the chosen storage formats, the dispatcher (the only place
that knows backends, defaults and fallbacks), state-dict conversion between formats and with
``torch.optim``, and the full-precision API of low-precision parameters. An algorithm module
declares an :class:`~adamkit.algorithm.Algorithm` and its constructor's signature.

Parameters and gradients stay the user's tensors: every backend reads and writes them where they
lie (a DTensor's local shard included). Only the optimizer's own state lives in tensors it owns.
"""

from __future__ import annotations

import itertools
import math
import operator
import warnings
from collections.abc import Iterable
from typing import ClassVar

import torch

from .. import dist
from ..algorithm import Algorithm
from ..kernels import native
from ..storage.formats import (
    LOW_PRECISION,
    choose_formats,
)
from .checkpoint import CheckpointMixin
from .dispatch import DispatchMixin, fused_unavailable_reason
from .options import (
    ENGINE_DEFAULTS,
    ENGINE_OPTIONS_DOC,
    check_engine_options,
    engine_kwargs,
    optimizer_options,
    resolve_backend,
)
from .release import Release, ReleaseMixin
from .state import StateMap, StateMixin
from .step_scale import clip_coef, total_norm

_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")


class Optimizer(StateMixin, DispatchMixin, ReleaseMixin, CheckpointMixin, torch.optim.Optimizer):
    """The generic adamkit optimizer; see the module docstring. Subclasses set ``algorithm``."""

    algorithm: ClassVar[Algorithm]
    # torch.amp.GradScaler then passes its scale and found_inf (self.grad_scale, self.found_inf) to
    # step() instead of unscaling the gradients itself: the unscale is folded into the kernels
    _step_supports_amp_scaling = True

    def __init_subclass__(cls, **kwargs):
        # the engine's options are documented once (options.py) and shown in every optimizer's help
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and "{engine_options}" in cls.__doc__:
            cls.__doc__ = cls.__doc__.replace("{engine_options}", ENGINE_OPTIONS_DOC)

    def __init__(self, params: Iterable, defaults: dict, **engine):
        """``defaults``: the algorithm's hyperparameters; ``engine``: the engine's options, the same
        for every algorithm (``options.py``: group options and optimizer options, documented
        there once); any other name raises TypeError."""
        group_options, options = engine_kwargs(type(self).__name__, engine)
        o = optimizer_options(self.algorithm, **options)
        self.release_clipping = o.release_clipping
        self.accumulation_steps = o.accumulation_steps
        self.max_grad_norm = o.max_grad_norm
        self.skip_nonfinite_steps = o.skip_nonfinite_steps
        self.skipped_steps = 0  # whole steps skipped for a non-finite gradient (or GradScaler's found_inf)
        self.last_grad_norm: float | None = None  # the global gradient norm the last clipping used
        observe = o.release_check and o.accumulation_steps == 1
        self._release = Release(observe) if o.gradient_release else None
        defaults = {**ENGINE_DEFAULTS, **group_options, **defaults}
        defaults["betas"] = (
            tuple(defaults["betas"]) if isinstance(defaults.get("betas"), list) else defaults.get("betas")
        )
        if defaults["betas"] is None:
            del defaults["betas"]
        defaults["backend"] = resolve_backend(defaults["backend"], defaults["foreach"], defaults["fused"])
        # Validate the defaults as a group would be validated, before anything is built.
        probe = dict(defaults)
        self._prepare_group(probe)
        self.algorithm.check(probe)
        check_engine_options(probe)
        self._plans: dict[int, native.GroupPlan] = {}
        self._checked: dict[int, tuple] = {}
        super().__init__(params, defaults)
        self.state = StateMap(self.state)  # knows when the user replaces state (optim/state.py)
        if o.accumulation_steps > 1:
            for index, group in enumerate(self.param_groups):
                self._hyper(index, group)  # refusals (e.g. a beta of 0) at construction
        if any(g["backend"] == "fused" for g in self.param_groups):
            reason = fused_unavailable_reason(self.algorithm)
            if reason is not None and self.algorithm.torch_fused is None:
                raise RuntimeError(f"backend='fused' is unavailable: {reason}; use backend='foreach'")

    # ------------------------------------------------------------------------------------------
    # groups
    # ------------------------------------------------------------------------------------------

    def _prepare_group(self, group: dict) -> None:
        """Fill a new group's derived options (e.g. Adam's max_lr); algorithms override it."""

    def __setstate__(self, state: dict) -> None:
        # Checkpoints pickled by older versions get defaults for options added later.
        state.setdefault("max_grad_norm", None)
        state.setdefault("skip_nonfinite_steps", False)
        state.setdefault("skipped_steps", 0)
        state.setdefault("last_grad_norm", None)
        state.setdefault("accumulation_steps", 1)
        state.setdefault("release_clipping", "previous_step")
        state["_release"] = None  # hooks live on the parameters: not pickled, not restored
        super().__setstate__(state)
        if not isinstance(self.state, StateMap):
            self.state = StateMap(self.state)
        self._plans, self._checked = {}, {}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def __getstate__(self) -> dict:
        # The kernel's tables hold pointers; they are rebuilt on the next step after unpickling.
        return {
            k: v for k, v in super().__getstate__().items() if k not in ("_plans", "_checked", "_release")
        }

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (validated first: a bad group raises and leaves the optimizer unchanged)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, set):
            raise TypeError("optimizer params must be an ordered collection (a set has no order)")
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        named = [p for p in params if isinstance(p, tuple)]
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        seen: set[int] = set()
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor; pass the leaf parameter")
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"parameters must be floating point, got dtype {p.dtype}")
            if p.is_complex():
                raise TypeError(
                    "complex parameters are not supported; optimize torch.view_as_real(p) instead"
                )
            if id(p) in seen or id(p) in existing:
                raise ValueError(
                    "a parameter was given twice (in one group or in two groups); each parameter "
                    "must appear exactly once"
                )
            seen.add(id(p))
        merged = {**self.defaults, **param_group, "params": tensors}  # names set apart: checks see tensors
        if "backend" in param_group or "foreach" in param_group or "fused" in param_group:
            merged["backend"] = resolve_backend(
                merged.get("backend", "auto"), merged.get("foreach"), merged.get("fused")
            )
        self._prepare_group(merged)
        self.algorithm.check(merged)
        check_engine_options(merged)
        fp32_params = False
        for p in tensors:  # format options that cannot apply to a parameter's dtype fail here
            choose_formats(
                p.dtype,
                merged["kahan_sum"],
                merged["stochastic_rounding"],
                merged["master_weights"],
                merged["state_format"],
            )
            fp32_params |= p.dtype not in LOW_PRECISION
        asked = [k for k in ("kahan_sum", "stochastic_rounding", "master_weights") if merged[k]]
        if asked and fp32_params and not getattr(self, "_lowprec_warned", False):
            # once per optimizer: a flag on it, not a global set keyed by id(self), which a new
            # optimizer reuses once an old one is collected (it then never warned)
            self._lowprec_warned = True
            warnings.warn(  # a suspicious argument: UserWarning, as Python's and the peers' convention
                f"adamkit: {', '.join(f'{k}={merged[k]!r}' for k in asked)} applies to bfloat16/float16 "
                "parameters only; this group's float32/float64 parameters are stepped in their own precision "
                "(cast the model with model.to(torch.bfloat16) to use it)",
                UserWarning,
                stacklevel=3,
            )
        param_group.update({k: v for k, v in merged.items() if k != "params"})
        param_group["params"] = tensors if not named else params
        if named:
            param_group.setdefault("param_names", [n for n, _ in named])
        super().add_param_group(param_group)
        if getattr(self, "_release", None) is not None:
            self._release.register(self, len(self.param_groups) - 1)

    def _hyper(self, index: int, group: dict) -> dict:
        """The group's validated hyperparameters; validated again only when the group changed
        (a scheduler's new lr, a user's edit), so a bad value raises before anything changes."""
        key = tuple(
            v.item()
            if isinstance(v, torch.Tensor) and v.numel() == 1
            else (v if not isinstance(v, list) else tuple(v))
            for k, v in group.items()
            if k not in ("params", "param_names")
        )
        cached = self._checked.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        hp = self.algorithm.check(group)
        check_engine_options(group)
        self._check_sharded_8bit(group)
        self._check_sharded_reductions(group)
        if getattr(self, "accumulation_steps", 1) > 1:
            if group["skip_nonfinite"]:
                raise ValueError(
                    "accumulation_steps > 1 does not support skip_nonfinite=True: a non-finite "
                    "element of one micro-batch would be dropped from a sum the other micro-batches "
                    "already folded"
                )
            self.algorithm.accumulation.check(hp)
        self._checked[index] = (key, hp)
        return hp

    def _check_sharded_reductions(self, group: dict) -> None:
        """An algorithm that is not elementwise reduces over a tensor (LAMB's norms, Muon's
        orthogonalization, Adam-mini's and Adafactor's means). On a sharded DTensor its update
        runs on DTensors of the decoded shards (``Item.spec``), so torch.distributed reduces over
        the whole tensor; slots of other shapes than the parameter are split with its rows or kept
        whole on every rank (``slot_spec``), in fp32 under state_format='8bit' (``slot_format``).
        Refused when the group is (re)validated, before anything changes, alike on every rank:
        such slots of a parameter sharded along another dim than 0 (tensor parallel)."""
        if self.algorithm.elementwise or all(s.shape is None for s in self.algorithm.slots):
            return
        for p in group["params"]:
            if not dist.is_sharded(p):
                continue
            if not dist.rows_whole(p):
                raise ValueError(
                    f"adamkit.{self.algorithm.name} supports sharded DTensor parameters split along dim 0 "
                    f"only (FSDP2's fully_shard); a parameter of shape {tuple(p.shape)} is placed "
                    f"{tuple(p.placements)}: its factored or per-row statistics have no placement along "
                    "another dim. Shard it along dim 0, or keep it unsharded"
                )

    def _check_sharded_8bit(self, group: dict) -> None:
        """8-bit state of a DTensor parameter is kept in rows (``quant8``: groups inside rows, the
        codes sharded like the parameter), which move whole only where the parameter is split along
        dim 0 (FSDP2's placement) or replicated: other placements are refused. Checked when the
        group is (re)validated, before anything changes; the answer depends on global shapes and
        placements only, so every rank raises alike."""
        if group["state_format"] != "8bit":
            return
        for p in group["params"]:
            if dist.is_dtensor(p) and not dist.rows_whole(p) and self._formats(group, p).state == "8bit":
                raise ValueError(
                    f"adamkit: state_format='8bit' needs DTensor parameters split along dim 0 (FSDP2's "
                    f"Shard(0)) or replicated; a parameter of shape {tuple(p.shape)} is placed "
                    f"{tuple(p.placements)}, which would cut its 8-bit rows between ranks. Use "
                    "state_format='bf16' (2 B/param per moment), or raise min_8bit_size above this "
                    "parameter's size to keep its state in fp32"
                )

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Under ``torch.compile`` the step runs eagerly (a graph break): the kernels are already
        compiled, and tracing them would recompile whenever a step number or lr changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._release is not None and self._release.observed:
            self._observed_step()  # the first backward's gradients, kept to check the loop
        if self._release is not None:
            if getattr(self, "found_inf", None) is not None:
                raise RuntimeError(
                    "adamkit: GradScaler cannot drive gradient_release=True: the parameters were "
                    "stepped in backward, before it could check the gradients for inf/nan; use "
                    "bf16 autocast (no loss scaling) or gradient_release=False"
                )
            # the backward's parameters were stepped by their hooks (their gradients are None now);
            # this closes the step (the global norm for the next clipping) and steps what is left:
            # gradients assigned by hand, or set without accumulation (FSDP2's sharded gradients)
            if self._release.ddp_done:  # DDP wrote the averaged gradients after the comm hook stepped
                done = self._release.ddp_done
                for group in self.param_groups:
                    for p in group["params"]:
                        if id(p) in done:
                            p.grad = None
                done.clear()
            if self.accumulation_steps == 1:
                self._release.end_step(self)  # with accumulation: at the window's last backward
        self._step_all()
        return loss

    def _step_all(self) -> None:
        """The ordinary step of every parameter that has a gradient."""
        # Pass 1: check everything, so that bad input raises before any state or parameter changes.
        work = []
        for index, group in enumerate(self.param_groups):
            hp = self._hyper(index, group)
            params = group["params"]
            # map()/compress() keep these per-parameter loops in C (they run every step)
            grads = list(map(_GRAD, params))
            has = list(map(operator.is_not, grads, itertools.repeat(None)))
            if any(map(_IS_SPARSE, itertools.compress(grads, has))):
                raise RuntimeError(
                    f"adamkit.{type(self).__name__} does not support sparse gradients; use "
                    "torch.optim.SparseAdam or a dense embedding (sparse=False)"
                )
            work.append((index, group, hp, grads, has))
        if self.accumulation_steps > 1 and any(any(has) for *_, has in work):
            raise RuntimeError(
                "adamkit: accumulation_steps > 1 folds only gradients that backward accumulates "
                "(post-accumulate-grad hooks); this step() found gradients set otherwise (by hand, "
                "or FSDP2's sharded ones), which cannot join the window: set accumulation_steps=1"
            )
        # The whole step's decisions (clipping, loss-scale, skip): one host synchronization.
        gscale = self._whole_step_scale(
            [g for *_, grads, has in work for g in itertools.compress(grads, has)]
        )
        if gscale is None:
            self.skipped_steps += 1
            return
        # Pass 2: update.
        base = 1  # uid: the parameter's position in the optimizer, stable across save/load
        for index, group, hp, grads, has in work:
            if any(has):
                self._step_group(index, group, hp, grads, has, base, gscale)
            base += len(group["params"])

    def _whole_step_scale(self, grads: list) -> float | None:
        """The multiplier of every gradient in this step, or None to skip the step.

        Folds GradScaler's unscale (``self.grad_scale``, set by ``GradScaler.step`` because
        ``_step_supports_amp_scaling`` is True, as for torch's fused optimizers) and global-norm
        clipping (``max_grad_norm``: ``min(1, max_norm / (norm + 1e-6))``, torch's
        ``clip_grad_norm_`` formula) into one scalar that the kernels multiply each gradient by as
        they read it: the gradients are neither rewritten nor copied. The step is skipped when
        GradScaler found an inf/nan (``self.found_inf``) or, with ``skip_nonfinite_steps``, when the
        global norm is not finite (an inf/nan anywhere). One device-to-host copy per step."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        need_norm = self.max_grad_norm is not None or self.skip_nonfinite_steps
        if not grads or (grad_scale is None and found_inf is None and not need_norm):
            return 1.0
        host = []  # device scalars read back together
        if need_norm:
            norm = total_norm(grads)
            if grad_scale is not None:  # the norm of the unscaled gradients
                norm = norm / grad_scale.to(norm.device, norm.dtype)
            host.append(norm.reshape(()).double().cpu())
        if found_inf is not None:
            host.append(found_inf.reshape(()).double().cpu())
        if grad_scale is not None:
            # GradScaler unscales by this fp32 reciprocal (its _unscale_grads_)
            host.append(grad_scale.double().reciprocal().float().double().reshape(()).cpu())
        values = torch.stack(host).tolist() if host else []
        scale = 1.0
        if grad_scale is not None:
            scale = values.pop()
        if found_inf is not None and values.pop() != 0:
            return None
        if need_norm:
            norm_value = values.pop()
            if self.skip_nonfinite_steps and not math.isfinite(norm_value):
                return None
            if self.max_grad_norm is not None:
                self.last_grad_norm = norm_value
                scale *= clip_coef(self.max_grad_norm, norm)
        return scale

    def _scalars_of(self, hp: dict, flags, gscale: float, k: int = 1):
        """step -> the algorithm's scalars, with ``gscale`` folded into ``grad_sign``; ``k > 1``:
        those of an accumulation window's last micro-batch (``Algorithm.accumulation.last``)."""
        alg = self.algorithm
        if gscale == 1.0 and k == 1:
            return lambda step: alg.scalars(hp, step, flags)

        def scalars_of(step):
            s = alg.scalars(hp, step, flags)
            s = s._replace(grad_sign=s.grad_sign * gscale)
            return s if k == 1 else alg.accumulation.last(s, k)

        return scalars_of
