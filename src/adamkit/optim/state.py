"""``optimizer.state`` that knows when it was changed.

The native kernel keeps, per parameter group, tables of pointers to each parameter's state
tensors (``kernels/native.py``). A user may replace those tensors (``opt.state[p]["exp_avg"] =
torch.zeros_like(p)``: a momentum reset, layer surgery) or drop them (``opt.state.clear()``,
``del opt.state[p]``), as torch.optim allows; the next step must then use the new tensors, or
start fresh state, exactly as the per-tensor backends and torch do.

Checking every pointer at every step would cost a loop over the tensors. Instead ``state`` is a
:class:`StateMap` (a ``defaultdict(dict)``) whose per-parameter dicts are :class:`ParamState`:
every mutation of either (set, delete, clear, pop, update, ...) advances one shared counter,
``StateMap.version``, and the dispatcher rebuilds a group's tables when the counter moved since
they were built. In-place changes of a state tensor's values (``exp_avg.zero_()``) need nothing:
the kernel reads the same memory. Both classes are plain dicts to everything else (``isinstance``,
``dict(...)``, pickling); state dicts hold plain dicts.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from .. import dist
from ..kernels.compose import Item
from ..storage import quant8
from ..storage.formats import Formats, choose_formats, init_param_aux, param_aux_key, state_dtype
from .layout import (
    AUX_KEYS,
    aux_from_value,
    aux_value,
    encode8,
    floor8,
    like_param,
    quantizable,
    rows_like,
    slot_format,
    slot_spec,
)


class _Counter:
    """One mutable integer shared by a StateMap and its ParamStates; ``quiet`` while the engine
    itself writes state (lazy creation, format conversion, the kernel's step counters), which its
    tables already account for."""

    __slots__ = ("n", "quiet")

    def __init__(self) -> None:
        self.n = 0
        self.quiet = False

    def bump(self) -> None:
        if not self.quiet:
            self.n += 1


def _bumping(name: str):
    base = getattr(dict, name)

    def method(self, *args, **kwargs):
        out = base(self, *args, **kwargs)
        self._counter.bump()
        return out

    method.__name__ = name
    return method


class ParamState(dict):
    """One parameter's state (``opt.state[p]``): a dict that reports its mutations."""

    __slots__ = ("_counter",)

    def __init__(self, counter: _Counter, *args, **kwargs) -> None:
        self._counter = counter
        super().__init__(*args, **kwargs)

    def __reduce__(self):
        # pickled (torch.save of a whole optimizer, deepcopy) as a plain dict would be, re-attached
        # to its map's counter when the map is rebuilt
        return (dict, (dict(self),))

    __setitem__ = _bumping("__setitem__")
    __delitem__ = _bumping("__delitem__")
    clear = _bumping("clear")
    pop = _bumping("pop")
    popitem = _bumping("popitem")
    update = _bumping("update")
    __ior__ = _bumping("__ior__")

    def setdefault(self, key, default=None):
        if key not in self:
            self._counter.bump()
        return dict.setdefault(self, key, default)


class _Quiet:
    """A context in which the counter does not move (a class: entered per parameter per step on
    the per-tensor backends, where a generator-based context manager costs several times more)."""

    __slots__ = ("counter", "was")

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        self.was, self.counter.quiet = self.counter.quiet, True

    def __exit__(self, *exc) -> None:
        self.counter.quiet = self.was


class _NewState:
    """The map's default factory (a class, not a lambda, so that the map pickles)."""

    __slots__ = ("counter",)

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter

    def __call__(self) -> ParamState:
        return ParamState(self.counter)


class StateMap(defaultdict):
    """``optimizer.state``: parameter -> :class:`ParamState`, with a version that every mutation
    of the map or of any of its entries advances."""

    def __init__(self, items=()) -> None:
        counter = _Counter()
        super().__init__(_NewState(counter))
        self._counter = counter
        for k, v in dict(items).items():
            dict.__setitem__(self, k, self._wrap(v))

    @property
    def version(self) -> int:
        return self._counter.n

    def quiet(self) -> _Quiet:
        """The engine's own writes (``with state.quiet(): ...``): they do not count as changes."""
        return _Quiet(self._counter)

    def _wrap(self, v):
        if isinstance(v, dict) and not (isinstance(v, ParamState) and v._counter is self._counter):
            return ParamState(self._counter, v)
        return v

    def __reduce__(self):
        return (StateMap, (dict(self),))

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, self._wrap(value))
        self._counter.bump()

    def update(self, *args, **kwargs) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return dict.__getitem__(self, key)

    __delitem__ = _bumping("__delitem__")
    clear = _bumping("clear")
    pop = _bumping("pop")
    popitem = _bumping("popitem")


class StateMixin:
    """Lazy state in the group's formats, its conversion when a parameter's dtype changes
    (``model.to``), and one parameter's share of a step (mixed into ``optim.base.Optimizer``)."""

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
                elif fmt.state == "8bit":  # its own flat groups: 1 B/element padded + 2 B per group
                    state[slot.name], state[slot.name + "_scale"] = quant8.zeros(
                        math.prod(shape), slot.signed, p.device
                    )
                else:
                    state[slot.name] = torch.zeros(shape, dtype=state_dtype(fmt.state), device=p.device)
            elif slot.weights:  # a copy of the parameter's full-precision value, fp32 (slot_format)
                key = next((k for k in AUX_KEYS if k in state), None)
                value = p.detach() if key is None else aux_value(p, key, state[key])
                state[slot.name] = value.to(state_dtype(slot_format(fmt.state, slot, p)), copy=True)
            elif slot_format(fmt.state, slot, p) == "8bit":
                # 1 B/param of codes (each row padded to whole groups of 32) + 2 B per group of scale
                rows = dist.local(p).shape[0] if p.dim() >= 2 else None
                n = quant8.row_length(p.shape) if rows is not None else p.numel()
                codes, scales = quant8.zeros(n, slot.signed, p.device, rows=rows)
                state[slot.name], state[slot.name + "_scale"] = rows_like(codes, p), rows_like(scales, p)
            else:
                # 4 B/param in fp32, 2 in bf16/fp16 (the parameter's dtype by default)
                state[slot.name] = torch.zeros_like(
                    p, dtype=state_dtype(slot_format(fmt.state, slot, p)), memory_format=torch.preserve_format
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
        encoded = False
        for slot in self.algorithm.slots:
            v = state.get(slot.name)
            if v is None:
                continue
            scale = state.get(slot.name + "_scale")
            sf = slot_format(fmt.state, slot, p)
            if sf == "8bit":
                if scale is None or v.dtype != torch.uint8:  # a floating value (the user's): encoded
                    state[slot.name], state[slot.name + "_scale"] = encode8(slot, dist.local(v).float(), p)
                    encoded = True
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
        if encoded:  # runs on every step of the per-tensor backends: only where codes were made
            floor8(self.algorithm.slots, state, p)
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
        # reductions over the whole tensor: the algorithm's, or the cautious mask's count
        if (not self.algorithm.elementwise or group.get("cautious", False)) and dist.is_sharded(p):
            spec = {"param": (p.device_mesh, tuple(p.placements), p.shape, p.stride())}
            for slot in self.algorithm.slots:
                if slot.name in state:
                    spec[slot.name] = spec["param"] if slot.shape is None else slot_spec(slot, p)
        return Item(t, self._formats(group, p), float(state["step"]) + 1, uid, dist.global_offset(p), spec)
