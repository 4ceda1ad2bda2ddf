r"""Adam and AdamW: drop-in replacements for ``torch.optim.Adam`` / ``torch.optim.AdamW``.

References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    Reddi et al., "On the Convergence of Adam and Beyond" (AMSGrad), ICLR 2018.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from . import _backends, _fused, _quant
from ._backends import MOMENTS, Item, moment_names
from ._math import Flags, adam_scalars
from ._storage import (
    LOW_PRECISION,
    STATE_FORMATS,
    Formats,
    choose_formats,
    init_param_aux,
    param_aux_key,
    state_dtype,
)

_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")

_AUX_KEYS = ("kahan_comp", "master_weight")
_STATE_KEYS = ("step", *MOMENTS, *(m + "_scale" for m in MOMENTS), *_AUX_KEYS)

# Group keys torch.optim.Adam/AdamW read in step(); kept in our groups (with torch-compatible
# values) so that our state dicts load into torch's optimizers and theirs into ours.
_TORCH_GROUP_DEFAULTS = {"capturable": False, "differentiable": False}


def _as_float(name: str, value: Any) -> float:
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


def _check_nonneg(name: str, value: Any) -> float:
    x = _as_float(name, value)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"Invalid {name}: {x}; it must be a finite number >= 0")
    return x


def _check_group(group: dict) -> dict:
    """Validate one group's hyperparameters; returns them as floats. Raises, never mutates."""
    lr = _check_nonneg("lr", group["lr"])
    eps = _check_nonneg("eps", group["eps"])
    wd = _check_nonneg("weight_decay", group["weight_decay"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1, b2 = (_as_float(f"betas[{i}]", b) for i, b in enumerate(betas))
    for i, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}; it must be in [0, 1)")
    max_lr = group.get("max_lr")
    if max_lr is not None:
        max_lr = _as_float("max_lr", max_lr)
        if not math.isfinite(max_lr) or max_lr <= 0:
            raise ValueError(f"Invalid max_lr: {max_lr}; it must be a finite number > 0")
    for key in ("amsgrad", "maximize", "decoupled_weight_decay", "decouple_lr"):
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{key} must be a bool, got {group[key]!r}")
    for key in ("capturable", "differentiable"):
        if group.get(key, False):
            raise ValueError(
                f"{key}=True is not supported by adamkit; pass {key}=False (adamkit's fused "
                "backend is compiled and needs no CUDA-graph capture)"
            )
    for key in ("stochastic_rounding", "master_weights", "skip_nonfinite"):
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{key} must be a bool, got {group[key]!r}")
    kahan = group.get("kahan_sum")
    if kahan is not None and not isinstance(kahan, bool):
        raise TypeError(f"kahan_sum must be None or a bool, got {kahan!r}")
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
    if backend not in _backends.BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {_backends.BACKENDS}")
    if group.get("decouple_lr", False) and max_lr is None:
        raise ValueError("decouple_lr=True needs max_lr (it defaults to the group's initial lr)")
    if group.get("decouple_lr", False):
        wd_mode = "full"
    elif group.get("decoupled_weight_decay", False):
        wd_mode = "decoupled"
    else:
        wd_mode = "l2"
    if wd == 0:
        wd_mode = "none"
    return dict(lr=lr, eps=eps, weight_decay=wd, beta1=b1, beta2=b2, max_lr=max_lr, wd_mode=wd_mode)


def _resolve_backend(backend: str, foreach: bool | None, fused: bool | None) -> str:
    """Map torch's ``foreach=``/``fused=`` spellings onto ``backend``; conflicts raise."""
    if backend not in _backends.BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {_backends.BACKENDS}")
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot both be set; choose one backend")
    wanted = "fused" if fused else "foreach" if foreach else "reference" if foreach is False else None
    if wanted is None:
        return backend
    if backend not in ("auto", wanted):
        raise ValueError(f"backend={backend!r} conflicts with foreach={foreach}, fused={fused}")
    return wanted


class Adam(Optimizer):
    r"""Adam, with L2 (coupled), decoupled or fully decoupled weight decay and AMSGrad.

    .. math::
       \begin{aligned}
         &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            \theta_0, \text{amsgrad}, \text{maximize}, \gamma_{max} \text{ (max\_lr)} \\
         &m_0 \leftarrow 0,\; v_0 \leftarrow 0,\; \hat v^{max}_0 \leftarrow 0 \\
         &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
         &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \quad (-\nabla \text{ if maximize}) \\
         &\quad \textit{decay:} \begin{cases}
              g_t \leftarrow g_t + \lambda\theta_{t-1} & \text{L2 (Adam default)} \\
              \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) & \text{decoupled (AdamW)} \\
              \theta_{t-1} \leftarrow \theta_{t-1}(1 - \tfrac{\gamma}{\gamma_{max}}\lambda)
                 & \text{fully decoupled (decouple\_lr)}
            \end{cases} \\
         &\quad \textit{moments:}\; m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
         &\quad \textit{amsgrad:}\; v_t \leftarrow \hat v^{max}_t \leftarrow \max(\hat v^{max}_{t-1}, v_t) \\
         &\quad \textit{bias correction:}\; \hat m_t = m_t / (1-\beta_1^t),\quad
              \hat v_t = v_t / (1-\beta_2^t) \\
         &\quad \textit{precondition, apply:}\;
              \theta_t \leftarrow \theta_{t-1} - \gamma\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)
       \end{aligned}

    The fully decoupled decay :math:`\theta(1 - \frac{\gamma}{\gamma_{max}}\lambda)` makes the decay
    per step independent of the learning rate's scale (Loshchilov & Hutter's own formulation): with a
    schedule it follows the schedule's shape, and ``weight_decay`` is the fraction removed per step at
    peak lr (so 1e-4, not 1e-2, is a typical value).

    Args:
        params: parameters or parameter groups (dicts), as for any ``torch.optim.Optimizer``.
        lr: learning rate :math:`\gamma` (float or 1-element tensor). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` added to :math:`\sqrt{\hat v}`. Default 1e-8.
        weight_decay: :math:`\lambda`. Default 0 (Adam), 1e-2 (AdamW).
        amsgrad: use the running maximum of :math:`v` (AMSGrad).
        maximize: maximize the objective instead of minimizing.
        decoupled_weight_decay: decay the weights, not the gradient (AdamW). Adam only.
        decouple_lr: fully decoupled decay, :math:`\theta(1 - \frac{\gamma}{\gamma_{max}}\lambda)`.
        max_lr: :math:`\gamma_{max}`; defaults to the group's initial lr.
        kahan_sum: bf16/fp16 parameters keep a compensation buffer ``kahan_comp`` in their dtype
            (+2 B/param) holding what rounding drops; the whole update, decay included, goes
            through it. ``None`` (default): on for bf16/fp16 parameters.
        stochastic_rounding: round bf16 parameters stochastically (unbiased, no buffer).
        master_weights: keep an fp32 ``master_weight`` (+4 B/param) that takes the update; the
            bf16/fp16 parameter is its rounded copy, the one the forward pass uses.
        state_format: how m, v (and max v) are stored: ``None`` (the parameter's dtype; fp32 for
            fp16 parameters), ``"fp32"`` (4 B each), ``"bf16"`` (2 B, stochastic rounding),
            ``"8bit"`` (1 B + a 4 B scale per block of 256; see ``adamkit._quant``).
        min_8bit_size: tensors with fewer elements keep fp32 moments under ``"8bit"``.
        skip_nonfinite: an element whose gradient is inf/nan keeps its parameter and moments.
        backend: ``"auto"``, ``"reference"`` (per-tensor loop: the spec), ``"foreach"``
            (multi-tensor kernels) or ``"fused"``.
        foreach, fused: torch's spellings; ``foreach=True`` means ``backend="foreach"``,
            ``foreach=False`` means ``"reference"``, ``fused=True`` means ``"fused"``.
        capturable, differentiable: accepted for signature compatibility; only ``False`` is supported.

    State per parameter (bytes per parameter for fp32 parameters): ``step`` (a 0-D fp32 tensor),
    ``exp_avg`` m (4 B), ``exp_avg_sq`` v (4 B), ``max_exp_avg_sq`` (4 B, amsgrad only); 8-bit
    moments add ``<name>_scale``. With the default options keys, shapes and dtypes equal torch's,
    so state dicts move between torch and adamkit both ways.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = adamkit.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        kahan_sum: bool | None = None,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
        state_format: str | None = None,
        min_8bit_size: int = 4096,
        skip_nonfinite: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay or decouple_lr,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            kahan_sum=kahan_sum,
            stochastic_rounding=stochastic_rounding,
            master_weights=master_weights,
            state_format=state_format,
            min_8bit_size=min_8bit_size,
            skip_nonfinite=skip_nonfinite,
            backend=_resolve_backend(backend, foreach, fused),
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )
        # Validate the defaults as a group would be validated (max_lr falls back to lr there).
        _check_group({**defaults, "max_lr": max_lr if max_lr is not None else _as_float("lr", lr) or 1.0})
        self._layouts: dict[int, _fused.GroupLayout] = {}  # fused backend: flat layout per group
        super().__init__(params, defaults)
        if any(g["backend"] == "fused" for g in self.param_groups):
            reason = _fused.compiler_missing_reason()
            if reason is not None:
                raise RuntimeError(f"backend='fused' is unavailable: {reason}; use backend='foreach'")

    def __setstate__(self, state: dict) -> None:
        # Checkpoints pickled by older versions get defaults for options added later.
        super().__setstate__(state)
        self._layouts = {}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (validated first: a bad group raises and leaves the optimizer unchanged)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, set):
            raise TypeError("optimizer params must be an ordered collection (a set has no order)")
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        param_group["params"] = params
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
        merged = {**self.defaults, **param_group}
        if merged.get("max_lr") is None:
            merged["max_lr"] = _as_float("lr", merged["lr"])
        if "backend" in param_group or "foreach" in param_group or "fused" in param_group:
            merged["backend"] = _resolve_backend(
                merged.get("backend", "auto"), merged.get("foreach"), merged.get("fused")
            )
        if merged.get("decouple_lr"):
            merged["decoupled_weight_decay"] = True
        if merged["max_lr"] <= 0 and merged.get("decouple_lr"):
            raise ValueError("decouple_lr=True needs max_lr > 0; the group's lr is 0, pass max_lr")
        if merged["max_lr"] <= 0:
            merged["max_lr"] = None  # lr == 0 and no decoupling: max_lr is unused
        _check_group(merged)
        for p in tensors:  # format options that cannot apply to a parameter's dtype fail here
            choose_formats(
                p.dtype,
                merged["kahan_sum"],
                merged["stochastic_rounding"],
                merged["master_weights"],
                merged["state_format"],
            )
        param_group.update({k: v for k, v in merged.items() if k != "params"})
        if named:
            param_group.setdefault("param_names", [n for n, _ in named])
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------------------
    # Lazy state initialization
    # ------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # The flat layout holds hooks and views; it is rebuilt on the next step after unpickling.
        return {k: v for k, v in super().__getstate__().items() if k != "_layouts"}

    def _formats(self, group: dict, p: torch.Tensor) -> Formats:
        fmt = choose_formats(
            p.dtype,
            group["kahan_sum"],
            group["stochastic_rounding"],
            group["master_weights"],
            group["state_format"],
        )
        if fmt.state == "8bit" and p.numel() < group["min_8bit_size"]:
            # Small tensors (norms, biases) keep fp32 moments: their 8-bit saving is a few bytes and
            # a 256-block would be mostly padding.
            fmt = fmt._replace(state="fp32")
        return fmt

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Create missing state of ``p``: step, moments in their format, Kahan/master buffers."""
        state = self.state[p]
        fmt = self._formats(group, p)
        if "step" not in state:
            # step: a 0-D fp32 CPU tensor, as torch's non-fused Adam keeps it (state dicts interchange)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for name in moment_names(group["amsgrad"]):
            if name in state:
                continue
            if fmt.state == "8bit":
                # 1 B/param of codes (padded to a 256-block) + 4 B per block of scale
                state[name], state[name + "_scale"] = _quant.zeros(p.numel(), _quant.SIGNED[name], p.device)
            else:
                # m, v, max v: 4 B/param in fp32, 2 in bf16/fp16 (the param's dtype by default)
                dt = state_dtype(fmt.state)
                state[name] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        aux = param_aux_key(fmt.param)
        if aux is not None and aux not in state:
            state[aux] = init_param_aux(fmt.param, p)  # kahan_comp 2 B/param, master_weight 4 B/param
        return state

    def _item(self, p: torch.Tensor, group: dict, uid: int) -> Item:
        state = self.state[p]
        t = {k: v for k, v in state.items() if k != "step"}
        t["param"], t["grad"] = p, p.grad
        return Item(t, self._formats(group, p), float(state["step"]), uid)

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Pass 1: check everything, so that bad input raises before any state or parameter changes.
        work = []
        for group in self.param_groups:
            hp = _check_group(group)
            # map()/compress() keep these per-parameter loops in C (they run every step)
            grads = list(map(_GRAD, group["params"]))
            has_grad = list(map(operator.is_not, grads, itertools.repeat(None)))
            params = list(itertools.compress(group["params"], has_grad))
            # Parameters cannot be complex (rejected in add_param_group) and autograd gives a
            # gradient its parameter's dtype, so only the layout needs checking here.
            if any(map(_IS_SPARSE, itertools.compress(grads, has_grad))):
                raise RuntimeError(
                    "adamkit.Adam does not support sparse gradients; use torch.optim.SparseAdam "
                    "or a dense embedding (sparse=False)"
                )
            work.append((group, hp, params))

        # Pass 2: update.
        for group, hp, params in work:
            if params:
                self._update_group(group, hp, params)
        return loss

    def _backend_for(self, group: dict) -> str:
        """The dispatcher: the only place that knows defaults and fallbacks."""
        backend = group["backend"]
        if backend in ("auto", "fused"):
            reason = _fused.compiler_missing_reason()
            if reason is None:
                return "fused"
            if backend == "fused":
                raise RuntimeError(f"backend='fused' is unavailable: {reason}; use backend='foreach'")
            # auto: foreach is the fastest backend that needs no compiler; say so once.
            _fused.warn_fallback_once(reason)
            return "foreach"
        return backend

    def _update_group(self, group: dict, hp: dict, params: list[torch.Tensor]) -> None:
        flags = Flags(
            wd_mode=hp["wd_mode"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            skip_nonfinite=group["skip_nonfinite"],
        )

        def scalars_of(step: float):
            return adam_scalars(
                lr=hp["lr"],
                beta1=hp["beta1"],
                beta2=hp["beta2"],
                eps=hp["eps"],
                weight_decay=hp["weight_decay"],
                wd_mode=hp["wd_mode"],
                max_lr=hp["max_lr"],
                step=step,
                maximize=group["maximize"],
            )

        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        # uid: the parameter's position in the optimizer, stable across save/load (seeds rounding)
        base = sum(len(g["params"]) for g in self.param_groups[:index]) + 1
        uids: dict[int, int] = {}

        def item_of(p: torch.Tensor) -> Item:
            """p's share of this step for a per-tensor runner; its step counter is advanced."""
            if not uids:
                uids.update((id(q), base + i) for i, q in enumerate(group["params"]))
            state = self._init_state(p, group)
            state["step"] += 1
            return self._item(p, group, uids[id(p)])

        backend = self._backend_for(group)
        if backend == "fused":
            _fused.fused_step(
                self._layouts,
                index,
                params,
                self.state,
                lambda p: self._init_state(p, group),
                lambda p: self._formats(group, p),
                item_of,
                scalars_of,
                flags,
            )
            return
        _backends.RUNNERS[backend]([item_of(p) for p in params], scalars_of, flags)

    # ------------------------------------------------------------------------------------------
    # full-precision values of low-precision parameters
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def full_precision_params(self) -> list[torch.Tensor]:
        """fp32 values of every parameter, in group order: the master weight, or p + kahan_comp,
        or the parameter itself. Save these to keep what the low-precision copy rounds away."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "master_weight" in st:
                    out.append(st["master_weight"].clone())
                elif "kahan_comp" in st:
                    out.append(p.detach().float() + st["kahan_comp"].float())
                else:
                    out.append(p.detach().clone())
        return out

    @torch.no_grad()
    def load_full_precision_params(self, values: Iterable[torch.Tensor]) -> None:
        """Set every parameter from full-precision values (e.g. an fp32 checkpoint), in group order.

        A bf16/fp16 parameter gets the rounded value; with Kahan summation its compensation buffer
        is seeded with the rounding remainder, with master weights the master copy gets the value,
        so nothing of the fp32 weights is lost."""
        values = list(values)
        params = [(g, p) for g in self.param_groups for p in g["params"]]
        if len(values) != len(params):
            raise ValueError(f"got {len(values)} values for {len(params)} parameters")
        for (_, p), v in zip(params, values):
            if v.shape != p.shape:
                raise ValueError(f"value of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
        for (group, p), v in zip(params, values):
            v = v.to(device=p.device, dtype=torch.float32 if p.dtype in LOW_PRECISION else p.dtype)
            fmt = self._formats(group, p)
            p.copy_(v)
            if fmt.param in ("kahan", "master"):
                st = self._init_state(p, group)
                if fmt.param == "kahan":
                    st["kahan_comp"].copy_(v - p.float())
                else:
                    st["master_weight"].copy_(v)

    # ------------------------------------------------------------------------------------------
    # state dicts
    # ------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from adamkit or ``torch.optim.Adam``/``AdamW``.

        Unlike ``torch.optim.Optimizer.load_state_dict`` it checks everything first (optimizer
        kind, group and parameter counts, state shapes), raising without changing anything on a
        mismatch, keeps each state tensor's dtype, copies tensors (no aliasing with the source), and
        fills group options the source did not know (e.g. a torch state dict) from this optimizer.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
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
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in saved]
            if missing:
                raise ValueError(
                    f"state dict group {i} lacks {missing}: it comes from another kind of optimizer "
                    "(only adamkit and torch.optim Adam/AdamW state dicts load here)"
                )
            new_group = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            new_group["params"] = group["params"]
            if "param_names" in group:
                new_group["param_names"] = group["param_names"]
            if isinstance(self, AdamW):
                new_group["decoupled_weight_decay"] = True
            if new_group.get("max_lr") is None:
                new_group["max_lr"] = _as_float("lr", new_group.get("initial_lr", new_group["lr"]))
            new_group["backend"] = group["backend"]  # the backend is this process's choice
            for k, v in _TORCH_GROUP_DEFAULTS.items():
                new_group[k] = new_group.get(k) or v
            # How state is stored is this process's choice, like the backend: a state dict saved
            # in fp32 loads into an 8-bit optimizer (converted) and the other way round.
            for k in ("kahan_sum", "stochastic_rounding", "master_weights", "state_format", "min_8bit_size"):
                new_group[k] = group[k]
            _check_group(new_group)
            new_groups.append(new_group)
            id_map.update(zip(saved["params"], group["params"]))
            group_of.update({id(p): new_group for p in group["params"]})

        new_state: dict[torch.Tensor, dict] = {}
        for key, saved_state in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state dict has state for parameter {key!r}, which no group lists")
            p = id_map[key]
            unknown = set(saved_state) - set(_STATE_KEYS)
            if unknown or not saved_state:
                raise ValueError(
                    f"state of parameter {key!r} has keys {sorted(saved_state)}; an Adam state has "
                    f"{list(_STATE_KEYS)} (is it from another optimizer?)"
                )
            for k in ("step", "exp_avg", "exp_avg_sq"):
                if k not in saved_state:
                    raise ValueError(f"state of parameter {key!r} lacks {k!r}")
            new_state[p] = self._convert_loaded_state(key, p, saved_state, group_of[id(p)])
        for group, p_list in zip(new_groups, (g["params"] for g in new_groups)):
            if group["amsgrad"]:
                for p in p_list:
                    if p in new_state and "max_exp_avg_sq" not in new_state[p]:
                        raise ValueError(
                            "the state dict enables amsgrad but has no 'max_exp_avg_sq' for a parameter"
                        )

        # Everything checked: commit.
        from collections import defaultdict

        for layout in self._layouts.values():
            layout.release()
        self._layouts = {}  # the loaded tensors are moved into fresh flat buffers on the next step
        self.state = defaultdict(dict, new_state)
        self.param_groups = new_groups
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _convert_loaded_state(self, key, p: torch.Tensor, saved: dict, group: dict) -> dict:
        """Check one parameter's saved state and convert it to this optimizer's formats.

        Same format: tensors are copied bit for bit (resuming is bit-identical). Another format:
        moments are decoded to fp32 and encoded again; Kahan/master buffers are derived from each
        other (comp = master - round(master)) where one is saved and the other wanted."""

        def bad(msg: str) -> ValueError:
            return ValueError(f"state of parameter {key!r}: {msg}")

        fmt = self._formats(group, p)
        n = p.numel()
        out: dict[str, torch.Tensor] = {}
        step = saved["step"]
        if not isinstance(step, torch.Tensor):
            step = torch.tensor(float(step))
        if step.numel() != 1:
            raise bad("'step' must be a scalar")
        out["step"] = step.detach().to(device="cpu", dtype=torch.float32).reshape(()).clone()
        for name in MOMENTS:
            if name not in saved:
                continue
            v = saved[name]
            scale = saved.get(name + "_scale")
            if scale is not None:  # 8-bit codes + block scales
                if v.dtype != torch.uint8 or tuple(v.shape) != (_quant.padded(n),):
                    raise bad(
                        f"{name!r} holds 8-bit codes of shape {tuple(v.shape)}, expected "
                        f"({_quant.padded(n)},) uint8 for a parameter of {n} elements"
                    )
                if tuple(scale.shape) != (_quant.blocks(n),):
                    raise bad(
                        f"{name + '_scale'!r} has shape {tuple(scale.shape)}, expected ({_quant.blocks(n)},)"
                    )
                if fmt.state == "8bit":
                    out[name] = v.detach().to(p.device, copy=True)
                    out[name + "_scale"] = scale.detach().to(p.device, dtype=torch.float32, copy=True)
                    continue
                value = _quant.decode(name, v.to(p.device), scale.to(p.device), p.shape, torch.float32)
            else:
                if v.shape != p.shape:
                    raise bad(
                        f"{name!r} has shape {tuple(v.shape)} but its parameter has shape "
                        f"{tuple(p.shape)}; the state dict belongs to another model"
                    )
                if not v.is_floating_point():
                    raise TypeError(f"state[{key!r}][{name!r}] must be floating point, got {v.dtype}")
                value = v.detach().to(p.device)
            if fmt.state == "8bit":
                codes, out[name + "_scale"] = _quant.encode(name, value.float())
                out[name] = codes.view(-1)
            else:
                out[name] = value.to(state_dtype(fmt.state), copy=True)
        comp, master = saved.get("kahan_comp"), saved.get("master_weight")
        for name, t in (("kahan_comp", comp), ("master_weight", master)):
            if t is not None and t.shape != p.shape:
                raise bad(f"{name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if fmt.param == "kahan":
            if comp is not None:
                out["kahan_comp"] = comp.detach().to(p.device, p.dtype, copy=True)
            elif master is not None:  # the fp32 value's rounding remainder: nothing is lost
                out["kahan_comp"] = (master.to(p.device, torch.float32) - p.detach().float()).to(p.dtype)
        elif fmt.param == "master":
            if master is not None:
                out["master_weight"] = master.detach().to(p.device, torch.float32, copy=True)
            elif comp is not None:
                out["master_weight"] = p.detach().float() + comp.to(p.device).float()
        elif comp is not None or master is not None:
            raise bad(
                f"it has {'kahan_comp' if comp is not None else 'master_weight'}, but this optimizer "
                f"keeps the parameter as {fmt.param!r} ({p.dtype}); build it with the same "
                "kahan_sum/master_weights options, or use load_full_precision_params()"
            )
        return out


class AdamW(Adam):
    r"""AdamW: :class:`Adam` with decoupled weight decay, :math:`\theta \leftarrow \theta(1-\gamma\lambda)`.

    Same arguments as :class:`Adam` except ``decoupled_weight_decay`` (always on) and the default
    ``weight_decay=1e-2`` (torch's). With ``decouple_lr=True`` the decay is fully decoupled:
    :math:`\theta \leftarrow \theta(1 - \frac{\gamma}{\gamma_{max}}\lambda)`.

    Example:
        >>> opt = adamkit.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **kwargs: Any,
    ):
        if "decoupled_weight_decay" in kwargs:
            raise TypeError("AdamW always decouples weight decay; use adamkit.Adam for L2 decay")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs)
