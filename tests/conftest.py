"""Shared test helpers: the float64 nn.Conv2d oracle and the implementation paths."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from torch import nn
from torch.func import functional_call

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
# must be switched on before the kernels are defined (first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sepconv  # noqa: E402
from sepconv import _triton  # noqa: E402
from sepconv._backend import _C  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("SEPCONV_HYPOTHESIS", "ci"))

# Small calls run on fewer threads than torch's (each thread gets thread_macs
# multiply-adds at least): nearly every call here is small, so the tests take every
# thread whatever the size, as the threaded paths need; test_ops checks the rule itself.
if _C is not None:
    _C.set_thread_macs(0)

ACTS = {None: nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU,
        "hardswish": nn.Hardswish, "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
ISAS = list(_C.supported_isas()) if _C is not None else []

REQUIRE_ONNX = os.environ.get("SEPCONV_REQUIRE_ONNX") == "1"  # CI: run, never skip

# CI sets SEPCONV_REQUIRE_TRITON=1: there the Triton tests must run, not be skipped.
if os.environ.get("SEPCONV_REQUIRE_TRITON") == "1" and not _triton.installed():
    raise RuntimeError("SEPCONV_REQUIRE_TRITON=1 but triton is not installed")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU every dtype; in the (slow) interpreter float32 everywhere and bfloat16, whose
# rounding of the intermediate is the riskiest; float16 has its own tests there.
TRITON_DTYPES = [torch.float32, torch.bfloat16] + [torch.float16] * (TRITON_DEVICE == "cuda")

# (backend, isa, dtype, device): every native ISA in float32 and float64, the reference,
# and the Triton kernels.
PATHS = [("native", isa, dt, "cpu") for isa in ISAS for dt in (torch.float32, torch.float64)] \
    + [("reference", None, torch.float64, "cpu")] \
    + [("triton", None, dt, TRITON_DEVICE) for dt in TRITON_DTYPES] * _triton.installed()
PATH_IDS = ["-".join(filter(None, (b, i, str(d)[6:]))) for b, i, d, _ in PATHS]
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9),
       torch.float16: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """got (any device, ``dtype``) against the float64 ``want``. In 16-bit dtypes the
    absolute tolerance scales with the largest |want|: a gradient summed over many
    pixels carries an error of eps times its terms, not times the (maybe cancelled)
    sum."""
    tol = dict(TOL[dtype])
    if dtype in (torch.float16, torch.bfloat16) and want.numel():
        tol["atol"] *= max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double().cpu(), want, **tol, msg=lambda m: f"{what}: {m}")


class _PoisonedTorch:
    """``torch`` as sepconv._native sees it in the tests: its output buffers come
    filled with NaN, so a kernel that leaves any element of y or of a gradient
    unwritten (grad_x is cleared by the kernel itself) fails the comparison."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@pytest.fixture(autouse=True)
def _poisoned_native_outputs(monkeypatch):
    from sepconv import _native
    monkeypatch.setattr(_native, "torch", _PoisonedTorch())


def _on_path(param):
    backend, isa, dtype, device = param
    if isa is not None:
        previous = _C.isa()
        _C.set_isa(isa)
    with sepconv.use_backend(backend):
        yield dict(dtype=dtype, device=device)
    if isa is not None:
        _C.set_isa(previous)


@pytest.fixture(params=PATHS, ids=PATH_IDS)
def path(request):
    """Runs the test body on one implementation path; yields its dtype and device."""
    yield from _on_path(request.param)


@pytest.fixture(params=[p for p in PATHS if p[0] == "native"],
                ids=[i for i, p in zip(PATH_IDS, PATHS) if p[0] == "native"])
def native_path(request):
    """``path``, on the native paths only (for shapes too large for the interpreter)."""
    yield from _on_path(request.param)


@pytest.fixture(params=["bands", "split"])
def backward_mode(request):
    """The native backward forced onto one way of sharing out its work."""
    from sepconv._backend import _C
    if _C is None:
        pytest.skip("extension not built")
    before = _C.backward_mode()
    _C.set_backward_mode(request.param)
    yield request.param
    _C.set_backward_mode(before)


