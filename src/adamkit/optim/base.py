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
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from .. import dist
from ..algorithm import Algorithm
from ..kernels import compiled, native
from ..kernels.compose import N_STREAMS, Item, decode_all, encode_all, index_and_seeds
from ..kernels.foreach import run_foreach
from ..kernels.reference import run_reference
from ..storage import quant8
from ..storage.formats import (
    LOW_PRECISION,
    Formats,
    choose_formats,
    compute_dtype,
    init_param_aux,
    kahan8_correction,
    kahan8_value,
    mix_seed,
    param_aux_key,
    state_dtype,
)
from .options import (
    ENGINE_DEFAULTS,
    STORAGE_OPTIONS,
    check_engine_options,
    check_nonneg,
    resolve_backend,
)
from .state import StateMap

# torch's own fused kernels serve the formats they have (Adam/AdamW, fp32 or plain low-precision
# parameters with state in their dtype) where the native kernel is unavailable; tests switch it off.
USE_TORCH_FUSED = True

_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_AUX_KEYS = ("kahan_comp", "kahan_comp8", "master_weight")
# Group keys torch.optim's optimizers read in step(); kept in our groups with torch-compatible
# values so that state dicts move between torch and adamkit both ways.
_TORCH_GROUP_DEFAULTS = {"capturable": False, "differentiable": False}
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


def _aux_value(p: torch.Tensor, key: str, aux: torch.Tensor) -> torch.Tensor:
    """The fp32 value a low-precision parameter ``p`` holds with its buffer ``key``. ``p`` may have
    been cast to fp32 since (``model.to``): its value is still the bf16 one the units derive from."""
    if key == "kahan_comp8":
        return kahan8_value(p.detach().to(torch.bfloat16), aux)
    if key == "kahan_comp":
        return p.detach().float() + aux.float()
    return aux.float()  # master_weight


def _aux_from_value(p: torch.Tensor, key: str, v: torch.Tensor) -> torch.Tensor:
    """The buffer ``key`` that, with ``p`` as it is, holds fp32 value ``v`` as closely as it can: the
    remainder v - p in p's dtype (kahan_comp), in int8 units of ulp(p)/256 rounded to nearest
    (kahan_comp8; within +-127 units), or v itself (master_weight)."""
    v = v.to(torch.float32)
    if key == "kahan_comp8":
        return kahan8_correction(p.detach(), v)
    if key == "kahan_comp":
        return (v - p.detach().float()).to(p.dtype)
    return v.clone()


def slot_spec(slot, p: torch.Tensor) -> tuple:
    """(mesh, placements, global shape, stride) of a DTensor parameter's slot: a slot that follows
    the parameter's rows (``Slot.follows_rows``) is placed like it, others are replicated on the
    mesh dimensions where the parameter is sharded (every rank keeps them whole)."""
    from torch.distributed.tensor import Replicate  # DTensors exist: so does the module

    shape = slot.shape_for(p.shape)
    rows = slot.follows_rows(p.shape)
    placements = tuple(pl if rows or not pl.is_shard() else Replicate() for pl in p.placements)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return p.device_mesh, placements, torch.Size(shape), stride


def slot_format(fmt_state: str, slot, p: torch.Tensor) -> str:
    """One slot's storage format: the parameter's, except that under state_format='8bit' a slot of
    its own shape of a sharded DTensor parameter (Adafactor's and CAME's factored statistics,
    Adam-mini's v) keeps fp32: its own flat 8-bit blocks would be cut by the shards, and such
    statistics are rows plus columns, a few bytes per row. Parameter-shaped slots keep 8-bit rows."""
    if fmt_state == "8bit" and slot.shape is not None and dist.is_sharded(p):
        return "fp32"
    return fmt_state


