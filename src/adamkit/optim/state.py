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

import contextlib
from collections import defaultdict


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

    @contextlib.contextmanager
    def quiet(self):
        """The engine's own writes: they do not count as changes."""
        was, self._counter.quiet = self._counter.quiet, True
        try:
            yield
        finally:
            self._counter.quiet = was

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
