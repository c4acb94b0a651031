"""Shared test helpers: the float64 nn.Conv2d oracle and the implementation paths."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn
from torch.func import functional_call

import sepconv
from sepconv._backend import _C

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("SEPCONV_HYPOTHESIS", "ci"))

ACTS = {None: nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU,
        "hardswish": nn.Hardswish}
ISAS = list(_C.supported_isas()) if _C is not None else []

# (backend, isa, dtype): every native ISA in float32 and float64, plus the reference.
PATHS = [("native", isa, dt) for isa in ISAS for dt in (torch.float32, torch.float64)] \
    + [("reference", None, torch.float64)]
PATH_IDS = [f"{b}-{i}-{str(d)[6:]}" if i else f"{b}-{str(d)[6:]}" for b, i, d in PATHS]
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


@pytest.fixture(params=PATHS, ids=PATH_IDS)
def path(request):
    """Runs the test body on one implementation path; yields its dtype."""
    backend, isa, dtype = request.param
    if isa is not None:
        previous = _C.isa()
        _C.set_isa(isa)
    with sepconv.use_backend(backend):
        yield dtype
    if isa is not None:
        _C.set_isa(previous)


def oracle(x, dw, pw, b, b_dw, stride, padding, dilation, act1, act2):
    """The unfused pair of nn.Conv2d modules in float64, run on the given tensors
    (functional_call keeps them in the autograd graph)."""
    C, Cm, Co = x.shape[1], dw.shape[0], pw.shape[0]
    dconv = nn.Conv2d(C, Cm, tuple(dw.shape[2:]), stride, padding, dilation, groups=C,
                      bias=b_dw is not None, device="meta")
    pconv = nn.Conv2d(Cm, Co, 1, bias=b is not None, device="meta")
    u = functional_call(dconv, {"weight": dw, "bias": b_dw}, (x,))
    return ACTS[act2]()(functional_call(pconv, {"weight": pw, "bias": b}, (ACTS[act1]()(u),)))


def make_inputs(N, C, H, W, m, Co, k, *, bias=True, dw_bias=True, seed=0):
    """Random float64 tensors of O(1) magnitude: x, dw, pw, b, b_dw."""
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return (r(N, C, H, W), r(C * m, 1, kh, kw) / kh, r(Co, C * m, 1, 1) / (C * m) ** 0.5,
            r(Co) if bias else None, r(C * m) if dw_bias else None)


def check_against_oracle(dtype, inputs, stride=1, padding=0, dilation=1, act1=None, act2=None,
                         layout=lambda t: t, grads=True):
    """Forward and every gradient of sepconv (in ``dtype``, x passed through ``layout``)
    against the float64 oracle on random data."""
    x64, dw64, pw64, b64, bd64 = inputs
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    expected = oracle(*leaves, stride, padding, dilation, act1, act2)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    mine = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]
    x = layout(mine[0])
    y = sepconv.separable_conv2d(x, mine[1], mine[2], mine[3], stride, padding, dilation,
                                 depthwise_bias=mine[4], mid_activation=act1, activation=act2)
    assert y.dtype == dtype and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])
    if not grads:
        return y
    got = torch.autograd.grad(y, [t for t in mine if t is not None], gy.to(dtype))
    want = torch.autograd.grad(expected, [t for t in leaves if t is not None], gy,
                               allow_unused=True)
    names = [n for n, t in zip(["x", "dw", "pw", "b", "b_dw"], inputs) if t is not None]
    for name, a, e in zip(names, got, want):
        e = torch.zeros_like(a, dtype=torch.float64) if e is None else e
        torch.testing.assert_close(a.double(), e, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")
    return y