def tf_same_pad(x, kernel_size, stride, dilation, mode="constant"):
    """x padded as TensorFlow's SAME (timm's pad_same): out = ceil(in / stride)."""
    pads = []
    for i, k, s, d in zip(x.shape[-2:], kernel_size, _two(stride), _two(dilation)):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads = [total // 2, total - total // 2] + pads  # F.pad lists the last dim first
    return F.pad(x, pads, mode=mode)


def _two(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def oracle(x, dw, pw, b, b_dw, stride, padding, dilation, act1, act2, mid_dtype=None,
           scale=None, groups=1, shuffle=1):
    """The unfused pair of nn.Conv2d modules in float64, run on the given tensors
    (functional_call keeps them in the autograd graph). ``mid_dtype`` rounds the
    intermediate to that dtype on the way forward, and on the way back the gradients that
    the kernels store in it (dL/dz at the pointwise output, dL/du at the depthwise one),
    as the nn.Conv2d pair in that dtype and the fused kernels do: a 16-bit bias gradient
    sums many rounded terms, which may cancel far below them. ``groups``: the
    pointwise conv's; ``shuffle``: a channel shuffle of x first (as F.channel_shuffle)."""
    C, Cm, Co = x.shape[1], dw.shape[0], pw.shape[0]
    if shuffle > 1:
        N, _, H, W = x.shape
        x = x.reshape(N, shuffle, C // shuffle, H, W).transpose(1, 2).reshape(N, C, H, W)
    if padding == "same" and stride not in (1, (1, 1)):  # nn.Conv2d refuses: pad first
        x, padding = tf_same_pad(x, dw.shape[2:], stride, dilation), 0
    dconv = nn.Conv2d(C, Cm, tuple(dw.shape[2:]), stride, padding, dilation, groups=C,
                      bias=b_dw is not None, device="meta")
    pconv = nn.Conv2d(Cm, Co, 1, bias=b is not None, groups=groups, device="meta")
    u = functional_call(dconv, {"weight": dw, "bias": b_dw}, (x,))
    rounded = lambda g: g.to(mid_dtype).double()  # noqa: E731
    if mid_dtype is not None and u.requires_grad:
        u.register_hook(rounded)
    mid = ACTS[act1]()(u)
    if scale is not None:  # squeeze-and-excitation's per-image factor of each mid channel
        mid = mid * scale[:, :, None, None]
    if mid_dtype is not None:
        mid = mid + (mid.detach().to(mid_dtype).double() - mid.detach())
    z = functional_call(pconv, {"weight": pw, "bias": b}, (mid,))
    if mid_dtype is not None and z.requires_grad:
        z.register_hook(rounded)
    return ACTS[act2]()(z)


def make_inputs(N, C, H, W, m, Co, k, *, bias=True, dw_bias=True, seed=0, groups=1):
    """Random float64 tensors of O(1) magnitude: x, dw, pw, b, b_dw (pw grouped by
    ``groups``)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return (r(N, C, H, W), r(C * m, 1, kh, kw) / kh,
            r(Co, C * m // groups, 1, 1) / (C * m // groups) ** 0.5,
            r(Co) if bias else None, r(C * m) if dw_bias else None)


def check_against_oracle(target, inputs, stride=1, padding=0, dilation=1, act1=None,
                         act2=None, layout=lambda t: t, grads=True, groups=1, shuffle=1):
    """Forward and every gradient of sepconv (inputs moved ``.to(**target)``: dtype and
    device; x passed through ``layout``) against the float64 oracle on random data.
    ``inputs``: x, dw, pw, b, b_dw (make_inputs), and optionally a scale (N, C * m).
    ``groups``: the pointwise conv's (pw made with them); ``shuffle``: x's channel
    shuffle."""
    dtype = target["dtype"]
    low = dtype in (torch.float16, torch.bfloat16)
    if low:  # the oracle rounds where the kernel must: inputs and intermediate
        inputs = [t if t is None else t.to(dtype).double() for t in inputs]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    scaled = len(inputs) > 5
    expected = oracle(*leaves[:5], stride, padding, dilation, act1, act2, dtype if low else None,
                      scale=leaves[5] if scaled else None, groups=groups, shuffle=shuffle)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(expected.shape, dtype=torch.float64, generator=g).to(dtype).double()
    mine = [t.detach().to(**target).requires_grad_() if t is not None else None for t in inputs]
    x = layout(mine[0])
    y = sepconv.separable_conv2d(x, mine[1], mine[2], mine[3], stride, padding, dilation,
                                 depthwise_bias=mine[4], mid_activation=act1, activation=act2,
                                 scale=mine[5] if scaled else None, pointwise_groups=groups,
                                 channel_shuffle=shuffle)
    assert y.dtype == dtype and y.shape == expected.shape
    assert_close(y, expected, dtype, "y")
    if not grads:
        return y
    got = torch.autograd.grad(y, [t for t in mine if t is not None], gy.to(**target))
    want = torch.autograd.grad(expected, [t for t in leaves if t is not None], gy,
                               allow_unused=True)
    names = [n for n, t in zip(["x", "dw", "pw", "b", "b_dw", "scale"], inputs) if t is not None]
    for name, a, e in zip(names, got, want):
        e = torch.zeros(a.shape, dtype=torch.float64) if e is None else e
        assert_close(a, e, dtype, f"grad {name}")
    return y


def assert_compiled_matches_eager(model, inputs, **compile_kwargs):
    """torch.compile(model, fullgraph=True) gives the eager output and gradients."""
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    for x in inputs:
        x.requires_grad_()
        eager_y = model(x)
        eager_g = torch.autograd.grad(eager_y.sum(), [x, *model.parameters()])
        y = compiled(x)
        g = torch.autograd.grad(y.sum(), [x, *model.parameters()])
        torch.testing.assert_close(y, eager_y)
        for a, b in zip(g, eager_g):
            torch.testing.assert_close(a, b)


def pytest_runtest_logreport(report):
    """SEPCONV_FAILURE_LOG=FILE: each failure's traceback appended to FILE as it happens
    (once, by xdist's controller), so a run cut short by a time limit still says why."""
    path = os.environ.get("SEPCONV_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
