"""Gradient release under DistributedDataParallel: a communication hook that steps each bucket's
parameters as soon as its all-reduce has averaged their gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch


def release_comm_hook(optimizer) -> Callable:
    """A DDP communication hook for an adamkit optimizer built with ``gradient_release=True``.

    Register it on the DDP model: ``ddp.register_comm_hook(None, adamkit.release_comm_hook(opt))``
    (``None``: the default process group). Each bucket is all-reduced as by DDP's default hook
    (divided by the world size, summed), then its parameters are stepped with the averaged
    gradients, during backward, while later buckets are still being computed and reduced: the
    result equals DDP + an ordinary ``step()`` (fp32 rounding of the same kernels).
    ``optimizer.step()`` after backward frees the gradients DDP wrote and steps nothing twice.

    Memory: DDP keeps its buckets (one gradient's bytes per parameter) whatever the optimizer
    does, so under DDP release brings the step into backward but does not save the gradient
    buffer; FSDP2 (``fully_shard``) with ``gradient_release=True`` does. Not with
    ``accumulation_steps > 1`` (use DDP's ``no_sync()`` for accumulation: the synchronizing
    backward's buckets then hold the summed gradients and are stepped by this hook).
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    rel = getattr(optimizer, "_release", None)
    if rel is None:
        raise ValueError("release_comm_hook needs an adamkit optimizer built with gradient_release=True")
    if optimizer.accumulation_steps > 1:
        raise ValueError(
            "release_comm_hook does not support accumulation_steps > 1: DDP all-reduces every "
            "backward; accumulate with DDP's no_sync() instead (accumulation_steps=1)"
        )
    rel.ddp = True

    def hook(process_group, bucket):  # no annotations: DDP checks them against its own types
        params = bucket.parameters()
        grads = bucket.gradients()  # views of the bucket's flat buffer, which is reduced in place
        fut = allreduce_hook(process_group, bucket)

        def step(done: torch.futures.Future) -> torch.Tensor:
            buf = done.value()[0]
            if grads and grads[0].data_ptr() != buf.data_ptr() and buf.numel():
                raise RuntimeError("adamkit.release_comm_hook: the reduced bucket is not its buffer")
            optimizer._release_bucket(params, grads)
            return buf

        return fut.then(step)

    return hook
