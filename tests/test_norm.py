"""norm="layernorm": ConvNeXt's dw -> LayerNorm -> pointwise inside the fused op, against
the nn pair (Conv2d -> permute -> nn.LayerNorm -> nn.Linear) in float64, forward and every
gradient (x, both convs' weights and biases, LayerNorm's weight and bias), every path."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import ACTS, REQUIRE_ONNX, assert_close, assert_compiled_matches_eager
from torch import nn

import sepconv

OP = torch.ops.sepconv.separable_conv2d
BWD = torch.ops.sepconv.separable_conv2d_backward

# (N, C, H, W, m, Co, k, stride, padding, dilation): ConvNeXt's 7x7; stride 2, dilation 2
# and a depth multiplier; one channel (each pixel's mean is itself: LN gives the bias); an
# odd size at batch 1; batch 0.
CASES = [(2, 8, 9, 11, 1, 24, 7, 1, 3, 1), (2, 6, 10, 7, 2, 20, 3, 2, 1, 2),
         (2, 1, 6, 5, 1, 3, 3, 1, 1, 1), (1, 5, 7, 13, 1, 17, 5, 1, 2, 1),
         (0, 4, 6, 6, 1, 8, 3, 1, 1, 1)]
LAYOUTS = {"nchw": lambda t: t, "channels_last": lambda t: t.contiguous(
    memory_format=torch.channels_last), "strided": lambda t: t[..., ::2]}


def _params(C, m, Co, k, seed=0):
    """Random (never zero) weights and biases of the pair, float64."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(dw=r(C * m, 1, k, k) / k, dwb=r(C * m), lnw=1 + 0.5 * r(C * m), lnb=r(C * m),
                pw=r(Co, C * m) / (C * m) ** 0.5, pwb=r(Co))


def _pair(x, p, stride, padding, dilation, act1, act2, eps):
    """ConvNeXt's block as torchvision writes it: Conv2d, permute, LayerNorm, Linear, act."""
    u = ACTS[act1]()(F.conv2d(x, p["dw"], p["dwb"], stride, padding, dilation, x.shape[1]))
    v = F.layer_norm(u.permute(0, 2, 3, 1), u.shape[1:2], p["lnw"], p["lnb"], eps)
    return ACTS[act2]()(F.linear(v, p["pw"], p["pwb"])).permute(0, 3, 1, 2)


def _fused(x, p, stride, padding, dilation, act1, act2, eps):
    return sepconv.separable_conv2d(x, p["dw"], p["pw"][:, :, None, None], p["pwb"], stride,
                                    padding, dilation, depthwise_bias=p["dwb"],
                                    mid_activation=act1, activation=act2, norm="layernorm",
                                    norm_weight=p["lnw"], norm_bias=p["lnb"], norm_eps=eps)


def check(target, case, act1, act2, layout=lambda t: t, eps=1e-6, seed=0):
    N, C, H, W, m, Co, k, stride, padding, dilation = case
    dtype, device = target["dtype"], target["device"]
    p64 = _params(C, m, Co, k, seed)
    base = torch.randn(N, C, H, 2 * W if layout is LAYOUTS["strided"] else W,
                       generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if dtype in (torch.float16, torch.bfloat16):  # the oracle starts from the same inputs
        p64 = {k_: v.to(dtype).double() for k_, v in p64.items()}
        base = base.to(dtype).double()
    ref_leaves = [layout(base).clone().requires_grad_()] + [t.clone().requires_grad_() for t in
                                                           p64.values()]
    want = _pair(ref_leaves[0], dict(zip(p64, ref_leaves[1:])), stride, padding, dilation, act1,
                 act2, eps)
    leaves = [layout(base.to(dtype).to(device)).requires_grad_()] + \
        [t.to(dtype).to(device).requires_grad_() for t in p64.values()]
    got = _fused(leaves[0], dict(zip(p64, leaves[1:])), stride, padding, dilation, act1, act2,
                 eps)
    assert got.shape == want.shape
    assert_close(got, want, dtype, "y")
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed + 2),
                     dtype=torch.float64)
    grads = torch.autograd.grad(got, leaves, gy.to(dtype).to(device))
    wants = torch.autograd.grad(want, ref_leaves, gy)
    for name, a, b in zip(["x", *p64], grads, wants):
        assert_close(a, b, dtype, name)
    return got


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("acts", [(None, "gelu"), ("relu", "gelu_tanh"), ("silu", None)],
                         ids=str)
