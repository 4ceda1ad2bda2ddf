"""The dispatcher: the only place that knows backends, defaults and fallbacks. A group's
parameters go to the native kernel's tables where it serves them; the rest to torch's fused
kernel (Adam/AdamW formats it has, where the native kernel is unavailable), the compiled kernel,
or foreach, with one warning naming the reason. :class:`DispatchMixin` is mixed into
``optim.base.Optimizer``."""

from __future__ import annotations

import itertools
import warnings

from ..algorithm import Algorithm
from ..kernels import compiled, native
from ..kernels.compose import Item
from ..kernels.foreach import run_foreach
from ..kernels.reference import run_reference
from ..storage import quant8
from .options import STORAGE_OPTIONS

# torch's own fused kernels serve the formats they have (Adam/AdamW, fp32 or plain low-precision
# parameters with state in their dtype) where the native kernel is unavailable; tests switch it off.
USE_TORCH_FUSED = True

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


class DispatchMixin:
    """The optimizer's dispatcher (mixed into ``optim.base.Optimizer``)."""

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
        if flags.on("cautious"):
            # the mask's count is a reduction over each whole tensor: foreach takes it per tensor
            # (the compiled kernel sees 8-bit rows padded to whole groups)
            run_foreach(alg, items, scalars_of, flags)
            return

        # Non-contiguous tensors, and 8-bit rows of several groups with a short last one, go to
        # foreach: in one compiled graph inductor pads each row inside scalar loops and recomputes
        # the update there (fp16 parameters, 1M elements in rows of 1000, one thread: 1.3 s per
        # step compiled, 0.15 s on foreach; rows of whole groups stay compiled: 0.04 s).
        def compiled_serves(it: Item) -> bool:
            if not all(t.is_contiguous() for t in it.t.values()):
                return False
            if it.fmt.state != "fp32" and any(s.weights for s in alg.slots):
                return False  # an fp32 copy of the weights beside low-precision statistics
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
