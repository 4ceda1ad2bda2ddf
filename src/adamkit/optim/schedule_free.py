r"""Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024), as the
``schedulefree`` package's ``AdamWScheduleFree`` computes it.

Three sequences: z (the base iterates), x (their weighted average: the point to evaluate) and
y = (1-\beta_1) z + \beta_1 x (where gradients are taken). The parameters hold y in train mode and
x in eval mode (``optimizer.train()`` / ``optimizer.eval()`` switch them); z is a slot.

.. math::
   \gamma_t = \gamma \min(1, t / T_{warmup}),\quad
   w_t = t^r \big(\max_{s \le t}\gamma_s\big)^{p},\quad c_t = w_t / \textstyle\sum_{s \le t} w_s \\
   v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
   \hat g = g / \big(\sqrt{v / (1-\beta_2^t)} + \epsilon\big) + \lambda y \\
   y \leftarrow (1-c_t)\, y + c_t z + \gamma_t(\beta_1(1-c_t) - 1)\, \hat g,\quad
   z \leftarrow z - \gamma_t \hat g

with t the group's step count ``k`` + 1, and :math:`p` = ``weight_lr_power``. The weight decay is
taken at y, as the package does. The averaging weights depend on the lr history (its running max),
so ``k``, ``weight_sum`` and ``lr_max`` are the group's, as in the package's state dicts (which
load here, and ours there): the step's scalars come from them, and they advance once per
``step()`` (gradient release included: the hooks step with the values of the step in progress).
Two slots: z (signed; it starts as a copy of the parameter) and v, 4 + 4 B/param in fp32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot, where
from ..ieee import div_rn, fma_rn, lerp_rn, sqrt_rn
from .base import Optimizer
from .options import as_float, check_betas, check_nonneg


class Scalars(NamedTuple):
    """Per step; the native kernel takes them in this order (kernel.c, F_*)."""

    grad_sign: Any
    beta2: Any
    one_minus_beta2: Any
    bc2: Any  # 1 - beta2^t
    eps: Any
    decay: Any  # lambda (at y)
    ckp1: Any  # c_t, the weight of z in y's average
    y_coef: Any  # lr_t (beta1 (1 - c_t) - 1)
    neg_lr: Any  # -lr_t


def check(group: dict) -> dict:
    lr, eps = check_nonneg("lr", group["lr"]), check_nonneg("eps", group["eps"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    b1, b2 = check_betas(group["betas"])
    if b1 == 0:
        raise ValueError(
            "ScheduleFreeAdamW needs beta1 > 0: eval() recovers x from y and z by dividing by beta1"
        )
    hp = dict(lr=lr, eps=eps, weight_decay=wd, beta1=b1, beta2=b2)
    for key in ("warmup_steps", "r", "weight_lr_power", "k", "weight_sum"):
        hp[key] = check_nonneg(key, group[key])
    hp["lr_max"] = as_float("lr_max", group["lr_max"])  # -1 before the first step (the package's)
    hp["wd_mode"] = "l2" if wd else "none"
    return hp


def schedule(hp: dict) -> tuple[float, float, float, float]:
    """(lr_t, lr_max, weight_sum, c_t) of the step in progress (the group's k + 1)."""
    k, warm = hp["k"], hp["warmup_steps"]
    lr = hp["lr"] * ((k + 1) / warm if k < warm else 1.0)
    lr_max = max(lr, hp["lr_max"])
    weight = (k + 1) ** hp["r"] * lr_max ** hp["weight_lr_power"]
    weight_sum = hp["weight_sum"] + weight
    return lr, lr_max, weight_sum, (weight / weight_sum if weight_sum else 0.0)


def flags(group: dict, hp: dict) -> Flags:
    return Flags(hp["wd_mode"], group["maximize"], group["skip_nonfinite"])


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    """The group's step in progress (``step``, the parameter's own count, is not used: the
    package's bias correction and weights follow the group's k)."""
    lr, _, _, c = schedule(hp)
    b1, b2 = hp["beta1"], hp["beta2"]
    return Scalars(-1.0 if f.maximize else 1.0, b2, 1.0 - b2, 1.0 - b2 ** (hp["k"] + 1), hp["eps"],
                   hp["weight_decay"], c, lr * (b1 * (1.0 - c) - 1.0), -lr)  # fmt: skip


def schedule_free_update(p, g, slots: list, s: Scalars, f: Flags):
    z, v = slots
    v = v * s.beta2 + (g * g) * s.one_minus_beta2
    gn = div_rn(g, sqrt_rn(div_rn(v, s.bc2)) + s.eps)
    if f.wd_mode == "l2":  # at y
        gn = fma_rn(p, s.decay, gn)
    elif f.wd_mode == "runtime":  # the compiled kernel: no 0 * p (an inf p would give nan)
        gn = where(s.decay != 0, fma_rn(p, s.decay, gn), gn)
    return fma_rn(gn, s.y_coef, lerp_rn(p, z, s.ckp1)), [fma_rn(gn, s.neg_lr, z), v]


SCHEDULE_FREE = Algorithm(
    name="ScheduleFreeAdamW",
    slots=(
        # z: a copy of the weights, 4 B/param fp32 in every state format (Slot.weights)
        Slot("z", signed=True, weights=True),
        Slot("exp_avg_sq", signed=False),  # v: 4 B/param fp32, 2 bf16, 1 + 2/32 8-bit
    ),
    check=check,
    flags=flags,
    scalars=scalars,
    update=schedule_free_update,
    scalar_type=Scalars,
    native="schedule_free",
    uses_step=False,  # the group's k: the package's state dicts (no per-parameter step) load
    no_accumulation="its averaging weight and y/z coupling are per step, not per micro-batch",
)


class _Mix(NamedTuple):
    grad_sign: Any
    weight: Any


def _mix(p, g, slots: list, s: _Mix, f: Flags):
    """The mode switch: p <- lerp(p, z, weight), the slots untouched."""
    return lerp_rn(p, slots[0], s.weight), slots


# y <-> x over z alone (v is neither decoded nor written)
MODE_SWITCH = Algorithm(
    name="ScheduleFreeAdamW mode switch",
    slots=SCHEDULE_FREE.slots[:1],
    check=check,
    flags=flags,
    scalars=scalars,
    update=_mix,
    scalar_type=_Mix,
    uses_step=False,
)
# the switch's rounding streams (stochastic rounding, Kahan), apart from the step's (0..7) and
# Sophia's Hessian update (100)
SWITCH_STREAMS = {True: 200, False: 210}


class ScheduleFreeAdamW(Optimizer):
    r"""Schedule-Free AdamW (see the module docstring); the ``schedulefree`` package's
    ``AdamWScheduleFree`` signature and defaults.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`. Default 0.0025.
        betas: :math:`(\beta_1, \beta_2)`, :math:`\beta_1 > 0`. Default (0.9, 0.999).
        eps: :math:`\epsilon`. Default 1e-8.
        weight_decay: :math:`\lambda`, taken at y. Default 0.
        warmup_steps: linear lr warmup over this many steps (no scheduler is needed). Default 0.
        r: the polynomial weighting power of the average. Default 0.
        weight_lr_power: the average's weights are :math:`\gamma_{max}^{p}`. Default 2.
        {engine_options}

    Modes: the parameters hold y while training and x (the average, usually better) for
    evaluation. ``optimizer.eval()`` before evaluating or saving the model, ``optimizer.train()``
    before training again; each is a no-op in its own mode. Unlike the package, a new optimizer
    starts in train mode (the parameters are y = x = z before the first step), so calling
    ``train()`` first is allowed and not needed; ``step()`` in eval mode raises and changes
    nothing. The mode is the groups' ``train_mode`` and travels with the state dict: save the
    model and the optimizer at the same moment, and a loaded pair agrees.

    The mode switch runs over the optimizer's tensors by the foreach backend (one multi-tensor
    operation per dtype and format), on the full-precision value of low-precision parameters
    (Kahan, master weights), and leaves v as it is.

    State per parameter: ``step``, ``z`` and ``exp_avg_sq``. z is a copy of the weights and keeps
    fp32 (4 B/param) in every state format, so that bf16 + Kahan or master weights lose nothing of
    its updates; ``state_format`` applies to v (4 B/param fp32, 2 bf16, ~1 8-bit).
    """

    algorithm = SCHEDULE_FREE

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, *, cautious: bool = False,
                 **engine: Any):  # fmt: skip
        if cautious:
            raise ValueError(
                "ScheduleFreeAdamW has no cautious form: no reference defines the mask for its "
                "averaged y/z step; use AdamW(cautious=True)"
            )
        hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                     r=r, weight_lr_power=weight_lr_power)  # fmt: skip
        # the schedule's state, per group, under the package's names
        sched = dict(k=0, train_mode=True, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, dict(hyper, **sched), **engine)

    def _hyper(self, index: int, group: dict) -> dict:
        """Every step path (step(), gradient-release hooks) validates its groups here first, before
        anything changes: a group in eval mode is refused."""
        if not group.get("train_mode", True):
            raise ValueError(
                "ScheduleFreeAdamW is in eval mode (the parameters hold x, the average); call "
                "optimizer.train() before training steps, optimizer.eval() before evaluating or saving"
            )
        return super()._hyper(index, group)

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "eps", "weight_decay", "k", "weight_sum", "lr_max", "train_mode")

    @torch._disable_dynamo
    def step(self, closure=None):
        """One step in train mode; then each group's schedule advances (k, weight_sum, lr_max),
        unless the step was skipped (GradScaler's inf/nan, ``skip_nonfinite_steps``)."""
        skipped = self.skipped_steps
        loss = super().step(closure)
        if self.skipped_steps == skipped:
            for index, group in enumerate(self.param_groups):
                lr, lr_max, weight_sum, _ = schedule(self._hyper(index, group))
                group.update(k=group["k"] + 1, weight_sum=weight_sum, lr_max=lr_max, scheduled_lr=lr)
        return loss

    @torch.no_grad()
    def train(self) -> None:
        """The parameters hold y (where gradients are taken): y = lerp(x, z, 1 - beta1)."""
        self._switch(True)

    @torch.no_grad()
    def eval(self) -> None:
        """The parameters hold x (the average, to evaluate or save): x = lerp(y, z, 1 - 1/beta1)."""
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        from ..kernels.foreach import run_foreach

        flags = Flags("none")
        base = 1
        for group in self.param_groups:
            params = group["params"]
            if group["train_mode"] != to_train:
                b1 = as_float("betas[0]", group["betas"][0])
                weight = 1.0 - b1 if to_train else 1.0 - 1.0 / b1
                stepped = [(i, p) for i, p in enumerate(params) if p in self.state and "z" in self.state[p]]
                # the parameter stands in for the gradient the switch does not read
                items = [self._item(p, group, base + i, p) for i, p in stepped]
                keep = ("param", "kahan_comp", "kahan_comp8", "master_weight")
                mix = _Mix(1.0, weight)
                run_foreach(MODE_SWITCH, items, lambda step, mix=mix: mix, flags,
                            streams=SWITCH_STREAMS[to_train], only=keep)  # fmt: skip
                group["train_mode"] = to_train
            base += len(params)

    @property
    def train_mode(self) -> bool:
        """Whether the parameters hold y (train mode) rather than x (eval mode)."""
        return bool(self.param_groups[0]["train_mode"])