def test_matches_the_pair(path, case, acts):
    check(path, case, *acts)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(path, layout):
    got = check(path, CASES[1], None, "gelu", LAYOUTS[layout])
    cl = layout == "channels_last"
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


# Wide mid channels: the native backward packs rows of 4 KiB and more into panels (float64:
# 512 channels), and the threads' teams and the two backward drivers differ.
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_wide_rows_on_any_team(native_path, threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check(native_path, (2, 130, 5, 6, 4, 9, 3, 1, 1, 1), "relu6", "gelu", seed=3)
        check(native_path, (3, 96, 7, 7, 1, 40, 7, 1, 3, 1), None, "gelu", LAYOUTS["channels_last"],
              seed=4)
    finally:
        torch.set_num_threads(before)


def test_eps_and_constant_pixels(path):
    """A pixel whose mid channels are all equal has variance 0: eps alone keeps rstd
    finite (1 / sqrt(eps)); x = 0 with zero depthwise biases makes every pixel so."""
    N, C, H, W, m, Co, k = 1, 4, 5, 5, 1, 6, 3
    p = {k_: v.to(**path) for k_, v in _params(C, m, Co, k).items()}
    p["dwb"] = torch.zeros_like(p["dwb"])
    x = torch.zeros(N, C, H, W, **path)
    for eps in (1e-6, 0.1):
        want = _pair(x.double(), {k_: v.double() for k_, v in p.items()}, 1, 1, 1, None, None, eps)
        assert_close(_fused(x, p, 1, 1, 1, None, None, eps), want, path["dtype"], "y")


def test_module():
    torch.manual_seed(0)
    sep = sepconv.SeparableConv2d(8, 32, 7, padding=3, depthwise_bias=True, norm="layernorm",
                                  norm_eps=1e-6, activation="gelu").double()
    assert sep.norm_weight.shape == sep.norm_bias.shape == (8,)
    assert torch.equal(sep.norm_weight, torch.ones(8, dtype=torch.float64))
    assert "norm='layernorm', norm_eps=1e-06" in repr(sep)
    with torch.no_grad():
        sep.norm_weight.normal_()
        sep.norm_bias.normal_()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    p = dict(dw=sep.depthwise_weight, dwb=sep.depthwise_bias, lnw=sep.norm_weight,
             lnb=sep.norm_bias, pw=sep.pointwise_weight.flatten(1), pwb=sep.bias)
    torch.testing.assert_close(sep(x), _pair(x, p, 1, 3, 1, None, "gelu", 1e-6))
    sep(x).sum().backward()
    assert all(t.grad is not None for t in sep.parameters())
    names = dict(sep.named_parameters())
    assert {"norm_weight", "norm_bias"} <= set(names)
    torch.testing.assert_close(sep(x[0]), sep(x[:1])[0])  # unbatched


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="batchnorm"), "norm must be None or 'layernorm'"),
    (dict(norm="layernorm", norm_eps=-1.0), "norm_eps"),
    (dict(norm="layernorm", norm_eps=float("nan")), "norm_eps"),
    (dict(norm="layernorm", norm_eps=True), "norm_eps"),
    (dict(norm="layernorm", pointwise_groups=2), "does not take"),
    (dict(norm="layernorm", channel_shuffle=2), "does not take"),
    (dict(norm="layernorm", se_channels=2), "squeeze-and-excitation"),
])
def test_module_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sepconv.SeparableConv2d(4, 8, 3, **kwargs)


