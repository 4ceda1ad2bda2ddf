"""The plan: every recipe's whole-model bytes per component, sharded as ZeRO stage 0-3 would over N
devices, with an optional activation estimate, as a table or JSON (``plan()``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bytes import activation_bytes, model_state_bytes
from .models import ModelSpec, load_model
from .recipes import BLOCK_SIZE, COMPONENTS, MIN_8BIT_SIZE, Recipe, parse_recipe

GB = 1e9  # decimal gigabytes, as device vendors and the published tables count
# Which ZeRO stage first shards a component; everything else is optimizer state (stage 1).
_SHARDED_FROM = {"params": 3, "grads": 2, "grad_accum": 2}
_GROUPS = {"params": ("params",), "grads": ("grads", "grad_accum")}


def _group_of(component: str) -> str:
    for group, members in _GROUPS.items():
        if component in members:
            return group
    return "optimizer"


def _gb(n: float) -> float:
    return n / GB


@dataclass(frozen=True)
class RecipePlan:
    """The memory of one recipe: whole-model bytes per component, and per device after sharding.

    Attributes:
        recipe: the recipe.
        n_params: the model's parameters (trainable and frozen): the bytes/param denominator.
        components: whole-model bytes of each component of :data:`COMPONENTS`.
        per_device: the same after ZeRO sharding (what one device holds).
        activations: per-device activation bytes, or None when not estimated.
        device_memory_gb: the device's memory to check against, or None.
    """

    recipe: Recipe
    n_params: int
    components: dict[str, int]
    per_device: dict[str, int]
    activations: int | None = None
    device_memory_gb: float | None = None

    @property
    def model_states(self) -> int:
        """Whole-model bytes of params, grads and optimizer state (no activations)."""
        return sum(self.components.values())

    @property
    def per_device_model_states(self) -> int:
        return sum(self.per_device.values())

    @property
    def per_device_total(self) -> int:
        """What one device holds: its share of the model states plus its activations."""
        return self.per_device_model_states + (self.activations or 0)

    def bytes_per_param(self, component: str | None = None) -> float:
        """Whole-model bytes per parameter, of one component or of all model states."""
        n = self.components[component] if component else self.model_states
        return n / self.n_params

    def group_bytes(self, group: str) -> int:
        """Whole-model bytes of ``"params"``, ``"grads"`` or ``"optimizer"`` (master weights included)."""
        return sum(v for k, v in self.components.items() if _group_of(k) == group)

    @property
    def fits(self) -> bool | None:
        """Whether the per-device total fits ``device_memory_gb`` (None when no memory was given)."""
        if self.device_memory_gb is None:
            return None
        return self.per_device_total <= self.device_memory_gb * GB

    def to_dict(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "name": r.name,
            "description": r.describe(),
            "settings": {
                "param_dtype": r.param_dtype,
                "master_weights": r.master_weights,
                "kahan": r.kahan,
                "stochastic_rounding": r.stochastic_rounding,
                "optimizer": r.optimizer,
                "state_format": r.state_format,
                "state_dtype": r.state_dtype,
                "amsgrad": r.amsgrad,
                "grad_accum": r.grad_accum,
                "gradient_release": r.gradient_release,
                "block_size": r.block_size,
                "min_8bit_size": r.min_8bit_size,
            },
            "components": {
                k: {
                    "bytes": v,
                    "gb": _gb(v),
                    "bytes_per_param": v / self.n_params,
                    "per_device_bytes": self.per_device[k],
                    "per_device_gb": _gb(self.per_device[k]),
                }
                for k, v in self.components.items()
            },
            "groups": {
                g: {"bytes": self.group_bytes(g), "bytes_per_param": self.group_bytes(g) / self.n_params}
                for g in ("params", "grads", "optimizer")
            },
            "model_states_bytes": self.model_states,
            "model_states_gb": _gb(self.model_states),
            "bytes_per_param": self.bytes_per_param(),
            "per_device_model_states_bytes": self.per_device_model_states,
            "activations_bytes": self.activations,
            "per_device_total_bytes": self.per_device_total,
            "per_device_total_gb": _gb(self.per_device_total),
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the model, the setting, and one :class:`RecipePlan` per recipe."""

    model: ModelSpec
    results: tuple[RecipePlan, ...]
    zero_stage: int = 0
    devices: int = 1
    batch_size: int | None = None
    seq_len: int | None = None
    recompute: str = "none"
    device_memory_gb: float | None = None
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, key: int | str) -> RecipePlan:
        """A recipe's result by position or by name."""
        if isinstance(key, int):
            return self.results[key]
        for r in self.results:
            if r.recipe.name == key:
                return r
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "sharding": {"zero_stage": self.zero_stage, "devices": self.devices},
            "activations": None
            if self.batch_size is None
            else {
                "batch_size": self.batch_size,
                "seq_len": self.seq_len,
                "recompute": self.recompute,
                "formula": "L*[sbh(16e+2) + as^2b(2e+1)] (Korthikanti et al. 2023; e=2: sbh(34+5as/h))",
            },
            "device_memory_gb": self.device_memory_gb,
            "gb": GB,
            "recipes": [r.to_dict() for r in self.results],
            "notes": list(self.notes),
        }

    def _header(self) -> list[str]:
        m = self.model
        # A bare count's name is the count itself; say it once.
        name = f"{m.name}: " if m.shapes_known else ""
        lines = [
            f"model: {name}{m.n_params:,} parameters ({m.n_trainable:,} trainable, "
            f"{m.n_frozen:,} frozen) in {len(m.tensors):,} tensor{'s' if len(m.tensors) != 1 else ''}"
        ]
        shard = "not sharded" if self.zero_stage == 0 or self.devices == 1 else "sharded"
        lines.append(f"ZeRO stage {self.zero_stage} over {self.devices} device(s) ({shard}); GB = 1e9 bytes")
        if self.batch_size is not None:
            lines.append(
                f"activations: micro-batch {self.batch_size} x {self.seq_len} tokens per device, "
                f"recompute={self.recompute} (Korthikanti et al. 2023: sbh(34 + 5as/h) per layer at 16 bit)"
            )
        return lines

    def table(self) -> str:
        """The plan as text: a detailed table for one recipe, side by side for several."""
        lines = self._header()
        lines += self._detail() if len(self.results) == 1 else self._compare()
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _fits_text(self, r: RecipePlan) -> str:
        if r.fits is None:
            return ""
        scope = "" if r.activations is not None else " (model states only; no activation estimate)"
        return f"{'yes' if r.fits else 'no'}{scope}"

    def _detail(self) -> list[str]:
        r = self.results[0]
        lines = [f"recipe {r.recipe.name}: {r.recipe.describe()}", ""]
        head = f"{'component':<12}{'bytes':>22}{'GB':>12}{'B/param':>10}{'GB/device':>12}  what"
        lines += [head, "-" * len(head)]
        for k, v in r.components.items():
            if v or k == "params":
                lines.append(
                    f"{k:<12}{v:>22,}{_gb(v):>12.2f}{r.bytes_per_param(k):>10.3f}"
                    f"{_gb(r.per_device[k]):>12.2f}  {COMPONENTS[k]}"
                )
        lines.append("-" * len(head))
        ms = r.model_states
        lines.append(
            f"{'states':<12}{ms:>22,}{_gb(ms):>12.2f}{r.bytes_per_param():>10.3f}"
            f"{_gb(r.per_device_model_states):>12.2f}  params + grads + optimizer "
            f"({r.group_bytes('optimizer') / r.n_params:.2f} B/param optimizer state)"
        )
        if r.activations is not None:
            lines.append(
                f"{'activations':<12}{'':>22}{'':>12}{'':>10}{_gb(r.activations):>12.2f}  "
                "per device, separate from model states"
            )
        lines.append(f"{'total':<12}{'':>22}{'':>12}{'':>10}{_gb(r.per_device_total):>12.2f}  per device")
        if r.fits is not None:
            lines.append(f"fits in {self.device_memory_gb:g} GB: {self._fits_text(r)}")
        return lines

    def _compare(self) -> list[str]:
        res = self.results
        widths = [max(10, len(r.recipe.name) + 2) for r in res]

        def row(label: str, cells: Iterable[str]) -> str:
            return f"{label:<14}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths))

        lines = [""] + [f"{r.recipe.name}: {r.recipe.describe()}" for r in res] + [""]
        head = row("GB per device", (r.recipe.name for r in res))
        lines += [head, "-" * len(head)]
        for k in COMPONENTS:
            if k == "params" or any(r.components[k] for r in res):
                lines.append(row(k, (f"{_gb(r.per_device[k]):.2f}" for r in res)))
        lines.append("-" * len(head))
        lines.append(row("states", (f"{_gb(r.per_device_model_states):.2f}" for r in res)))
        lines.append(row("B/param", (f"{r.bytes_per_param():.3f}" for r in res)))
        if res[0].activations is not None:
            lines.append(row("activations", (f"{_gb(r.activations or 0):.2f}" for r in res)))
        lines.append(row("total", (f"{_gb(r.per_device_total):.2f}" for r in res)))
        if self.device_memory_gb is not None:
            lines.append(row(f"fits {self.device_memory_gb:g} GB", ("yes" if r.fits else "no" for r in res)))
            if res[0].activations is None:
                lines.append("(fits: model states only; no activation estimate)")
        return lines


