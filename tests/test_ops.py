"""The torch.library ops: opcheck, gradcheck, torch.compile, backends and fallbacks."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from conftest import ISAS, assert_compiled_matches_eager, check_against_oracle, make_inputs

import sepconv
from sepconv._backend import _C

OP = torch.ops.sepconv.separable_conv2d
BWD = torch.ops.sepconv.separable_conv2d_backward


def _args(channels_last, bias, dtype=torch.float64, backend="auto", act="relu"):
    x, dw, pw, b, bd = (t.to(dtype) if t is not None else None
                        for t in make_inputs(2, 3, 7, 6, 2, 5, 3, bias=bias, dw_bias=bias))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, dw, pw, bd, b)]
    return (*leaves, [2, 1], [1, 0, 2, 1], [1, 2], act, "silu", backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_forward(backend, channels_last, bias):
    torch.library.opcheck(OP, _args(channels_last, bias, backend=backend))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_forward_grouped(backend, channels_last):
    x, dw, pw, b, bd = make_inputs(2, 6, 7, 6, 1, 4, 3, groups=2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() for t in (x, dw, pw, bd, b)]
    for shuffle in (1, 3):
        torch.library.opcheck(OP, (*leaves, [2, 1], [1, 0, 2, 1], [1, 2], "relu", "silu",
                                   backend, None, 2, shuffle))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mask", [[True] * 5, [False, True, False, True, False],
                                  [True, False, False, False, True]])
def test_opcheck_backward(channels_last, mask):
    x, dw, pw, bd, b, *conf = _args(channels_last, True)
    gy = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    torch.library.opcheck(BWD, (gy, x.detach(), dw.detach(), pw.detach(), bd.detach(),
                                b.detach(), *conf, mask))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("mask", [[True] * 5, [False, False, True, False, False],
                                  [True, False, False, True, True]])
@pytest.mark.parametrize("shuffle", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_backward_grouped(backend, mask, shuffle, channels_last):
    """The backward op with pointwise groups and a channel shuffle, every gradient against
    the reference's (which runs on the dense block-diagonal weight and the shuffled x),
    and opcheck."""
    x, dw, pw, b, bd = make_inputs(2, 6, 7, 6, 1, 4, 3, groups=2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conf = ([2, 1], [1, 0, 2, 1], [1, 2], "relu", "silu")
    gy = torch.randn_like(OP(x, dw, pw, bd, b, *conf, "reference", None, 2, shuffle))
    args = (gy, x, dw, pw, bd, b, *conf, backend, mask, None, 2, shuffle)
    torch.library.opcheck(BWD, args)
    got = BWD(*args)
    want = BWD(gy, x, dw, pw, bd, b, *conf, "reference", mask, None, 2, shuffle)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert got[2].shape == ((4, 3, 1, 1) if mask[2] else (0,))


def test_opcheck_backward_with_output():
    x, dw, pw, bd, b, stride, pad, dil, act, _, backend = _args(True, True)
    y = OP(x, dw, pw, bd, b, stride, pad, dil, act, "relu6", backend).detach()
    gy = torch.randn_like(y)
    torch.library.opcheck(BWD, (gy, x.detach(), dw.detach(), pw.detach(), bd.detach(),
                                b.detach(), stride, pad, dil, act, "relu6", backend, [True] * 5,
                                y))


@pytest.mark.parametrize("activation,reads_y", [("relu", True), ("relu6", True),
                                                ("silu", False), (None, False)])
def test_native_backward_reads_relu_derivatives_from_the_output(monkeypatch, activation,
                                                                reads_y):
    """relu' and relu6' come from the saved output instead of a recomputed pointwise GEMM;
    the gradients are the same either way (test_functional compares them with float64)."""
    if not sepconv.backend_info()["cpu_native"]:
        pytest.skip("extension not built")
    from sepconv import _native
    seen, real = [], _native.backward
    monkeypatch.setattr(_native, "backward",
                        lambda *a, y=None, **kw: seen.append(y) or real(*a, y=y, **kw))
    x, dw, pw, b = (t.float().requires_grad_() for t in make_inputs(2, 3, 7, 6, 1, 4, 3)[:4])
    y = sepconv.separable_conv2d(x, dw, pw, b, 1, 1, activation=activation)
    with_y = torch.autograd.grad(y, [x, dw, pw, b], torch.ones_like(y))
    assert (seen[0] is not None) == reads_y
    monkeypatch.setattr(_native, "backward", lambda *a, y=None, **kw: real(*a, **kw))
    without_y = torch.autograd.grad(sepconv.separable_conv2d(x, dw, pw, b, 1, 1,
                                                             activation=activation),
                                    [x, dw, pw, b], torch.ones_like(y))
    for a, e in zip(with_y, without_y):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    if reads_y:
        with pytest.raises(ValueError, match="y must be like grad_y"):
            real(torch.ones_like(y), x, dw, pw, None, b, [1, 1], [1, 1, 1, 1], [1, 1],
                 "none", activation, [True] * 5, y=y[:, :2])


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("norm", [False, True])
def test_native_training_keeps_z_for_gelu(monkeypatch, activation, norm):
    """GELU's derivative needs z (not y): the native training forward keeps z and the
    backward reads it (y_is_z) instead of recomputing the pointwise GEMM; the gradients
    are those of the backward that recomputes it."""
    if not sepconv.backend_info()["cpu_native"]:
        pytest.skip("extension not built")
    from sepconv import _native
    seen, real = [], _native.backward
    monkeypatch.setattr(_native, "backward", lambda *a, y=None, y_is_z=False, **kw:
                        seen.append((y, y_is_z)) or real(*a, y=y, y_is_z=y_is_z, **kw))
    x, dw, pw, b = (t.requires_grad_() for t in make_inputs(2, 3, 7, 6, 1, 4, 3)[:4])
    kw = dict(activation=activation, norm="layernorm") if norm else dict(activation=activation)
    y = sepconv.separable_conv2d(x, dw, pw, b, 1, 1, **kw)
    g = torch.randn_like(y)
    kept = torch.autograd.grad(y, [x, dw, pw, b], g)
    z, y_is_z = seen[0]
    assert y_is_z and z.shape == y.shape and not torch.equal(z, y)
    monkeypatch.setattr(_native, "backward",
                        lambda *a, y=None, y_is_z=False, **kw: real(*a, **kw))
    recomputed = torch.autograd.grad(sepconv.separable_conv2d(x, dw, pw, b, 1, 1, **kw),
                                     [x, dw, pw, b], g)
    for a, e in zip(kept, recomputed):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("isa", ISAS or [None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(isa, channels_last):
    from sepconv._backend import _C
    previous = _C.isa() if isa else None
    if isa:
        _C.set_isa(isa)
    try:
        args = _args(channels_last, True, act="hardswish")
        assert torch.autograd.gradcheck(OP, args)
    finally:
        if isa:
            _C.set_isa(previous)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sepconv.SeparableConv2d(3, 8, 3, padding=1, mid_activation="relu", activation="relu"),
        sepconv.SeparableConv2d(8, 4, 5, stride=2, padding="valid", depthwise_bias=True),
        sepconv.SeparableConv2d(4, 6, 3, padding=1, pointwise_groups=2, channel_shuffle=2),
    )
    inputs = [torch.randn(b, 3, 16, 16) for b in (2, 3)]  # and channels-last (its shuffle)
    inputs.append(torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    assert_compiled_matches_eager(model, inputs, dynamic=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_takes_the_reference_path(dtype):
    x, dw, pw, b, bd = make_inputs(2, 3, 8, 8, 1, 4, 3)
    y = sepconv.separable_conv2d(x.to(dtype), dw.to(dtype), pw.to(dtype), b.to(dtype), 1, 1,
                                 depthwise_bias=bd.to(dtype), activation="relu")
    with sepconv.use_backend("reference"):
        ref = sepconv.separable_conv2d(x, dw, pw, b, 1, 1, depthwise_bias=bd, activation="relu")
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=5e-2, atol=5e-2)


def test_backend_info():
    info = sepconv.backend_info()
    if os.environ.get("SEPCONV_REQUIRE_NATIVE"):  # set by CI: a broken build must fail
        assert info["cpu_native"], "sepconv._C did not load"
    assert {"version", "cpu_native", "cpu_isa", "num_threads", "triton", "cuda"} <= set(info)
    assert info["version"] == sepconv.__version__
    assert info["num_threads"] == torch.get_num_threads()
    if info["cpu_native"]:
        assert info["cpu_isa"] in ("generic", "avx2", "avx512")


def test_use_backend_restores_previous():
    assert sepconv.backend_info()["backend"] == "auto"
    with sepconv.use_backend("reference"):
        assert sepconv.backend_info()["backend"] == "reference"
        with sepconv.use_backend("native"):
            assert sepconv.backend_info()["backend"] == "native"
        assert sepconv.backend_info()["backend"] == "reference"
    assert sepconv.backend_info()["backend"] == "auto"


def test_native_path_is_taken_on_cpu(monkeypatch):
    """auto on a float32 CPU tensor must run the C++ kernels, not the reference."""
    if not sepconv.backend_info()["cpu_native"]:
        pytest.skip("extension not built")
    from sepconv import reference
    monkeypatch.setattr(reference, "forward", lambda *a: pytest.fail("reference ran"))
    x, dw, pw, b, bd = (t.float() for t in make_inputs(1, 3, 5, 5, 1, 2, 3))
    sepconv.separable_conv2d(x, dw, pw, b, 1, 1)


def _spy_op(monkeypatch) -> list:
    """Records the calls that go through the registered op (the dispatcher)."""
    from sepconv import _ops
    calls, real = [], _ops.separable_conv2d
    monkeypatch.setattr(_ops, "separable_conv2d", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_inference_skips_the_dispatcher(monkeypatch, channels_last):
    """Without autograd, modes or tracing, the native kernel runs directly: the same
    result, bit for bit, as through the op."""
    if not sepconv.backend_info()["cpu_native"]:
        pytest.skip("extension not built")
    x, dw, pw, b, bd = (t.float() for t in make_inputs(2, 3, 9, 8, 1, 4, 3, bias=True,
                                                       dw_bias=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _spy_op(monkeypatch)
    kw = dict(depthwise_bias=bd, mid_activation="relu6", activation="silu")
    y = sepconv.separable_conv2d(x, dw, pw, b, 2, 1, **kw)
    assert not calls
    y_op = OP(x, dw, pw, bd, b, [2, 2], [1, 1, 1, 1], [1, 1], "relu6", "silu", "auto")
    assert torch.equal(y, y_op) and y.stride() == y_op.stride()
    with torch.no_grad():
        sepconv.SeparableConv2d(3, 4, 3)(x)
    assert not calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_training_skips_the_dispatcher(monkeypatch, channels_last):
    """With autograd in eager mode, the native kernels run through an autograd.Function:
    the same output and gradients, bit for bit, as through the op's autograd formula."""
    if not sepconv.backend_info()["cpu_native"]:
        pytest.skip("extension not built")
    inputs = [t.float() for t in make_inputs(2, 3, 9, 8, 2, 5, 3, bias=True, dw_bias=True)]
    if channels_last:
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    gy = torch.randn(2, 5, 5, 4).contiguous(memory_format=torch.channels_last)
    results = []
    for use_op in (False, True):
        x, dw, pw, b, bd = (t.detach().clone().requires_grad_() for t in inputs)
        calls = _spy_op(monkeypatch)
        if use_op:
            y = OP(x, dw, pw, bd, b, [2, 2], [1, 1, 1, 1], [1, 1], "relu6", "relu", "auto")
        else:
            y = sepconv.separable_conv2d(x, dw, pw, b, 2, 1, depthwise_bias=bd,
                                         mid_activation="relu6", activation="relu")
        assert use_op or not calls  # (OP is the registered op itself, not the spied name)
        assert y.grad_fn is not None
        y.backward(gy)
        results.append([y, x.grad, dw.grad, pw.grad, b.grad, bd.grad])
    for got, want in zip(*results):
        assert torch.equal(got, want) and got.stride() == want.stride()
    # A gradient of the gradient is not implemented: a clear error, not a silent zero.
    x, dw, pw = (t.detach().clone().requires_grad_() for t in inputs[:3])
    (gx,) = torch.autograd.grad(sepconv.separable_conv2d(x, dw, pw).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        (gx * x).sum().backward()


def test_recorded_calls_go_through_the_op(monkeypatch):
    """FakeTensorMode and the profiler must each see the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, dw, pw, b, _ = (t.float() for t in make_inputs(1, 3, 6, 6, 1, 4, 3, bias=True))
    calls = _spy_op(monkeypatch)
    with torch.no_grad(), torch.profiler.profile() as prof:
        sepconv.separable_conv2d(x, dw, pw, b, 1, 1)
    assert len(calls) == 1
    assert any(e.name == "sepconv::separable_conv2d" for e in prof.events())
    with FakeTensorMode() as mode:
        y = sepconv.separable_conv2d(*(mode.from_tensor(t) for t in (x, dw, pw, b)), 1, 1)
    assert len(calls) == 2 and y.shape == (1, 4, 6, 6)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_import_without_extension_warns_and_falls_back():
    code = (
        "import sys, warnings; sys.modules['sepconv._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); import sepconv\n"
        "assert any('reference' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "import torch; x = torch.randn(1, 2, 5, 5)\n"
        "y = sepconv.separable_conv2d(x, torch.randn(2, 1, 3, 3), torch.randn(3, 2, 1, 1))\n"
        "assert y.shape == (1, 3, 3, 3) and not sepconv.backend_info()['cpu_native']\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("isa", ISAS)
def test_isa_environment_variable(isa):
    r = _run("import sepconv; print(sepconv.backend_info()['cpu_isa'])", SEPCONV_ISA=isa)
    assert r.returncode == 0 and r.stdout.strip() == isa, r.stderr


def test_follows_torch_num_threads():
    """Results agree whatever the thread count (the kernels read torch.get_num_threads())."""
    inputs = make_inputs(3, 6, 20, 9, 1, 7, 3)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            check_against_oracle(dict(dtype=torch.float64), inputs, 1, 1, 1, "relu", None)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(_C is None, reason="extension not built")
def test_small_calls_take_fewer_threads():
    """A call gives each thread thread_macs multiply-adds at least (an OpenMP team costs
    about as much as a few hundred thousand): the default comes from the ISA; a layer
    that splits its backward over 2 threads runs on one when that minimum is raised, and
    gives the same results with the default as with every thread."""
    from sepconv import _native
    before, threads = _C.blocking()["thread_macs"], torch.get_num_threads()
    geom = _native._build_geometry(torch.empty(1, 768, 7, 7), torch.empty(768, 1, 3, 3), 64,
                                   (1, 1), (1, 1, 1, 1), (1, 1), torch.contiguous_format,
                                   "relu", "relu")
    geom = geom[:-1] + (2,)
    try:
        _C.set_thread_macs(-1)
        assert _C.blocking()["thread_macs"] == {"avx512": 1 << 18, "avx2": 1 << 17,
                                                "generic": 1 << 16}[_C.isa()]
        assert _C.backward_splits(geom, "float32")  # 8.2 M multiply-adds: 2 threads
        torch.set_num_threads(2)
        for inputs in (make_inputs(1, 16, 4, 4, 1, 16, 3), make_inputs(2, 24, 9, 11, 2, 19, 3)):
            check_against_oracle(dict(dtype=torch.float64), inputs, 1, 1, 1, "relu", "silu")
        _C.set_thread_macs(1 << 40)
        assert not _C.backward_splits(geom, "float32")
        with pytest.raises(ValueError, match="thread_macs"):
            _C.set_thread_macs(-2)
    finally:
        _C.set_thread_macs(before)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("isa", ISAS or [None])
def test_tile_budget_from_the_cache_and_its_extremes(channels_last, isa):
    """The forward's tile budget comes from the L2 size read at load; any budget, down to
    one-pixel tiles and up to whole images, on any number of threads (each takes a run
    of tiles and prefetches the next one's input), on every ISA path (AVX2 and generic
    round many small tiles up to whole 6-row GEMM blocks), gives the same results."""
    _C = sepconv._backend._C
    info = sepconv.backend_info()["cpu_caches"]
    assert info["l2"] > 0 and info["l1d"] > 0 and info["tile_bytes"] == max(info["l2"] // 4,
                                                                             64 << 10)
    # 3x3 taps, and 7x7 on 14x14 (masked border segments, with tiles that end mid-row)
    cases = [(make_inputs(2, 24, 11, 13, 2, 9, 3), 2, 1),
             (make_inputs(2, 20, 14, 14, 1, 9, 7), 1, 3)]
    layout = (lambda t: t.contiguous(memory_format=torch.channels_last)) if channels_last \
        else (lambda t: t)
    before, isa_before = torch.get_num_threads(), _C.isa()
    try:
        if isa:
            _C.set_isa(isa)
        for budget, threads in itertools.product((4096, 1 << 30), (1, 2, 3)):
            _C.set_tile_bytes(budget)  # 4096 B: 10-pixel tiles (float64, Cm = 48); or one
            torch.set_num_threads(threads)
            assert sepconv.backend_info()["cpu_caches"]["tile_bytes"] == budget
            for inputs, stride, padding in cases:
                check_against_oracle(dict(dtype=torch.float64), inputs, stride, padding, 1,
                                     "relu6", "silu", layout)
    finally:
        _C.set_tile_bytes(info["tile_bytes"])
        torch.set_num_threads(before)
        _C.set_isa(isa_before)
    with pytest.raises(ValueError, match="tile_bytes"):
        _C.set_tile_bytes(100)


@pytest.mark.parametrize("isa", ISAS or [None])
def test_non_temporal_output_stores(isa):
    """A channels-last forward output of at least stream_bytes (half the L3 read at load)
    is stored non-temporally. Forced on for every size, it gives the same results:
    output rows aligned to a whole vector (Co = 64) and not (Co = 40, 9), the bias and
    activation epilogues, one and several threads, and the backward after it."""
    _C = sepconv._backend._C
    info = sepconv.backend_info()["cpu_caches"]
    assert info["l3"] > 0 and info["stream_bytes"] == info["l3"] // 2
    l3 = "/sys/devices/system/cpu/cpu0/cache/index3/size"
    if os.path.exists(l3):  # the guest's own L3, not glibc's sysconf (the host's total in a VM)
        with open(l3) as f:
            assert info["l3"] == int(f.read().strip().rstrip("K")) << 10
    previous = _C.isa()
    if isa:
        _C.set_isa(isa)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    before = torch.get_num_threads()
    try:
        _C.set_stream_bytes(0)
        assert sepconv.backend_info()["cpu_caches"]["stream_bytes"] == 0
        for threads, co in itertools.product((1, 2), (64, 40, 9)):
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.float64):
                check_against_oracle(dict(dtype=dtype), make_inputs(2, 24, 11, 13, 1, co, 3),
                                     1, 1, 1, "relu", "relu6", cl)
    finally:
        _C.set_stream_bytes(info["stream_bytes"])
        _C.set_isa(previous)
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="stream_bytes"):
        _C.set_stream_bytes(-1)


@pytest.mark.parametrize("isa", ISAS or [None])
def test_backward_whatever_the_team(isa):
    """Every gradient on 1, 2 and 3 threads, where the bands do not divide the height (a
    short last band): on one thread the weight gradient's stack once flushed early and
    summed an accumulator the one-stack path had not cleared (9x11 at batch 2)."""
    _C = sepconv._backend._C
    before, isa_before = torch.get_num_threads(), _C.isa()
    cases = [(make_inputs(2, 8, 9, 11, 1, 16, 3), 1, 1), (make_inputs(2, 8, 9, 11, 1, 20, 3), 1, 1),
             (make_inputs(3, 16, 13, 7, 2, 24, 5), 2, 2)]
    try:
        if isa:
            _C.set_isa(isa)
        for threads, channels_last in itertools.product((1, 2, 3), (False, True)):
            torch.set_num_threads(threads)
            layout = (lambda t: t.contiguous(memory_format=torch.channels_last)) \
                if channels_last else (lambda t: t)
            for inputs, stride, padding in cases:
                check_against_oracle(dict(dtype=torch.float64), inputs, stride, padding, 1,
                                     "relu", None, layout)
    finally:
        torch.set_num_threads(before)
        _C.set_isa(isa_before)
