"""The engine's options, shared by every optimizer, validated in one place: storage and backend
options of a parameter group (``ENGINE_DEFAULTS``), options of the optimizer as a whole
(``OPTIMIZER_OPTIONS``), torch's backend spellings, and the validation helpers the algorithms'
``check`` functions use. Each option is documented once, in :data:`ENGINE_OPTIONS_DOC`, which every
optimizer's docstring shows (``{engine_options}`` in a class docstring)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..storage.formats import STATE_FORMATS

BACKENDS = ("auto", "reference", "foreach", "fused")

# Group keys torch.optim's optimizers read in step(); kept in our groups with torch-compatible
# values so that state dicts move between torch and adamkit both ways.
TORCH_GROUP_DEFAULTS = {"capturable": False, "differentiable": False}
# Group options of the engine, shared by every algorithm: how state is stored and which backend
# runs. They are this process's choice: load_state_dict keeps them (and converts the state).
STORAGE_OPTIONS = ("kahan_sum", "stochastic_rounding", "master_weights", "state_format", "min_8bit_size")
ENGINE_DEFAULTS = dict(
    maximize=False,
    kahan_sum=None,
    stochastic_rounding=False,
    master_weights=False,
    state_format=None,
    min_8bit_size=4096,
    skip_nonfinite=False,
    backend="auto",
    foreach=None,
    fused=None,
    capturable=False,
    differentiable=False,
)


# --------------------------------------------------------------------------------------------------
# Validation helpers (algorithms use them in their ``check``)
# --------------------------------------------------------------------------------------------------


def as_float(name: str, value: Any) -> float:
    """A hyperparameter as a float: Python numbers and one-element tensors are accepted."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex():
            raise TypeError(f"{name} must be real, got a complex tensor")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_nonneg(name: str, value: Any) -> float:
    x = as_float(name, value)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"Invalid {name}: {x}; it must be a finite number >= 0")
    return x


def check_betas(betas: Any, n: int = 2) -> tuple[float, ...]:
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    out = tuple(as_float(f"betas[{i}]", b) for i, b in enumerate(betas))
    for i, b in enumerate(out):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}; it must be in [0, 1)")
    return out


def check_bools(group: dict, keys: Iterable[str]) -> None:
    for key in keys:
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{key} must be a bool, got {group[key]!r}")


def switches(group: dict, *names: str) -> tuple[str, ...]:
    """The algorithm's switches (``Flags.options``) that are on in ``group``, in the order given;
    a group without the key (a state dict saved before the switch existed) has it off."""
    return tuple(n for n in names if group.get(n, False))


def refuse_skip_nonfinite(group: dict, name: str) -> None:
    """For algorithms whose statistics mix elements (row means, norms): one element's inf/nan
    cannot be skipped alone."""
    if group.get("skip_nonfinite", False):
        raise ValueError(
            f"skip_nonfinite=True is not supported by adamkit.{name}: its statistics mix elements "
            "(norms, row/column means), so a non-finite element cannot be skipped alone"
        )


# Options of the optimizer as a whole (not of a group), shared by every algorithm.
OPTIMIZER_OPTIONS = (
    "gradient_release",
    "max_grad_norm",
    "skip_nonfinite_steps",
    "accumulation_steps",
    "release_clipping",
    "release_check",
)