def _shard(components: dict[str, int], zero_stage: int, devices: int) -> dict[str, int]:
    """Per-device bytes: each component sharded from its ZeRO stage on, rounded up (uneven last shard)."""
    return {
        k: -(-v // devices) if zero_stage >= _SHARDED_FROM.get(k, 1) else v for k, v in components.items()
    }


def plan(
    model: Any,
    recipes: str | Recipe | Sequence[str | Recipe] = "mixed-bf16",
    *,
    optimizer: str = "adamw",
    state_format: str | None = "auto",
    amsgrad: bool = False,
    grad_accum: bool = False,
    gradient_release: bool = False,
    zero_stage: int = 0,
    devices: int = 1,
    batch_size: int | None = None,
    seq_len: int | None = None,
    recompute: str = "none",
    device_memory: float | None = None,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> Plan:
    """Plan the training memory of ``model`` under one or several recipes.

    Args:
        model: anything :func:`load_model` takes: a parameter count (``70e9``, ``"7.5B"``), a preset
            name, a ``config.json`` path, ``"module:callable"``, an ``nn.Module`` or a :class:`ModelSpec`.
        recipes: a recipe spec (see :func:`parse_recipe`), a :class:`Recipe`, or a sequence of them.
        optimizer, state_format, amsgrad, grad_accum, gradient_release: defaults for what a spec
            does not name.
        zero_stage: 0-3; stage 1 shards optimizer state (master weights included) over ``devices``,
            2 also gradients, 3 also parameters.
        devices: data-parallel devices the states are sharded over.
        batch_size, seq_len: micro-batch per device and sequence length, for the activation estimate
            (both or neither).
        recompute: ``"none"``, ``"selective"`` or ``"full"`` activation recomputation.
        device_memory: GB (1e9 bytes) per device, to answer "fits: yes/no".
        block_size, min_8bit_size: the 8-bit state format.

    Returns:
        A :class:`Plan`; ``plan(...)[0]`` or ``plan(...)["mixed-bf16"]`` is one recipe's result.

    Raises:
        ValueError: for inconsistent settings, an unknown recipe, or a factored optimizer on a bare
            parameter count.
    """
    spec = load_model(model)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    if (batch_size is None) != (seq_len is None):
        raise ValueError("the activation estimate needs both batch size and sequence length")
    if device_memory is not None and not device_memory > 0:
        raise ValueError(f"device memory must be > 0 GB, got {device_memory!r}")
    if spec.n_params == 0:
        raise ValueError(f"{spec.name} has no parameters")
    items = [recipes] if isinstance(recipes, (str, Recipe)) else list(recipes)
    if not items:
        raise ValueError("no recipe to plan")
    defaults = dict(
        optimizer=optimizer,
        state_format=state_format,
        amsgrad=amsgrad,
        grad_accum=grad_accum,
        gradient_release=gradient_release,
        block_size=block_size,
        min_8bit_size=min_8bit_size,
    )
    parsed = [parse_recipe(r, **defaults) if isinstance(r, str) else r for r in items]
    results = []
    for r in parsed:
        comps = model_state_bytes(spec, r)
        act = None
        if batch_size is not None:
            e = 4 if r.param_dtype == "fp32" else 2  # activations are computed in the compute dtype
            act = activation_bytes(spec, batch_size, seq_len, element_bytes=e, recompute=recompute)
        results.append(
            RecipePlan(r, spec.n_params, comps, _shard(comps, zero_stage, devices), act, device_memory)
        )
    notes = []
    if not spec.shapes_known:
        notes.append(
            "a bare parameter count is planned as one flat tensor (per-tensor overheads counted once)"
        )
    if zero_stage and devices == 1:
        notes.append("ZeRO over 1 device shards nothing; pass the number of devices")
    return Plan(
        spec,
        tuple(results),
        zero_stage=zero_stage,
        devices=devices,
        batch_size=batch_size,
        seq_len=seq_len,
        recompute=recompute,
        device_memory_gb=device_memory,
        notes=tuple(notes),
    )