def _placed_like(t: torch.Tensor, p: torch.Tensor, slot=None) -> torch.Tensor:
    """A loaded state tensor with its parameter's placement. The kernels read the local shards of a
    parameter and its state together, so state saved without sharding (a full checkpoint) or with
    another placement would be read with the wrong length; a full tensor is cut locally (no
    communication), a DTensor of another placement is gathered first (a collective: every rank
    loads). Plain tensors for plain parameters pass through unchanged. ``slot``: a slot of another
    shape than the parameter, placed by ``slot_spec``."""
    if slot is not None and slot.shape is not None and dist.is_dtensor(p):
        mesh, placements, _, _ = slot_spec(slot, p)
        if dist.is_dtensor(t):
            if t.device_mesh == mesh and tuple(t.placements) == placements:
                return t
            t = t.full_tensor()
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, mesh, placements, src_data_rank=None)
    t_dt, p_dt = dist.is_dtensor(t), dist.is_dtensor(p)
    if not t_dt and not p_dt:
        return t
    if t_dt and p_dt and t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements):
        return t
    if t_dt:
        t = t.full_tensor()
    if p_dt:
        from torch.distributed.tensor import distribute_tensor  # DTensors exist: so does the module

        t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
    return t


def quantizable(p: torch.Tensor, min_8bit_size: int) -> bool:
    """Whether ``p``'s moments are stored in 8 bit under state_format='8bit', from its global shape
    (a DTensor's ``shape`` and ``numel()`` are global), so every rank and every world size decides
    alike. Below ``min_8bit_size`` elements (norms, biases) state stays fp32: the saving is a few
    bytes. A >= 2-D parameter is kept in rows (``quant8``), each padded to whole blocks: rows of
    fewer than 66 elements would take more bytes than fp32 (a row costs at least 260 B), so they
    stay fp32. A 1-D or 0-D tensor is one row, which FSDP2 cuts between ranks: a DTensor of that
    shape keeps fp32 state (a plain tensor's flat blocks cannot be cut)."""
    if p.numel() < min_8bit_size:
        return False
    if p.dim() >= 2:
        length = quant8.row_length(p.shape)
        return quant8.row_bytes(length) < 4 * length
    return not dist.is_dtensor(p)