# The engine's options as every optimizer's docstring shows them (Args entries, 8-space indent).
ENGINE_OPTIONS_DOC = r"""maximize: maximize the objective instead of minimizing.
        kahan_sum: bf16/fp16 parameters keep a compensation buffer ``kahan_comp`` in their dtype
            (+2 B/param) holding what rounding drops; the whole update, decay included, goes
            through it. ``None`` (default): on for bf16/fp16 parameters. ``"8bit"``: bf16
            parameters keep it as an int8 ``kahan_comp8`` (+1 B/param) in units of ulp(p)/256,
            rounded stochastically: p + q * ulp(p)/256 holds ~16 significant bits
            (``storage/formats.py``).
        stochastic_rounding: round bf16 parameters stochastically (unbiased, no buffer).
        master_weights: keep an fp32 ``master_weight`` (+4 B/param) that takes the update; the
            bf16/fp16 parameter is its rounded copy, the one the forward pass uses.
        state_format: how the state slots are stored: ``None`` (the parameter's dtype; fp32 for
            fp16 parameters), ``"fp32"`` (4 B/element), ``"bf16"`` (2 B, stochastic rounding),
            ``"8bit"`` (1 B + a 2 B scale per group of 32; see ``adamkit.storage.quant8``).
        min_8bit_size: tensors with fewer elements keep fp32 state under ``"8bit"``.
        skip_nonfinite: an element whose gradient is inf/nan keeps its parameter and state
            (elementwise algorithms; refused, with the reason, by those that mix elements).
        backend: ``"auto"``, ``"reference"`` (per-tensor loop: the spec), ``"foreach"``
            (multi-tensor kernels) or ``"fused"`` (the native kernel; see the README).
        foreach, fused: torch's spellings; ``foreach=True`` means ``backend="foreach"``,
            ``foreach=False`` means ``"reference"``, ``fused=True`` means ``"fused"``,
            ``fused=False`` means "not fused" (``"foreach"``).
        capturable, differentiable: accepted for signature compatibility; only ``False`` is supported.
        max_grad_norm: clip the global L2 norm of the step's gradients, exactly as
            ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` before ``step()``
            (:math:`g \leftarrow g \min(1, \frac{c}{\|g\|_2 + 10^{-6}})`), but fused: the
            coefficient multiplies each gradient in the kernel as it is read (the gradients are not
            rewritten). ``opt.last_grad_norm`` holds the norm. With ``gradient_release`` the
            *previous* step's global norm is used (the first step is not clipped): see the README.
        skip_nonfinite_steps: skip the whole step (parameters, state, step counters unchanged)
            when any gradient has an inf/nan; counted in ``opt.skipped_steps``. One host
            synchronization per step. ``torch.amp.GradScaler`` works as with torch's fused
            optimizers: its unscale is folded into the kernels, a step it finds inf/nan in is skipped.
        gradient_release: step each parameter inside ``loss.backward()`` as soon as its gradient
            is accumulated, and free that gradient (peak memory loses the gradient buffer:
            4 B/param for fp32 gradients). ``step()`` and ``zero_grad()`` stay callable (they do
            nothing to released parameters); every backward is a step (no gradient accumulation);
            refused with GradScaler; under DDP use :func:`adamkit.release_comm_hook`; not kept
            through pickling or deepcopy. ``remove_gradient_release()`` stops it (state kept).
        accumulation_steps: with ``gradient_release``, optimizer accumulation over k micro-batches
            (k backward passes) without a gradient buffer: parameters, weight decay and the step
            count change once per k, the micro-batches folded into the state as the algorithm
            defines (its ``Accumulation``; refused with the reason where it has none). The lr and
            hyperparameters used are the group's at the window's last micro-batch; not with
            ``skip_nonfinite`` / ``skip_nonfinite_steps``; a state dict can be taken only between
            windows. With ``max_grad_norm`` the clipping coefficient comes from the previous
            window's root-mean-square micro-batch norm :math:`\sqrt{\frac1k\sum_j \|g_j\|^2}`.
        release_clipping: how ``max_grad_norm`` clips with ``gradient_release`` (exact global-norm
            clipping needs every gradient before the first step): ``"previous_step"`` (default)
            scales every gradient by the coefficient of the previous step's global norm;
            ``"per_tensor"`` clips each tensor to its own norm,
            :math:`g_i \leftarrow g_i \min(1, \frac{c}{\|g_i\|_2 + 10^{-6}})`, which bounds the
            global norm by :math:`c\sqrt{n}` for n tensors, not c (one host read per tensor).
        release_check: with ``gradient_release`` (and ``accumulation_steps=1``), the first
            backward keeps its gradients until ``step()`` or ``zero_grad()``, which steps them as
            the hooks would have, after refusing what release cannot honour, before anything is
            stepped: gradients changed in between (``clip_grad_norm_``: use ``max_grad_norm``),
            a second backward first (use ``accumulation_steps``), GradScaler. Default True;
            False releases from the first backward and checks nothing."""


