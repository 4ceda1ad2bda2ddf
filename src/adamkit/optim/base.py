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
from ..kernels import compiled, native
from ..kernels.compose import Item
from ..kernels.foreach import run_foreach
from ..kernels.reference import run_reference
from ..storage import quant8
from ..storage.formats import (
    LOW_PRECISION,
    Formats,
    choose_formats,
    init_param_aux,
    param_aux_key,
    state_dtype,
)
from .checkpoint import CheckpointMixin
from .layout import (
    AUX_KEYS,
    aux_from_value,
    aux_value,
    encode8,
    like_param,
    quantizable,
    rows_like,
    slot_format,
    slot_spec,
)
from .options import (
    ENGINE_DEFAULTS,
    STORAGE_OPTIONS,
    check_engine_options,
    check_nonneg,
    resolve_backend,
)
from .release import Release, ReleaseMixin
from .state import StateMap
from .step_scale import clip_coef, total_norm

# torch's own fused kernels serve the formats they have (Adam/AdamW, fp32 or plain low-precision
# parameters with state in their dtype) where the native kernel is unavailable; tests switch it off.
USE_TORCH_FUSED = True

_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_fallback_warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 4) -> None:
    if key not in _fallback_warned:
        _fallback_warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def fused_unavailable_reason(alg: Algorithm) -> str | None:
    """Why no fused kernel (native or compiled) can run here, or None if one can."""
    if alg.native is not None and native.USE_NATIVE and native.load() is not None:
        return None
    problem = compiled.problem()
    if problem is None:
        return None
    why = native.failure() if native.USE_NATIVE else "switched off"
    if alg.native is None:
        why = f"{alg.name} has no native body"
    return f"native kernel: {why}; torch.compile kernel: {problem}"