def _rows_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Local 8-bit codes or scales of a DTensor parameter as a DTensor placed like it (rows split
    along dim 0 exactly as the parameter's rows); plain tensors pass through."""
    if not dist.is_dtensor(p) or t.dim() != 2:
        return t
    from torch.distributed.tensor import DTensor  # DTensors exist: so does the module

    shape = (p.shape[0], t.shape[1])
    return DTensor.from_local(
        t, p.device_mesh, p.placements, run_check=False, shape=shape, stride=(t.shape[1], 1)
    )


def _like_param(x: torch.Tensor, p: torch.Tensor, slot) -> torch.Tensor:
    """A decoded local value of a parameter-shaped slot with its parameter's placement."""
    if not dist.is_dtensor(p) or slot.shape is not None or dist.is_dtensor(x):
        return x
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        x, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def _encode8(slot, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values (``p``'s local elements, or a slot of its own shape) -> (codes, scales) in the
    slot's layout (rows for parameter-shaped slots of >= 2-D parameters, else flat), rounded with
    the elements' global positions, so a conversion gives the same codes at every world size."""
    rows = slot.shape is None and p.dim() >= 2
    if not rows:
        codes, scales = quant8.encode(slot.signed, x)
        return codes.view(-1), scales
    index = torch.arange(x.numel(), device=x.device).view(x.shape) + dist.global_offset(p)
    codes, scales = quant8.encode(slot.signed, x, index, rows=True)
    return _rows_like(codes, p), _rows_like(scales, p)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads``, computed as ``torch.nn.utils.clip_grad_norm_`` computes it
    (a foreach norm per device and dtype, then the norm of the norms), in fp32 (fp64 if any gradient
    is fp64) so that bf16/fp16 gradients, loss-scaled ones included, do not overflow their dtype."""
    out_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_kind[(g.device, g.dtype)].append(g)
    norms = []
    for (_, dtype), gs in by_kind.items():
        want = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        norms.extend(torch._foreach_norm(gs, 2.0, dtype=want))
    device = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device, out_dtype) for n in norms]), 2.0)
    if dist.is_dtensor(total):  # FSDP2: the norms of the local shards, reduced
        total = total.full_tensor()
    return total


def clip_coef(max_norm: float, norm: torch.Tensor) -> float:
    """``min(1, max_norm / (norm + 1e-6))`` as clip_grad_norm_ computes it (in the norm's dtype)."""
    return float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


class _Release:
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


class Optimizer(torch.optim.Optimizer):
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
        self._release = _Release(observe) if gradient_release else None
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
                state[slot.name], state[slot.name + "_scale"] = _rows_like(codes, p), _rows_like(scales, p)
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
                    state[slot.name], state[slot.name + "_scale"] = _encode8(slot, dist.local(v).float(), p)
            elif scale is not None:  # 8-bit codes, now a floating format
                codes = dist.local(v)
                x = quant8.decode(
                    slot.signed, codes, dist.local(scale),
                    slot.shape_for(dist.local(p).shape), torch.float32, codes.dim() == 2,
                )  # fmt: skip
                state[slot.name] = _like_param(x, p, slot).to(state_dtype(sf))
                del state[slot.name + "_scale"]
            elif v.dtype != state_dtype(sf):
                state[slot.name] = v.to(state_dtype(sf))
        wanted = param_aux_key(fmt.param)
        for key in _AUX_KEYS:
            if key in state and key != wanted:
                aux = state.pop(key)
                if wanted is None:  # the parameter holds full precision now: keep the lost bits
                    p.copy_(_aux_value(p, key, aux))
                else:  # another low-precision recipe (kahan <-> kahan8 <-> master): carry the value over
                    state[wanted] = _aux_from_value(p, wanted, _aux_value(p, key, aux))

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

    # ------------------------------------------------------------------------------------------
    # full-precision values of low-precision parameters
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def full_precision_params(self) -> list[torch.Tensor]:
        """fp32 values of every parameter, in group order: the master weight, or p + kahan_comp, or
        p + kahan_comp8 * ulp(p)/256, or the parameter itself. Save these to keep what the
        low-precision copy rounds away."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                key = next((k for k in _AUX_KEYS if k in st), None)
                if key is not None:
                    out.append(_aux_value(p, key, st[key]))
                else:
                    out.append(p.detach().clone())
        return out

    @torch.no_grad()
    def load_full_precision_params(self, values: Iterable[torch.Tensor]) -> None:
        """Set every parameter from full-precision values (e.g. an fp32 checkpoint), in group order.

        A bf16/fp16 parameter gets the rounded value; with Kahan summation its compensation buffer
        is seeded with the rounding remainder, with master weights the master copy gets the value,
        so nothing of the fp32 weights is lost (with ``kahan_sum="8bit"``, nothing beyond the
        int8 correction's resolution: |error| <= ulp(p)/512, or ulp(p)/256 where it clamps at +-127).

        Under FSDP2 (DTensor parameters) a value may be the full tensor, as every rank reads it
        from a checkpoint: each rank keeps its own shard of it (no communication); a DTensor value
        of another placement is gathered first (a collective: every rank calls this)."""
        values = list(values)
        params = [(g, p) for g in self.param_groups for p in g["params"]]
        if len(values) != len(params):
            raise ValueError(f"got {len(values)} values for {len(params)} parameters")
        for (_, p), v in zip(params, values):
            if v.shape != p.shape:
                raise ValueError(f"value of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
        for (group, p), v in zip(params, values):
            v = v.to(device=p.device, dtype=torch.float32 if p.dtype in LOW_PRECISION else p.dtype)
            # a full value is cut to the parameter's shard; the copies below are shard to shard
            v = dist.local(_placed_like(v, p))
            fmt = self._formats(group, p)
            dist.local(p).copy_(v)
            key = param_aux_key(fmt.param)
            if key is not None:
                st = self._init_state(p, group)
                dist.local(st[key]).copy_(_aux_from_value(dist.local(p), key, v))

    # ------------------------------------------------------------------------------------------
    # state dicts
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's state dict: the live state tensors, as torch returns them (an in-place load,
        ``dcp.load(sd := opt.state_dict())``, restores moments and step counters alike; the
        native kernel's counters are 0-D views of one buffer per table, which ``torch.save`` writes
        once), and 8-bit state marked with its parameter's shape (``param_shape``, int64), which
        loading checks: codes alone only tell the number of blocks."""
        self._check_window("state_dict()")
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # torch's entries are our live dicts
        params = [p for g in self.param_groups for p in g["params"]]
        for key, st in sd["state"].items():
            if any(k.endswith("_scale") for k in st) and isinstance(key, int) and key < len(params):
                st["param_shape"] = torch.tensor(list(params[key].shape), dtype=torch.int64)
        if self._release is not None and self.max_grad_norm is not None:
            # release clipping scales the next step by this step's norm: a resumed run needs it
            sd["release_clip"] = {"scale": self._release.scale, "last_grad_norm": self.last_grad_norm}
        return sd

    def _state_keys(self) -> tuple[str, ...]:
        slots = [s.name for s in self.algorithm.slots]
        return (
            "step",
            "param_shape",
            *slots,
            *(s + "_scale" for s in slots),
            *_AUX_KEYS,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from adamkit or from torch.optim's optimizer of the same algorithm.

        Unlike ``torch.optim.Optimizer.load_state_dict`` it checks everything first (optimizer
        kind, group and parameter counts, state shapes), raising without changing anything on a
        mismatch, keeps each state tensor's dtype, copies tensors (no aliasing with the source), and
        fills group options the source did not know (e.g. a torch state dict) from this optimizer.
        """
        self._check_window("load_state_dict()")
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        alg = self.algorithm
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}; build the optimizer with the same groups"
            )
        id_map: dict[Any, torch.Tensor] = {}
        group_of: dict[int, dict] = {}
        new_groups = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"parameter group {i} has {len(group['params'])} parameters but the state dict's "
                    f"has {len(saved['params'])}; build the optimizer over the same parameters"
                )
            saved = self._from_torch_group(saved, group)
            missing = [k for k in self._required_group_keys() if k not in saved]
            if missing:
                raise ValueError(
                    f"state dict group {i} lacks {missing}: it comes from another kind of optimizer "
                    f"(only adamkit and torch.optim {alg.name} state dicts load here)"
                )
            new_group = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            new_group["params"] = group["params"]
            if "param_names" in group:
                new_group["param_names"] = group["param_names"]
            self._loaded_group(new_group)
            new_group["backend"] = group["backend"]  # the backend is this process's choice
            # capturable/differentiable describe how the saving run stepped (e.g. a CUDA run of
            # torch's capturable AdamW), not the state: this process steps its own way.
            new_group.update(_TORCH_GROUP_DEFAULTS)
            # How state is stored is this process's choice, like the backend: a state dict saved
            # in fp32 loads into an 8-bit optimizer (converted) and the other way round.
            for k in STORAGE_OPTIONS:
                new_group[k] = group[k]
            alg.check(new_group)
            check_engine_options(new_group)
            new_groups.append(new_group)
            id_map.update(zip(saved["params"], group["params"]))
            group_of.update({id(p): new_group for p in group["params"]})

        new_state: dict[torch.Tensor, dict] = {}
        for key, saved_state in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state dict has state for parameter {key!r}, which no group lists")
            p = id_map[key]
            required = [s.name for s in alg.slots if s.option is None and s.shape_for(p.shape) is not None]
            unknown = set(saved_state) - set(self._state_keys())
            if unknown or not saved_state:
                raise ValueError(
                    f"state of parameter {key!r} has keys {sorted(saved_state)}; a {alg.name} state has "
                    f"{list(self._state_keys())} (is it from another optimizer?)"
                )
            for k in ("step", *required) if self._step_saved(group_of[id(p)]) else required:
                if k not in saved_state:
                    raise ValueError(f"state of parameter {key!r} lacks {k!r}")
            new_state[p] = self._convert_loaded_state(key, p, saved_state, group_of[id(p)])
        for group in new_groups:
            for slot in alg.slots:
                if slot.option is None or not group.get(slot.option):
                    continue
                for p in group["params"]:
                    if (
                        p in new_state
                        and slot.name not in new_state[p]
                        and slot.shape_for(p.shape) is not None
                    ):
                        raise ValueError(
                            f"the state dict enables {slot.option} but has no {slot.name!r} for a parameter"
                        )

        # Everything checked: commit.
        self._plans, self._checked = {}, {}  # the kernel's tables point at the old state
        self.state = StateMap(new_state)
        self.param_groups = new_groups
        clip = state_dict.get("release_clip")
        if clip is not None and self._release is not None:
            self._release.scale = float(clip["scale"])
            self.last_grad_norm = clip["last_grad_norm"]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "weight_decay")

    def _from_torch_group(self, saved: dict, group: dict) -> dict:
        """A saved group as this optimizer's: torch.optim's version of an algorithm may lack
        keys of ours that its groups imply (algorithms override; ``group`` is the live one)."""
        return saved

    def _step_saved(self, group: dict) -> bool:
        """Whether a saved state of ``group`` must have ``step`` (algorithms override)."""
        return self.algorithm.uses_step

    def _loaded_group(self, group: dict) -> None:
        """Adjust a loaded group to this optimizer (e.g. AdamW's decoupled decay); algorithms override."""

    def _convert_loaded_state(self, key, p: torch.Tensor, saved: dict, group: dict) -> dict:
        """Check one parameter's saved state and convert it to this optimizer's formats.

        Same format: tensors are copied bit for bit (resuming is bit-identical). Another format:
        slots are decoded to fp32 and encoded again; Kahan/master buffers are derived from each
        other (comp = master - round(master)) where one is saved and the other wanted."""

        def bad(msg: str) -> ValueError:
            return ValueError(f"state of parameter {key!r}: {msg}")

        fmt = self._formats(group, p)
        out: dict[str, torch.Tensor] = {}
        step = saved.get("step", 0.0)  # absent only where the algorithm does not use it
        if not isinstance(step, torch.Tensor):
            step = torch.tensor(float(step))
        if step.numel() != 1:
            raise bad("'step' must be a scalar")
        out["step"] = step.detach().to(device="cpu", dtype=torch.float32).reshape(()).clone()
        shape = saved.get("param_shape")  # 8-bit state dicts of this version have it
        if shape is not None and [int(x) for x in shape] != list(p.shape):
            raise bad(
                f"its 8-bit state belongs to a parameter of shape {tuple(int(x) for x in shape)}, "
                f"not {tuple(p.shape)}; the state dict belongs to another model"
            )
        for slot in self.algorithm.slots:
            name = slot.name
            if name not in saved:
                continue
            v = saved[name]
            scale = saved.get(name + "_scale")
            want = slot.shape_for(p.shape)
            if want is None:
                raise bad(f"it has {name!r}, which is not kept for a parameter of shape {tuple(p.shape)}")
            if scale is not None:  # 8-bit codes + block scales
                value = self._loaded_8bit(bad, slot, v, scale, p, want, fmt, out)
                if value is None:  # the same format: kept bit for bit
                    continue
            else:
                if tuple(v.shape) != want:
                    raise bad(
                        f"{name!r} has shape {tuple(v.shape)}, expected {want} for a parameter of shape "
                        f"{tuple(p.shape)}; the state dict belongs to another model"
                    )
                if not v.is_floating_point():
                    raise TypeError(f"state[{key!r}][{name!r}] must be floating point, got {v.dtype}")
                value = _placed_like(v.detach().to(p.device), p, slot)
            sf = slot_format(fmt.state, slot, p)
            if sf == "8bit":
                out[name], out[name + "_scale"] = _encode8(slot, dist.local(value).float(), p)
            else:
                out[name] = value.to(state_dtype(sf), copy=True)
        saved_aux = {}
        for name in _AUX_KEYS:
            t = saved.get(name)
            if t is None:
                continue
            if t.shape != p.shape:
                raise bad(f"{name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if name == "kahan_comp8" and t.dtype != torch.int8:
                raise bad(f"'kahan_comp8' must be int8, got {t.dtype}")
            if name != "kahan_comp8" and not t.is_floating_point():
                raise bad(f"{name!r} must be floating point, got {t.dtype}")
            saved_aux[name] = _placed_like(t.detach().to(p.device), p)
        wanted = param_aux_key(fmt.param)
        if wanted is not None:
            if wanted in saved_aux:  # the same buffer: kept bit for bit (kahan_comp in p's dtype)
                t = saved_aux[wanted]
                dtype = {"kahan_comp": p.dtype, "kahan_comp8": torch.int8}.get(wanted, torch.float32)
                out[wanted] = t.to(dtype, copy=True)
            elif saved_aux:  # another one: the fp32 value it holds, carried into this one (nothing
                # is lost beyond the new buffer's resolution; master_weight first, the most precise)
                key = next(k for k in ("master_weight", "kahan_comp", "kahan_comp8") if k in saved_aux)
                out[wanted] = _aux_from_value(p, wanted, _aux_value(p, key, saved_aux[key]))
        elif saved_aux:
            key = next(iter(saved_aux))
            raise bad(
                f"it has {key!r}, but this optimizer "
                f"keeps the parameter as {fmt.param!r} ({p.dtype}); build it with the same "
                "kahan_sum/master_weights options, or use load_full_precision_params()"
            )
        return out

    def _loaded_8bit(self, bad, slot, v, scale, p, want, fmt, out):
        """Saved 8-bit codes and scales of one slot: checked against the parameter's global shape,
        then kept bit for bit (``out``; returns None) where this optimizer stores the slot in 8 bit
        too, else decoded to fp32 values placed like the parameter (returned).

        Layouts: rows (2-D codes, this version's for >= 2-D parameters) or flat (1-D; older
        versions kept every tensor flat). Flat codes of a >= 2-D parameter are put into rows:
        the same bytes where rows are whole blocks, else decoded and encoded again in rows."""
        name = slot.name
        if v.dtype != torch.uint8:
            raise bad(f"{name!r} holds 8-bit codes of dtype {v.dtype}, expected uint8")
        rows = slot.shape is None and len(want) >= 2
        length = quant8.row_length(want) if rows else math.prod(want)
        if v.dim() == 2:
            if not rows or tuple(v.shape) != (want[0], quant8.padded(length)):
                raise bad(
                    f"{name!r} holds 8-bit codes of shape {tuple(v.shape)}, expected "
                    f"{(want[0], quant8.padded(length)) if rows else (quant8.padded(length),)} uint8 for "
                    f"a parameter of shape {tuple(p.shape)}"
                )
            nb = (want[0], quant8.blocks(length))
        else:
            n = math.prod(want)
            if tuple(v.shape) != (quant8.padded(n),):
                raise bad(
                    f"{name!r} holds 8-bit codes of shape {tuple(v.shape)}, expected "
                    f"({quant8.padded(n)},) uint8 for a parameter of {n} elements"
                )
            nb = (quant8.blocks(n),)
        if tuple(scale.shape) != nb:
            raise bad(f"{name + '_scale'!r} has shape {tuple(scale.shape)}, expected {nb}")
        full = [x.full_tensor() if dist.is_dtensor(x) else x for x in (v, scale)]
        codes, scales = (x.detach().to(p.device) for x in full)
        scales = scales.float()
        if rows and codes.dim() == 1:  # an older flat checkpoint
            codes, scales = quant8.to_rows(slot.signed, codes, scales, want)
        if slot_format(fmt.state, slot, p) == "8bit":
            out[name] = _placed_like(codes, p).clone() if dist.is_dtensor(p) else codes.clone()
            out[name + "_scale"] = _placed_like(scales, p).clone() if dist.is_dtensor(p) else scales.clone()
            return None
        value = quant8.decode(slot.signed, codes, scales, want, torch.float32, codes.dim() == 2)
        return _placed_like(value, p, slot)