def engine_kwargs(cls_name: str, kw: dict) -> tuple[dict, dict]:
    """Split the engine's keyword arguments a variant passes through (``**engine``) into group
    options and optimizer options; every algorithm takes the same ones (each then applies or is
    refused with the reason by the engine). Other names raise."""
    unknown = sorted(set(kw) - set(ENGINE_DEFAULTS) - set(OPTIMIZER_OPTIONS))
    if unknown:
        raise TypeError(f"{cls_name}() got unexpected keyword arguments {unknown}")
    group = {k: v for k, v in kw.items() if k in ENGINE_DEFAULTS}
    return group, {k: v for k, v in kw.items() if k in OPTIMIZER_OPTIONS}


class OptimizerOptions(NamedTuple):
    gradient_release: bool
    max_grad_norm: float | None
    skip_nonfinite_steps: bool
    accumulation_steps: int
    release_clipping: str
    release_check: bool


def optimizer_options(
    algorithm,
    gradient_release: bool = False,
    max_grad_norm: float | None = None,
    skip_nonfinite_steps: bool = False,
    accumulation_steps: int = 1,
    release_clipping: str = "previous_step",
    release_check: bool = True,
) -> OptimizerOptions:
    """The optimizer options (:data:`OPTIMIZER_OPTIONS`, documented in :data:`ENGINE_OPTIONS_DOC`)
    validated for ``algorithm``; raises before anything is built, naming what to do instead."""
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
        if algorithm.accumulation is None:
            raise ValueError(
                f"accumulation_steps > 1 is not supported by adamkit.{algorithm.name}: "
                f"{algorithm.no_accumulation}; use gradient_release=False and ordinary "
                "gradient accumulation"
            )
        if skip_nonfinite_steps:
            raise ValueError(
                "accumulation_steps > 1 cannot skip a whole step (skip_nonfinite_steps=True): the "
                "window's micro-batches are folded as they come"
            )
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
    if not isinstance(release_check, bool):
        raise TypeError(f"release_check must be a bool, got {release_check!r}")
    return OptimizerOptions(
        gradient_release,
        max_grad_norm,
        skip_nonfinite_steps,
        accumulation_steps,
        release_clipping,
        release_check,
    )


def check_engine_options(group: dict) -> None:
    """The storage, precision and backend options every algorithm has."""
    check_bools(group, ("maximize", "stochastic_rounding", "master_weights", "skip_nonfinite"))
    for key in ("capturable", "differentiable"):
        if group.get(key, False):
            raise ValueError(
                f"{key}=True is not supported by adamkit; pass {key}=False (adamkit's kernels need no "
                "CUDA-graph capture, and its step is not differentiable)"
            )
    kahan = group.get("kahan_sum")
    if kahan is not None and not isinstance(kahan, bool) and kahan != "8bit":
        raise TypeError(
            f"kahan_sum must be None, a bool, or '8bit' (an int8 compensation, 1 B/param, for bfloat16 "
            f"parameters), got {kahan!r}"
        )
    n_modes = bool(kahan) + group.get("stochastic_rounding", False) + group.get("master_weights", False)
    if n_modes > 1:
        raise ValueError(
            "choose at most one of kahan_sum=True, stochastic_rounding=True, master_weights=True: "
            "each is a complete recipe for low-precision parameters"
        )
    sf = group.get("state_format")
    if sf is not None and sf not in STATE_FORMATS:
        raise ValueError(f"Invalid state_format: {sf!r}; choose None or one of {STATE_FORMATS}")
    m8 = group.get("min_8bit_size", 4096)
    if isinstance(m8, bool) or not isinstance(m8, int) or m8 < 0:
        raise ValueError(f"Invalid min_8bit_size: {m8!r}; it must be an int >= 0")
    backend = group.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {BACKENDS}")