def test_functional_refuses():
    x, dw, pw = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)
    with pytest.raises(ValueError, match="norm_weight / norm_bias given"):
        sepconv.separable_conv2d(x, dw, pw, norm_weight=torch.ones(4))
    with pytest.raises(ValueError, match="norm_weight"):
        sepconv.separable_conv2d(x, dw, pw, norm="layernorm", norm_weight=torch.ones(5))
    with pytest.raises(TypeError, match="norm_bias"):
        sepconv.separable_conv2d(x, dw, pw, norm="layernorm", norm_bias=torch.ones(4).double())
    with pytest.raises(ValueError, match="does not take"):
        sepconv.separable_conv2d(x, dw, pw, norm="layernorm", scale=torch.ones(1, 4))
    from sepconv._backend import _C
    if _C is not None:  # the extension's own guard: no wrong answer if the Python one is passed
        with pytest.raises(ValueError, match="norm_eps"):
            sepconv._native.forward(x, dw, pw, None, None, [1, 1], [1, 1, 1, 1], [1, 1], "none",
                                    "none", pw_groups=2, norm_eps=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, channels_last):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dw, pw = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64), \
        torch.randn(5, 6, 1, 1, generator=g, dtype=torch.float64)
    bd, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(5, generator=g,
                                                                         dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, dw, pw, bd, b)]
    conf = ([2, 1], [1, 0, 2, 1], [1, 2], "relu", "gelu")
    torch.library.opcheck(OP, (*leaves, *conf, backend, None, 1, 1, 1e-6))
    gy = torch.randn(OP(*leaves, *conf, backend).shape, generator=g, dtype=torch.float64)
    for mask in ([True] * 5, [False, False, True, False, True]):
        torch.library.opcheck(BWD, (gy, *(t.detach() for t in leaves), *conf, backend, mask,
                                    None, 1, 1, 1e-6))


def _block():
    return nn.Sequential(
        sepconv.SeparableConv2d(6, 24, 7, padding=3, depthwise_bias=True, norm="layernorm",
                                norm_eps=1e-6, activation="gelu"),
        nn.Conv2d(24, 6, 1))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    assert_compiled_matches_eager(_block(), [torch.randn(2, 6, 9, 9)])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export(dynamo, tmp_path):
    if not REQUIRE_ONNX:
        for name in ("onnx", "onnxruntime", "onnxscript"):
            pytest.importorskip(name)
    import onnx
    import onnxruntime

    torch.manual_seed(0)
    model, x = _block().eval(), torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        model[0].norm_weight.normal_()
        model[0].norm_bias.normal_()
    path = tmp_path / "block.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"])
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


def test_statistics_in_float32_for_bfloat16_storage():
    """The reference path (bfloat16 on CPU) and F.layer_norm agree: LayerNorm's statistics
    are float32 inside torch's kernel whatever the storage dtype."""
    case = CASES[0]
    check(dict(dtype=torch.bfloat16, device="cpu"), case, None, "gelu")


