"""Checkpoints: state dicts in torch's layout (any storage format loads into any other, torch's
load into adamkit's and back), and the full-precision values of low-precision parameters.
:class:`CheckpointMixin` is mixed into ``optim.base.Optimizer``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .. import dist
from ..storage import quant8
from ..storage.formats import LOW_PRECISION, param_aux_key, state_dtype
from .layout import AUX_KEYS, aux_from_value, aux_value, encode8, floor8, placed_like, slot_format
from .options import STORAGE_OPTIONS, TORCH_GROUP_DEFAULTS, check_engine_options
from .state import StateMap


class CheckpointMixin:
    """The optimizer's checkpoint methods."""

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
                key = next((k for k in AUX_KEYS if k in st), None)
                if key is not None:
                    out.append(aux_value(p, key, st[key]))
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
            v = dist.local(placed_like(v, p))
            fmt = self._formats(group, p)
            dist.local(p).copy_(v)
            key = param_aux_key(fmt.param)
            if key is not None:
                st = self._init_state(p, group)
                dist.local(st[key]).copy_(aux_from_value(dist.local(p), key, v))

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
            *AUX_KEYS,
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
            new_group.update(TORCH_GROUP_DEFAULTS)
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
        encoded = False
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
                value = placed_like(v.detach().to(p.device), p, slot)
            sf = slot_format(fmt.state, slot, p)
            if sf == "8bit":
                out[name], out[name + "_scale"] = encode8(slot, dist.local(value).float(), p)
                encoded = True
            else:
                out[name] = value.to(state_dtype(sf), copy=True)
        if encoded:  # codes made here from values (codes kept bit for bit already hold it)
            floor8(self.algorithm.slots, out, p)
        saved_aux = {}
        for name in AUX_KEYS:
            t = saved.get(name)
            if t is None:
                continue
            if t.shape != p.shape:
                raise bad(f"{name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if name == "kahan_comp8" and t.dtype != torch.int8:
                raise bad(f"'kahan_comp8' must be int8, got {t.dtype}")
            if name != "kahan_comp8" and not t.is_floating_point():
                raise bad(f"{name!r} must be floating point, got {t.dtype}")
            saved_aux[name] = placed_like(t.detach().to(p.device), p)
        wanted = param_aux_key(fmt.param)
        if wanted is not None:
            if wanted in saved_aux:  # the same buffer: kept bit for bit (kahan_comp in p's dtype)
                t = saved_aux[wanted]
                dtype = {"kahan_comp": p.dtype, "kahan_comp8": torch.int8}.get(wanted, torch.float32)
                out[wanted] = t.to(dtype, copy=True)
            elif saved_aux:  # another one: the fp32 value it holds, carried into this one (nothing
                # is lost beyond the new buffer's resolution; master_weight first, the most precise)
                key = next(k for k in ("master_weight", "kahan_comp", "kahan_comp8") if k in saved_aux)
                out[wanted] = aux_from_value(p, wanted, aux_value(p, key, saved_aux[key]))
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
        the same bytes where rows are whole groups, else decoded and encoded again in rows.
        Older versions' blocks of 256 with fp32 scales (``quant8.LEGACY_BLOCK``) are decoded and
        returned as values (each within that format's bound of what it held), to be encoded again."""
        name = slot.name
        if v.dtype != torch.uint8:
            raise bad(f"{name!r} holds 8-bit codes of dtype {v.dtype}, expected uint8")
        if scale.dtype not in (torch.bfloat16, torch.float32):
            raise bad(
                f"{name + '_scale'!r} has dtype {scale.dtype}, expected bfloat16 (float32: older versions)"
            )
        legacy = scale.dtype == torch.float32
        block = quant8.LEGACY_BLOCK if legacy else quant8.BLOCK
        rows = slot.shape is None and len(want) >= 2
        length = quant8.row_length(want) if rows else math.prod(want)
        if v.dim() == 2:
            if not rows or tuple(v.shape) != (want[0], quant8.padded(length, block)):
                raise bad(
                    f"{name!r} holds 8-bit codes of shape {tuple(v.shape)}, expected "
                    f"{(want[0], quant8.padded(length, block)) if rows else (quant8.padded(length, block),)} "
                    f"uint8 for a parameter of shape {tuple(p.shape)}"
                )
            nb = (want[0], quant8.blocks(length, block))
        else:
            n = math.prod(want)
            if tuple(v.shape) != (quant8.padded(n, block),):
                raise bad(
                    f"{name!r} holds 8-bit codes of shape {tuple(v.shape)}, expected "
                    f"({quant8.padded(n, block)},) uint8 for a parameter of {n} elements"
                )
            nb = (quant8.blocks(n, block),)
        if tuple(scale.shape) != nb:
            raise bad(f"{name + '_scale'!r} has shape {tuple(scale.shape)}, expected {nb}")
        full = [x.full_tensor() if dist.is_dtensor(x) else x for x in (v, scale)]
        codes, scales = (x.detach().to(p.device) for x in full)
        if not legacy and rows and codes.dim() == 1:  # an older flat checkpoint
            codes, scales = quant8.to_rows(slot.signed, codes, scales, want)
        if not legacy and slot_format(fmt.state, slot, p) == "8bit":
            out[name] = placed_like(codes, p).clone() if dist.is_dtensor(p) else codes.clone()
            out[name + "_scale"] = placed_like(scales, p).clone() if dist.is_dtensor(p) else scales.clone()
            return None
        value = quant8.decode(slot.signed, codes, scales, want, torch.float32, codes.dim() == 2)
        return placed_like(value, p, slot)