class Optimizer(ReleaseMixin, CheckpointMixin, torch.optim.Optimizer):
    """The generic adamkit optimizer; see the module docstring. Subclasses set ``algorithm``."""

    algorithm: ClassVar[Algorithm]
    # torch.amp.GradScaler then passes its scale and found_inf (self.grad_scale, self.found_inf) to
    # step() instead of unscaling the gradients itself: the unscale is folded into the kernels
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        defaults: dict,
        *,
        gradient_release: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite_steps: bool = False,
        accumulation_steps: int = 1,
        release_clipping: str = "previous_step",
        release_check: bool = True,
    ):
        if release_clipping not in ("previous_step", "per_tensor"):
            raise ValueError(
                f"Invalid release_clipping: {release_clipping!r}; choose 'previous_step' (the previous "
                "step's global norm) or 'per_tensor' (each tensor's own norm)"
            )
        if release_clipping != "previous_step" and not (gradient_release and max_grad_norm is not None):
            raise ValueError(
                "release_clipping applies to gradient_release=True with max_grad_norm set; without "
                "them it would be ignored"
            )
        self.release_clipping = release_clipping
        if not isinstance(gradient_release, bool) or not isinstance(skip_nonfinite_steps, bool):
            raise TypeError("gradient_release and skip_nonfinite_steps must be bools")
        if (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1
        ):
            raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r}; it must be an int >= 1")
        if accumulation_steps > 1:
            if not gradient_release:
                raise ValueError(
                    "accumulation_steps > 1 folds micro-batch gradients inside backward and needs "
                    "gradient_release=True; without it, accumulate gradients as usual (k backward "
                    "passes, then step())"
                )
            if self.algorithm.accumulation is None:
                raise ValueError(
                    f"accumulation_steps > 1 is not supported by adamkit.{self.algorithm.name}: "
                    f"{self.algorithm.no_accumulation}; use gradient_release=False and ordinary "
                    "gradient accumulation"
                )
            if skip_nonfinite_steps:
                raise ValueError(
                    "accumulation_steps > 1 cannot skip a whole step (skip_nonfinite_steps=True): the "
                    "window's micro-batches are folded as they come"
                )
        self.accumulation_steps = accumulation_steps
        if max_grad_norm is not None:
            max_grad_norm = check_nonneg("max_grad_norm", max_grad_norm)
            if max_grad_norm == 0:
                raise ValueError("Invalid max_grad_norm: 0; it must be > 0 (or None: no clipping)")
        if gradient_release and skip_nonfinite_steps:
            raise ValueError(
                "skip_nonfinite_steps=True cannot work with gradient_release=True: each parameter is "
                "stepped during backward, before the gradients of the others exist, so a step cannot be "
                "skipped as a whole; use skip_nonfinite=True (per element) with gradient release"
            )
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.skipped_steps = 0  # whole steps skipped for a non-finite gradient (or GradScaler's found_inf)
        self.last_grad_norm: float | None = None  # the global gradient norm the last clipping used
        if not isinstance(release_check, bool):
            raise TypeError(f"release_check must be a bool, got {release_check!r}")
        observe = release_check and accumulation_steps == 1
        self._release = Release(observe) if gradient_release else None
        defaults = {**ENGINE_DEFAULTS, **defaults}
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
        if accumulation_steps > 1:
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
        """8-bit state of a DTensor parameter is kept in rows (``quant8``: blocks inside rows, the
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
    # state
    # ------------------------------------------------------------------------------------------

    def _formats(self, group: dict, p: torch.Tensor) -> Formats:
        fmt = choose_formats(
            p.dtype,
            group["kahan_sum"],
            group["stochastic_rounding"],
            group["master_weights"],
            group["state_format"],
        )
        if fmt.state == "8bit" and not quantizable(p, group["min_8bit_size"]):
            fmt = fmt._replace(state="fp32")
        return fmt

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Create missing state of ``p``: step, slots in their format, Kahan/master buffer. For a
        DTensor parameter, floating state is a DTensor of the parameter's placement."""
        with self._tracked().quiet():
            return self._init_state_quietly(p, group)

    def _tracked(self) -> StateMap:
        """``self.state``, as a StateMap again if the user assigned another mapping to it (the
        kernel's tables then no longer describe it)."""
        if type(self.state) is not StateMap:
            self.state = StateMap(self.state)
            self._plans = {}
        return self.state

    def _init_state_quietly(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        fmt = self._formats(group, p)
        if "step" not in state:
            # step: a 0-D fp32 CPU tensor, as torch's non-fused optimizers keep it (state dicts interchange)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        self._conform_state(p, state, fmt)
        for slot in self.algorithm.slots:
            if slot.name in state or (slot.option is not None and not group.get(slot.option, False)):
                continue
            shape = slot.shape_for(p.shape)
            if shape is None:  # not kept for a parameter of this shape
                continue
            if slot.shape is not None:  # a slot of its own shape (Adafactor's rows, Adam-mini's v)
                if dist.is_dtensor(p):
                    # rows with the parameter's rows, the rest whole on every rank (slot_spec);
                    # fp32 or bf16 (fp32 under state_format='8bit': slot_format)
                    from torch.distributed.tensor import DTensor

                    mesh, placements, gshape, stride = slot_spec(slot, p)
                    lshape = slot.shape_for(dist.local(p).shape) if slot.follows_rows(p.shape) else gshape
                    dtype = state_dtype(slot_format(fmt.state, slot, p))
                    x = torch.zeros(lshape, dtype=dtype, device=p.device)
                    state[slot.name] = DTensor.from_local(
                        x, mesh, placements, run_check=False, shape=gshape, stride=stride
                    )
                elif fmt.state == "8bit":  # its own flat blocks: 1 B/element padded + 4 B per block
                    state[slot.name], state[slot.name + "_scale"] = quant8.zeros(
                        math.prod(shape), slot.signed, p.device
                    )
                else:
                    state[slot.name] = torch.zeros(shape, dtype=state_dtype(fmt.state), device=p.device)
            elif fmt.state == "8bit":
                # 1 B/param of codes (each row padded to whole 256-blocks) + 4 B per block of scale
                rows = dist.local(p).shape[0] if p.dim() >= 2 else None
                n = quant8.row_length(p.shape) if rows is not None else p.numel()
                codes, scales = quant8.zeros(n, slot.signed, p.device, rows=rows)
                state[slot.name], state[slot.name + "_scale"] = rows_like(codes, p), rows_like(scales, p)
            else:
                # 4 B/param in fp32, 2 in bf16/fp16 (the parameter's dtype by default)
                state[slot.name] = torch.zeros_like(
                    p, dtype=state_dtype(fmt.state), memory_format=torch.preserve_format
                )
        aux = param_aux_key(fmt.param)
        if aux is not None and aux not in state:
            # kahan_comp 2 B/param, kahan_comp8 1 B/param, master_weight 4 B/param
            state[aux] = init_param_aux(fmt.param, p)
        return state

    @torch.no_grad()
    def _conform_state(self, p: torch.Tensor, state: dict, fmt: Formats) -> None:
        """Existing state in another format than the parameter now needs (``model.to(dtype)``
        after a step): slots are converted (as ``load_state_dict`` converts them), and a Kahan or
        master buffer that no longer applies is folded into the parameter, so nothing is lost."""
        for slot in self.algorithm.slots:
            v = state.get(slot.name)
            if v is None:
                continue
            scale = state.get(slot.name + "_scale")
            sf = slot_format(fmt.state, slot, p)
            if sf == "8bit":
                if scale is None or v.dtype != torch.uint8:  # a floating value (the user's): encoded
                    state[slot.name], state[slot.name + "_scale"] = encode8(slot, dist.local(v).float(), p)
            elif scale is not None:  # 8-bit codes, now a floating format
                codes = dist.local(v)
                x = quant8.decode(
                    slot.signed, codes, dist.local(scale),
                    slot.shape_for(dist.local(p).shape), torch.float32, codes.dim() == 2,
                )  # fmt: skip
                state[slot.name] = like_param(x, p, slot).to(state_dtype(sf))
                del state[slot.name + "_scale"]
            elif v.dtype != state_dtype(sf):
                state[slot.name] = v.to(state_dtype(sf))
        wanted = param_aux_key(fmt.param)
        for key in AUX_KEYS:
            if key in state and key != wanted:
                aux = state.pop(key)
                if wanted is None:  # the parameter holds full precision now: keep the lost bits
                    p.copy_(aux_value(p, key, aux))
                else:  # another low-precision recipe (kahan <-> kahan8 <-> master): carry the value over
                    state[wanted] = aux_from_value(p, wanted, aux_value(p, key, aux))

    def _item(self, p: torch.Tensor, group: dict, uid: int, grad: torch.Tensor | None = None) -> Item:
        state = self._init_state(p, group)
        t = {k: dist.local(v) for k, v in state.items() if k != "step"}
        t["param"], t["grad"] = dist.local(p), dist.local(p.grad if grad is None else grad)
        # offset: the local shard's first element in the whole parameter, so that rounding bits
        # follow global element positions (the same at every world size)
        spec = None
        if not self.algorithm.elementwise and dist.is_sharded(p):  # reductions over the whole tensor
            spec = {"param": (p.device_mesh, tuple(p.placements), p.shape, p.stride())}
            for slot in self.algorithm.slots:
                if slot.name in state:
                    spec[slot.name] = spec["param"] if slot.shape is None else slot_spec(slot, p)
        return Item(t, self._formats(group, p), float(state["step"]) + 1, uid, dist.global_offset(p), spec)

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

    def _step_group(
        self,
        index: int,
        group: dict,
        hp: dict,
        grads: list,
        has: list,
        base: int,
        gscale: float = 1.0,
        k: int = 1,
    ) -> None:
        """The dispatcher: the only place that knows backends, defaults and fallbacks.

        ``gscale`` multiplies every gradient as it is read (clipping, loss-scale): it is folded into
        the scalars' ``grad_sign``, which every backend multiplies g by (the per-tensor ones when
        ``Flags.maximize`` is None, as the compiled kernel always does). ``k > 1``: the last
        micro-batch of an accumulation window (scalars from ``Algorithm.accumulation.last``)."""
        alg = self.algorithm
        flags = alg.flags(group, hp)
        scalars_of = self._scalars_of(hp, flags, gscale, k)
        params = group["params"]
        backend = group["backend"]
        rest = None
        if backend in ("auto", "fused") and alg.native is not None and native.USE_NATIVE:
            lib = native.load()
            if lib is not None:
                options = tuple(group[k] for k in STORAGE_OPTIONS)
                plan = self._plans.get(index)
                if plan is None or not self._plan_current(plan, params, has, flags, options):
                    for p, h in zip(params, has):
                        if h:
                            self._init_state(p, group)
                    state = self._tracked()
                    with state.quiet():  # the tables' step counters are the engine's own writes
                        plan = native.GroupPlan(
                            lib, alg, params, state, lambda p: self._formats(group, p), base, flags, options
                        )
                    plan.state_version = (state, state.version)
                    self._plans[index] = plan
                all_have = all(has)
                for table in plan.tables:
                    table.step(grads, has, all_have, scalars_of)
                rest = [i for i in plan.loose if has[i]]
        if rest is None:
            rest = list(itertools.compress(range(len(params)), has))
        if not rest:
            return
        items = [self._item(params[i], group, base + i, grads[i]) for i in rest]
        counters = [self.state[params[i]]["step"] for i in rest]
        if gscale != 1.0 or k != 1:
            flags = flags._replace(maximize=None)  # the sign and scale come from the scalars
        if backend == "reference":
            run_reference(alg, items, scalars_of, flags)
        elif backend == "foreach":
            run_foreach(alg, items, scalars_of, flags)
        else:
            self._run_unserved(items, hp, flags, scalars_of)
        for c in counters:  # only now that every update succeeded
            c.add_(1)

    def _plan_current(self, plan: native.GroupPlan, params: list, has: list, flags, options) -> bool:
        """Whether a group's native tables still describe it: the same parameters where they were,
        the same options, and no state replaced or cleared since they were built."""
        state, version = plan.state_version
        return state is self.state and state.version == version and plan.matches(params, has, flags, options)

    def _run_unserved(self, items: list[Item], hp: dict, flags, scalars_of) -> None:
        """Items the native kernel does not serve under backend auto/fused: torch's own fused
        kernel where it serves the formats, else the compiled kernel, else foreach."""
        alg = self.algorithm
        if (
            alg.torch_fused is not None
            and USE_TORCH_FUSED
            and (native.load() is None or not native.USE_NATIVE)
        ):
            items = alg.torch_fused(items, hp, flags)
        if not items:
            return
        if not alg.elementwise:  # reductions and odd-shaped slots: per tensor (see run_foreach)
            run_reference(alg, items, scalars_of, flags)
            return

        # Non-contiguous tensors, and 8-bit rows of several blocks with a short last one, go to
        # foreach: in one compiled graph inductor pads each row inside scalar loops and recomputes
        # the update there (fp16 parameters, 1M elements in rows of 1000, one thread: 1.3 s per
        # step compiled, 0.15 s on foreach; rows of whole blocks stay compiled: 0.04 s).
        def compiled_serves(it: Item) -> bool:
            if not all(t.is_contiguous() for t in it.t.values()):
                return False
            rows8 = any(k.endswith("_scale") and v.dim() == 2 for k, v in it.t.items())
            return not (rows8 and quant8.row_length(it.t["param"].shape) % quant8.BLOCK)

        leftover = [it for it in items if not compiled_serves(it)]
        todo = [it for it in items if compiled_serves(it)]
        problem = compiled.problem()
        if problem is None:
            for k, it in enumerate(todo):
                try:
                    compiled.run_compiled(alg, [it], scalars_of, flags)
                except Exception:
                    if compiled.problem() is None:
                        raise  # not a compiler problem: a real error
                    problem = compiled.problem()
                    leftover += todo[k:]
                    break
        else:
            leftover += todo
        if problem is not None and todo:
            warn_once(
                "fallback-foreach",
                "adamkit: no fused kernel serves some parameters here "
                f"({fused_unavailable_reason(alg) or problem}); "
                "they run on the foreach backend. Install a C compiler (gcc) to get the native kernel.",
            )
        if leftover:
            run_foreach(alg, leftover, scalars_of, flags)
