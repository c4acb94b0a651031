"""Threads, leaks, determinism and numerical edge cases (NaN / Inf, denormals, 16-bit
range) on the native CPU kernels and, through the interpreter, the Triton kernels."""

import subprocess
import sys
import threading

import pytest
import torch
from conftest import ISAS, TRITON_DEVICE, make_inputs

import sepconv
from sepconv import _triton
from sepconv._backend import _C

SEP = sepconv.separable_conv2d
NATIVE = pytest.mark.skipif(_C is None, reason="native kernels not built")
CONFIG = dict(stride=1, padding=1, mid_activation="relu", activation="silu")


def _fwd_bwd(inputs, fmt=torch.channels_last):
    x, dw, pw, b, bd = (t.detach().clone().requires_grad_() for t in inputs)
    y = SEP(x.contiguous(memory_format=fmt), dw, pw, b, depthwise_bias=bd, **CONFIG)
    return (y, *torch.autograd.grad(y, (x, dw, pw, b, bd), torch.ones_like(y)))


@NATIVE
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_native_results_are_bitwise_reproducible(isa, fmt):
    inputs = [t.float() for t in make_inputs(3, 24, 15, 13, 1, 40, 3)]
    previous = _C.isa()
    _C.set_isa(isa)
    try:
        first, second = _fwd_bwd(inputs, fmt), _fwd_bwd(inputs, fmt)
    finally:
        _C.set_isa(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@NATIVE
def test_concurrent_calls_from_threads():
    """Four Python threads at once (the kernels release the GIL) get what each gets alone."""
    cases = [[t.float() for t in make_inputs(2, 8 + i, 11, 9, 1, 16, 3, seed=i)]
             for i in range(4)]
    alone = [_fwd_bwd(c) for c in cases]
    together, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(20):
                together[i] = _fwd_bwd(cases[i])
        except Exception as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for mine, ref in zip(together, alone):
        for a, b in zip(mine, ref):
            assert torch.equal(a, b)


LEAK_CHECK = """
import torch, sepconv
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
x = torch.randn(2, 8, 10, 10, requires_grad=True).contiguous(memory_format=torch.channels_last)
dw = torch.randn(8, 1, 3, 3, requires_grad=True)
pw = torch.randn(12, 8, 1, 1, requires_grad=True)
def calls(n):
    for _ in range(n):
        y = sepconv.separable_conv2d(x, dw, pw, None, 1, 1, activation="relu")
        y.sum().backward()
        with torch.no_grad():
            sepconv.separable_conv2d(x, dw, pw, None, 1, 1)
calls(2000)
before = rss_mib()
calls(20000)
print(rss_mib() - before)
"""


@NATIVE
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_many_calls_keep_memory_flat():
    r = subprocess.run([sys.executable, "-c", LEAK_CHECK], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 16, f"RSS grew by {r.stdout.strip()} MiB over 20k calls"


# (backend, dtype, device) for the numerical edge cases
EDGE_PATHS = [("native", dt, "cpu") for dt in (torch.float32, torch.float64)] * (_C is not None) \
    + [("triton", torch.float32, TRITON_DEVICE)] * _triton.installed()


def _both(backend, dtype, device, x, dw, pw, b, **kw):
    """sepconv on ``backend`` and the reference, same dtype: forward and every gradient."""
    out = []
    for name in (backend, "reference"):
        leaves = [t.to(dtype=dtype, device=device).requires_grad_() for t in (x, dw, pw)]
        bias = None if b is None else b.to(dtype=dtype, device=device).requires_grad_()
        with sepconv.use_backend(name):
            y = SEP(*leaves, bias, **kw)
            wrt = leaves + [bias] * (bias is not None)
            out.append((y, *torch.autograd.grad(y, wrt, torch.ones_like(y))))
    return out


@pytest.mark.parametrize("backend,dtype,device", EDGE_PATHS)
def test_nan_and_inf_land_where_the_reference_puts_them(backend, dtype, device):
    x, dw, pw, b, _ = make_inputs(2, 3, 8, 9, 1, 4, 3)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 5, 5] = float("inf")
    x[1, 2, 0, 0] = -float("inf")
    ours, ref = _both(backend, dtype, device, x, dw, pw, b, padding=1, mid_activation="relu")
    assert ref[0].isnan().any() and ref[0].isinf().any()  # the case tests something
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, equal_nan=True, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_infinite_gradient_where_the_activation_is_flat(native_path, act):
    """relu' and relu6' are 0 below 0 (and above 6): there torch's backward gives 0 for
    any incoming gradient, inf included (a select, not g * 0 = NaN); in both stages,
    with y above 6 for relu6, on every ISA path (their vector code differs)."""
    dtype = native_path["dtype"]
    x, dw, pw, b, bd = (t.to(dtype) * 4 for t in make_inputs(2, 3, 8, 9, 1, 21, 3))
    conf = dict(padding=1, mid_activation=act, activation=act)
    runs = []
    for name in ("native", "reference"):
        with sepconv.use_backend(name):
            xs = [t.clone().requires_grad_() for t in (x, dw, pw, b, bd)]
            runs.append((xs, SEP(xs[0], xs[1], xs[2], xs[3], depthwise_bias=xs[4], **conf)))
    # inf where both outputs sit on a flat part (exactly 0, or 6 for relu6)
    flat = [(y <= 0) | (y >= 6) if act == "relu6" else y <= 0 for _, y in runs]
    flat = flat[0] & flat[1]
    assert flat.any() and (~flat).any()
    gy = torch.where(flat, torch.inf, torch.randn_like(runs[0][1]))
    grads = [torch.autograd.grad(y, xs, gy) for xs, y in runs]
    for a, e in zip(*grads):
        assert a.isfinite().all()
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.fixture
def keep_denormals():
    previous = sepconv.set_flush_denormal(False)
    yield
    sepconv.set_flush_denormal(previous)


def _subnormal_inputs(dtype):
    tiny = torch.finfo(dtype).tiny
    x, dw, pw, b, _ = make_inputs(1, 2, 6, 6, 1, 3, 3)
    return tiny, x, dw, pw, x * tiny / 64  # every x subnormal; products with O(1) weights too


@pytest.mark.parametrize("backend,dtype,device", EDGE_PATHS)
def test_denormals_are_kept_when_asked(backend, dtype, device, keep_denormals):
    """With flushing off (and always on Triton), subnormal inputs give subnormal
    results equal to the reference's, not zeros."""
    tiny, _, dw, pw, x = _subnormal_inputs(dtype)
    ours, ref = _both(backend, dtype, device, x, dw, pw, None, padding=1)
    assert 0 < ours[0].abs().max() < tiny
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-3, atol=tiny / 2**10)


