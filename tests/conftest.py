"""Shared test tables: one row per configuration, many generic tests over them."""

from __future__ import annotations

import io
import os

import pytest
import torch

import host_rounding

torch.set_flush_denormal(True)


def pytest_addoption(parser):
    parser.addoption(
        "--perturb-rounding",
        action="store_true",
        help="run as on a host whose fp32 sqrt and division are 1 ulp off in a fifth of the "
        "elements (tests/host_rounding.py); spawned processes inherit it",
    )


def pytest_configure(config):
    if config.getoption("--perturb-rounding"):
        os.environ[host_rounding.ENV] = "1"
    host_rounding.install_if_requested()


# (id, optimizer name, constructor kwargs). Every row is a configuration torch.optim also has,
# except decouple_lr (fully decoupled decay), which torch reproduces with weight_decay scaled by
# 1/max_lr at constant lr (see test_parity_fully_decoupled).
CONFIGS = [
    ("adam-default", "Adam", {}),
    ("adam-l2", "Adam", {"weight_decay": 0.1}),
    ("adam-decoupled", "Adam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("adam-amsgrad-l2", "Adam", {"weight_decay": 0.05, "amsgrad": True}),
    ("adam-maximize", "Adam", {"maximize": True, "weight_decay": 0.01}),
    ("adamw-default", "AdamW", {}),
    ("adamw-amsgrad", "AdamW", {"amsgrad": True, "weight_decay": 0.1}),
    ("adamw-maximize-amsgrad", "AdamW", {"maximize": True, "amsgrad": True}),
    ("adamw-betas-eps", "AdamW", {"betas": (0.8, 0.95), "eps": 1e-6, "lr": 3e-2}),
    ("adamw-beta0", "AdamW", {"betas": (0.0, 0.5)}),
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two threads stall
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The fused backend has two kernels: the native one (kernels/kernel.c: fp32/bf16 parameters,
# fp32/bf16/8-bit state) and torch.compile's (every format; the only one for fp16 and fp64). "fused-compiled"
# runs a test on the latter where the former would serve.
FUSED_COMPILED = pytest.param("fused", id="fused-compiled", marks=pytest.mark.compiled_kernel)
BACKENDS = ["reference", "foreach", "fused", FUSED_COMPILED]


@pytest.fixture(autouse=True)
def _kernel_choice(request, monkeypatch):
    if request.node.get_closest_marker("compiled_kernel"):
        from adamkit.kernels import native
        from adamkit.optim import dispatch

        monkeypatch.setattr(native, "USE_NATIVE", False)
        monkeypatch.setattr(dispatch, "USE_TORCH_FUSED", False)


def config_params():
    return [pytest.param(name, kw, id=cid) for cid, name, kw in CONFIGS]


def make_params(dtype=torch.float64, seed=0):
    """Parameters of awkward shapes: a matrix, a vector, a 0-d scalar, a zero-size tensor, a
    non-contiguous (transposed) matrix and a 3-d tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (), (0, 3), (4, 6), (2, 3, 4)]
    ps = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    ps[4] = torch.randn(6, 4, generator=g, dtype=dtype).t()  # non-contiguous parameter
    return [p.requires_grad_() for p in ps]


def grad_stream(params, steps, seed=1):
    """A fixed stream of gradients; some with strides that differ from their parameter's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        gs = []
        for p in params:
            x = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() == 2 and p.is_contiguous():
                x = x.t().contiguous().t()  # same values, column-major strides
            gs.append(x)
        out.append(gs)
    return out


def clone_params(params):
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
        q.copy_(p.detach())
        out.append(q.requires_grad_())
    return out


def roundtrip(obj):
    """obj through torch.save and torch.load(weights_only=True), as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