def resolve_backend(backend: str, foreach: bool | None, fused: bool | None) -> str:
    """Map torch's ``foreach=``/``fused=`` spellings onto ``backend``; conflicts raise.

    As in torch: ``fused=True`` is the fused backend, ``foreach=True`` the multi-tensor one,
    ``foreach=False`` the per-tensor loop, and ``fused=False`` means "not fused" (foreach, unless
    foreach=False asks for the loop)."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {BACKENDS}")
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot both be set; choose one backend")
    if fused:
        wanted = "fused"
    elif foreach:
        wanted = "foreach"
    elif foreach is False:
        wanted = "reference"
    elif fused is False:
        wanted = "foreach"
    else:
        return backend
    if backend not in ("auto", wanted):
        raise ValueError(f"backend={backend!r} conflicts with foreach={foreach}, fused={fused}")
    return wanted


# Fully decoupled weight decay (decouple_lr, max_lr): p *= 1 - (lr / max_lr) * wd, for every
# algorithm with decoupled decay (Adam/AdamW, Lion).


def check_max_lr(group: dict) -> float | None:
    """``max_lr`` and ``decouple_lr`` (fully decoupled decay), for every algorithm that has them."""
    max_lr = group.get("max_lr")
    if max_lr is not None:
        max_lr = as_float("max_lr", max_lr)
        if not math.isfinite(max_lr) or max_lr <= 0:
            raise ValueError(f"Invalid max_lr: {max_lr}; it must be a finite number > 0")
    check_bools(group, ("decouple_lr",))
    if group.get("decouple_lr", False) and max_lr is None:
        raise ValueError("decouple_lr=True needs max_lr (it defaults to the group's initial lr)")
    return max_lr


def default_max_lr(group: dict) -> None:
    """``max_lr`` defaults to the group's initial lr (where it is > 0)."""
    if group.get("max_lr") is None:
        lr = as_float("lr", group["lr"])
        if lr <= 0 and group.get("decouple_lr"):
            raise ValueError("decouple_lr=True needs max_lr > 0; the group's lr is 0, pass max_lr")
        group["max_lr"] = lr if lr > 0 else None  # lr == 0 and no decoupling: max_lr is unused


def loaded_max_lr(group: dict) -> None:
    """A loaded group without ``max_lr`` (torch's, or saved before it existed): its initial lr."""
    if group.get("max_lr") is None:
        group["max_lr"] = as_float("lr", group.get("initial_lr", group["lr"]))


def warn_strong_decay(opt) -> None:
    """Fully decoupled decay is not multiplied by lr: weight_decay is the fraction removed per step
    at peak lr, so torch-sized values (1e-2) shrink weights 1000x faster. Warns once per optimizer
    (a flag on it: a key such as id(opt) is reused by the next optimizer once one is collected),
    as a UserWarning, the category of a suspicious argument (optimi's too)."""
    strong = [i for i, g in enumerate(opt.param_groups) if g.get("decouple_lr") and g["weight_decay"] >= 1e-3]
    if strong and not getattr(opt, "_strong_decay_warned", False):
        opt._strong_decay_warned = True
        warnings.warn(
            f"adamkit: parameter group(s) {strong} use decouple_lr=True with weight_decay >= 1e-3; "
            "fully decoupled decay removes weight_decay * (lr / max_lr) of each weight per step, "
            "not lr * weight_decay: typical values are ~1e-5 to 1e-4 (1e-2 / 1e3 for lr=1e-3)",
            UserWarning,
            stacklevel=4,
        )