def test_native_flushes_denormals_by_default_and_leaves_the_caller_alone(native_path):
    """By default the native kernels treat subnormals as zero: subnormal x gives an
    exact zero y, normal data is unaffected, and the caller's own arithmetic still
    keeps subnormals afterwards."""
    dtype = native_path["dtype"]
    assert sepconv.backend_info()["cpu_flush_denormal"]
    tiny, normal, dw, pw, x = _subnormal_inputs(dtype)
    y = SEP(x.to(dtype), dw.to(dtype), pw.to(dtype), padding=1)
    assert y.abs().max() == 0
    ours, ref = _both("native", dtype, "cpu", normal, dw, pw, None, padding=1)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e)
    half_tiny = torch.tensor(tiny, dtype=dtype) / 2
    assert half_tiny > 0 and (half_tiny * torch.ones(64, dtype=dtype)).min() > 0


def test_set_flush_denormal_returns_the_previous_mode():
    if _C is None:
        assert sepconv.set_flush_denormal(True) is False
        return
    assert sepconv.set_flush_denormal(False) is True
    assert sepconv.backend_info()["cpu_flush_denormal"] is False
    assert sepconv.set_flush_denormal(True) is False
    assert sepconv.backend_info()["cpu_flush_denormal"] is True


def test_set_huge_pages_returns_the_previous_mode():
    if _C is None:
        assert sepconv.set_huge_pages(True) is False
        return
    available = _C.huge_page_bytes() > 0  # False where the OS has no transparent huge pages
    assert sepconv.backend_info()["cpu_huge_pages"] is available
    assert sepconv.set_huge_pages(False) is available
    assert sepconv.backend_info()["cpu_huge_pages"] is False
    assert sepconv.set_huge_pages(True) is False
    assert sepconv.backend_info()["cpu_huge_pages"] is available