def test_every_activation_pair_natively(native_path):
    for act1, act2 in itertools.product(["relu", "gelu"], [None, "gelu_tanh", "hardswish"]):
        check(native_path, CASES[3], act1, act2)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_inference_reuses_the_fold_until_a_tensor_changes(backend):
    """The op path (here the reference) folds LayerNorm's affine into the pointwise
    weight and bias; under no_grad the folded pair is kept while the pointwise weight, its
    bias and LayerNorm's weight and bias are the same tensors at the same versions: an
    in-place update of any of them (an optimizer step) refolds. The native kernels take
    the affine themselves: nothing folded, nothing kept."""
    from sepconv import _norm
    if backend == "native" and not sepconv.backend_info()["cpu_native"]:
        pytest.skip("extension not built")
    torch.manual_seed(0)
    sep = sepconv.SeparableConv2d(6, 12, 3, padding=1, norm="layernorm").double().eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    def params(m):
        return dict(dw=m.depthwise_weight, dwb=torch.zeros(6, dtype=torch.float64),
                    lnw=m.norm_weight, lnb=m.norm_bias, pw=m.pointwise_weight.flatten(1),
                    pwb=m.bias)
    with torch.no_grad(), sepconv.use_backend(backend):
        first = sep(x)
        assert (id(sep.pointwise_weight) in _norm.FOLDED) == (backend == "reference")
        torch.testing.assert_close(sep(x), first, rtol=0, atol=0)
        for t in (sep.norm_weight, sep.norm_bias, sep.pointwise_weight, sep.bias):
            t.add_(0.25)
            torch.testing.assert_close(sep(x), _pair(x, params(sep), 1, 1, 1, None, None, 1e-5))
    key = id(sep.pointwise_weight)
    del sep
    import gc
    gc.collect()
    assert key not in _norm.FOLDED  # dropped with its weight


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], (1, 40, 7, 7, 1, 24, 7, 1, 3, 1),
                                  (1, 130, 5, 6, 4, 9, 3, 1, 1, 1)],
                         ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_both_backward_drivers(native_path, backward_mode, case, threads):
    """The native backward's two ways of sharing out its work: bands of pixels (a row's
    statistics in one thread) and the mid channels split over the threads (the sums of a
    row's channels cross the threads, through barriers), on 1-3 threads; C = 1 and 130
    channels leave some threads without any."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for acts, layout in ((("relu6", "gelu"), LAYOUTS["nchw"]),
                             ((None, "gelu_tanh"), LAYOUTS["channels_last"])):
            check(native_path, case, *acts, layout)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("which", ["weight", "bias", "neither"])
@pytest.mark.parametrize("wanted", ["all", "norm_only", "x_only"])
def test_affine_parts_and_partial_gradients(path, backward_mode, which, wanted):
    """LayerNorm without its weight, or its bias, or both (nn.LayerNorm(bias=False),
    elementwise_affine=False); gradients wanted of LayerNorm's affine alone (the native
    backward then runs dL/dU's GEMM for them, without a depthwise gradient) or of x alone.
    Both backward drivers (the fixture; the reference path ignores it)."""
    N, C, H, W, m, Co, k, stride, padding, dilation = (2, 8, 7, 7, 1, 12, 7, 1, 3, 1)
    dtype, device = path["dtype"], path["device"]
    p = {k_: v.to(dtype).to(device) for k_, v in _params(C, m, Co, k, seed=5).items()}
    if which in ("bias", "neither"):
        p["lnw"] = None
    if which in ("weight", "neither"):
        p["lnb"] = None
    x = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64).to(dtype).to(device)
    names = [n for n, t in p.items() if t is not None]
    grad_of = {"all": ["x", *names], "norm_only": [n for n in ("lnw", "lnb") if n in names],
               "x_only": ["x"]}[wanted] or ["x"]
    leaves = {"x": x, **p}
    for n in grad_of:
        leaves[n] = leaves[n].clone().requires_grad_()
    got = _fused(leaves["x"], leaves, stride, padding, dilation, None, "gelu", 1e-6)
    ref = {n: (None if t is None else t.double().detach().requires_grad_(n in grad_of))
           for n, t in leaves.items()}
    want = _pair(ref["x"], ref, stride, padding, dilation, None, "gelu", 1e-6)
    assert_close(got, want, dtype, "y")
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(got, [leaves[n] for n in grad_of], gy.to(dtype).to(device))
    wants = torch.autograd.grad(want, [ref[n] for n in grad_of], gy)
    for n, a, b in zip(grad_of, grads, wants):
        assert_close(a, b, dtype, n)


def test_create_graph_gives_first_order_gradients_then_a_clear_error():
    """With create_graph the native path records its backward (through the op, on the
    folded weights): the first-order gradients of every input, LayerNorm's affine
    included, match the pair's, and a gradient of a gradient raises clearly."""
    torch.manual_seed(0)
    p = {k_: v.requires_grad_() for k_, v in _params(6, 1, 10, 3, seed=8).items()}
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    leaves = [x, *p.values()]
    got = torch.autograd.grad(_fused(x, p, 1, 1, 1, None, "gelu", 1e-6).sum(), leaves,
                              create_graph=True)
    want = torch.autograd.grad(_pair(x, p, 1, 1, 1, None, "gelu", 1e-6).sum(), leaves)
    for name, a, b in zip(["x", *p], got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    assert got[0].requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        (got[0] * x).sum().backward()


def test_extension_refuses_an_affine_without_norm():
    from sepconv import _native
    if _native._C is None:
        pytest.skip("extension not built")
    x, dw, pw = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)
    w = torch.ones(4)
    with pytest.raises(ValueError, match="without norm_eps"):
        _native.forward(x, dw, pw, None, None, [1, 1], [1, 1, 1, 1], [1, 1], "none", "none",
                        norm_weight=w)
    gy = torch.randn(1, 6, 5, 5)
    with pytest.raises(ValueError, match="without norm_eps"):
        _native.backward(gy, x, dw, pw, None, None, [1, 1], [1, 1, 1, 1], [1, 1], "none",
                         "none", [True] * 5, norm_weight=w, want_norm=(True, False))