@NATIVE
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_huge_page_advice_leaves_large_outputs_unchanged(fmt):
    """y and grad_x over 4 MiB (so holding whole 2 MiB pages, wherever they start) are advised
    onto huge pages by default: same bits as with the advice off, and equal to the
    reference."""
    inputs = make_inputs(2, 36, 131, 127, 1, 40, 3)  # y 5.3 MB, grad_x 4.8 MB in fp32
    runs = []
    for mode in (True, False):
        previous = sepconv.set_huge_pages(mode)
        try:
            runs.append(_fwd_bwd([t.float() for t in inputs], fmt))
        finally:
            sepconv.set_huge_pages(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with sepconv.use_backend("reference"):
        ref = _fwd_bwd([t.float() for t in inputs], fmt)
    for a, e in zip(runs[0], ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not _triton.installed(), reason="triton is not installed")
def test_float16_sums_past_the_float16_range_are_accumulated_in_float32():
    """Partial sums of 80000 (> 65504, float16's largest) that end in range: fp32
    accumulation gives the exact 4000 where a float16 accumulator would give inf."""
    x = torch.tensor([2000.0, 2000.0, 1900.0]).view(1, 1, 1, 3)
    dw = torch.tensor([20.0, 20.0, -40.0]).view(1, 1, 1, 3)
    pw = torch.ones(1, 1, 1, 1)
    dev = dict(dtype=torch.float16, device=TRITON_DEVICE)
    with sepconv.use_backend("triton"):
        y = SEP(x.to(**dev), dw.to(**dev), pw.to(**dev))
    assert y.item() == 4000.0


def _free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


# Paths whose offsets can be checked past 2^31 elements for real: native on CPU, and the
# Triton kernels on a GPU (the interpreter would copy 8 GiB through numpy).
BIG_PATHS = [("native", "cpu")] * (_C is not None) \
    + [("triton", "cuda")] * (_triton.installed() and TRITON_DEVICE == "cuda")


# NCHW: one channel of 2^31 + 2^19 pixels, so that a row offset alone passes int32;
# channels_last: two channels, the pixel offset times C passes it.
BIG_LAYOUTS = {"nchw": (torch.contiguous_format, 1, 2**19 + 128),
               "channels_last": (torch.channels_last, 2, 2**18 + 64)}


@pytest.mark.parametrize("layout", BIG_LAYOUTS)
@pytest.mark.parametrize("backend,device", BIG_PATHS)
def test_element_offsets_past_2_31(backend, device, layout):
    """x of 2^31 + 2^19 float32 elements (8 GiB; grad_x as much again): the last output
    rows read x, and write grad_x, at offsets past int32. grad_y is zero except on those
    rows, so the float64 pair on a slice of x is the exact reference for everything."""
    if device == "cpu" and not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/meminfo")
    if _free_bytes(device) < 18 * 2**30:
        pytest.skip("needs 18 GiB of free memory")
    fmt, C, H = BIG_LAYOUTS[layout]
    W, s, rows = 2**12, 64, 3  # stride 64 keeps y small
    x = torch.empty(1, C, H, W, device=device, memory_format=fmt).fill_(0.25)
    Ho = (H - 3) // s + 1
    top = (Ho - rows) * s  # the first x row the checked output rows read
    g = torch.Generator().manual_seed(0)
    part, dw, pw, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                       ((1, C, H - top, W), (C, 1, 3, 3), (3, C, 1, 1), (3,)))
    x[:, :, top:] = part
    leaves = [t.float().to(device).requires_grad_() for t in (dw, pw, b)]
    x.requires_grad_()
    with sepconv.use_backend(backend):
        y = SEP(x, *leaves, stride=s, activation="relu")
        gy = torch.zeros_like(y)
        gy[:, :, -rows:] = torch.randn(1, 3, rows, y.shape[3], generator=g).to(device)
        grads = torch.autograd.grad(y, [x, *leaves], gy)
    got = [y[:, :, -rows:], grads[0][:, :, top:], *grads[1:]]
    assert grads[0][:, :, :top].count_nonzero() == 0

    ref_leaves = [t.requires_grad_() for t in (part, dw, pw, b)]
    with sepconv.use_backend("reference"):
        ref = SEP(*ref_leaves, stride=s, activation="relu")
    want = [ref, *torch.autograd.grad(ref, ref_leaves, gy[:, :, -rows:].double().cpu())]
    assert ref.shape[2] == rows
    for a, e, what in zip(got, want, ["y", "grad_x", "grad_dw", "grad_pw", "grad_b"]):
        torch.testing.assert_close(a.double().cpu(), e, rtol=2e-4, atol=2e-4, msg=what)
