"""depthwise_mean: squeeze-and-excitation's squeeze of the intermediate, on every path,
against the float64 nn.Conv2d oracle; its op (opcheck, compile, fake) and its errors."""

import os

import pytest
import torch
from conftest import (
    ACTS,
    ISAS,
    assert_close,
    assert_compiled_matches_eager,
    check_against_oracle,
    make_inputs,
    tf_same_pad,
)
from test_functional import CASES, INTERPRETER_FLOAT32_ONLY, LAYOUTS, SPLIT_CASES

import sepconv
from sepconv import _backend

OP = torch.ops.sepconv.depthwise_mean


def _oracle(x, dw, b_dw, stride, padding, dilation, act):
    """The mean of the depthwise conv's output (F.conv2d, nn.Conv2d's padding) after the
    activation, in float64."""
    if padding == "same" and stride not in (1, (1, 1)):  # F.conv2d refuses: pad first
        x, padding = tf_same_pad(x, dw.shape[2:], stride, dilation), 0
    u = torch.nn.functional.conv2d(x, dw, b_dw, stride, padding, dilation, groups=x.shape[1])
    return ACTS[act]()(u).mean((2, 3))


def check_mean(target, x, dw, b_dw, stride, padding, dilation, act, layout=lambda t: t):
    dtype = target["dtype"]
    low = dtype in (torch.float16, torch.bfloat16)
    x, dw, b_dw = (t if t is None or not low else t.to(dtype).double() for t in (x, dw, b_dw))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, dw, b_dw)]
    want = _oracle(*leaves, stride, padding, dilation, act)
    mine = [t.detach().to(**target).requires_grad_() if t is not None else None
            for t in (x, dw, b_dw)]
    got = sepconv.depthwise_mean(layout(mine[0]), mine[1], stride, padding, dilation,
                                 depthwise_bias=mine[2], mid_activation=act)
    assert got.dtype == dtype and got.shape == want.shape
    assert_close(got, want, dtype, "mean")
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    inputs = [t for t in mine if t is not None]
    got_grads = torch.autograd.grad(got, inputs, g.to(**target))
    want_grads = torch.autograd.grad(want, [t for t in leaves if t is not None], g)
    for name, a, e in zip(["x", "dw", "b_dw"], got_grads, want_grads):
        assert_close(a, e, dtype, f"grad {name}")


# The interpreter's share of the cases: its gather is the forward's (tested on every case
# there), so these cover what is the mean kernel's own: tiles of one image, strides,
# paddings, multipliers, C = 1, batch 0, rows past the last tile.
INTERPRETER_MEAN_CASES = {"base", "k2_same", "stride2", "same_stride2_odd", "dilation2_stride2",
                          "multiplier3_stride2", "C1", "batch0", "wide_m2", "k7_image7", "tall"}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided_nchw"])
def test_mean_shapes(path, name, layout):
    interpreted = path["device"] == "cpu" and _backend.current_backend() == "triton"
    if interpreted and (layout == "strided_nchw" or name not in INTERPRETER_MEAN_CASES):
        pytest.skip("the interpreter runs a share of the cases, contiguous (its gather is "
                    "the forward's, tested with every case and strides there)")
    N, C, H, W, m, Co, k, s, p, d = CASES[name]
    x, dw, _, _, b_dw = make_inputs(N, C, H, W, m, Co, k)
    act = ("silu", "relu6")[list(CASES).index(name) % 2]  # each on every other case
    check_mean(path, x, dw, b_dw, s, p, d, act, LAYOUTS[layout])


@pytest.mark.parametrize("act", list(ACTS))
def test_mean_activations_and_no_bias(path, act):
    x, dw, _, _, _ = make_inputs(2, 5, 11, 9, 2, 3, 3, seed=1)
    check_mean(path, x, dw, None, 2, 1, 1, act)


def test_mean_unbatched_and_batch_zero():
    x, dw, _, _, b = make_inputs(1, 4, 8, 7, 1, 3, 3)
    y = sepconv.depthwise_mean(x[0], dw, padding=1, depthwise_bias=b, mid_activation="relu")
    torch.testing.assert_close(y, _oracle(x, dw, b, 1, 1, 1, "relu")[0])
    assert sepconv.depthwise_mean(x[:0], dw, padding=1).shape == (0, 4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 3])
def test_mean_native_sums_images_apart(isa, threads):
    """Tiles of several images shared out over threads: each image's sums stay its own."""
    from sepconv._backend import _C
    before, previous = torch.get_num_threads(), _C.isa()
    torch.set_num_threads(threads)
    _C.set_isa(isa)
    try:
        x, dw, _, _, b = make_inputs(5, 24, 30, 29, 1, 3, 5)
        with sepconv.use_backend("native"):
            y = sepconv.depthwise_mean(x, dw, 1, 2, depthwise_bias=b, mid_activation="silu")
        torch.testing.assert_close(y, _oracle(x, dw, b, 1, 2, 1, "silu"))
    finally:
        torch.set_num_threads(before)
        _C.set_isa(previous)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mean_opcheck(backend, channels_last):
    x, dw, _, _, b = make_inputs(2, 3, 7, 6, 2, 5, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x.requires_grad_(), dw.requires_grad_(), b.requires_grad_(), [2, 1], [1, 0, 2, 1],
            [1, 2], "silu", backend)
    torch.library.opcheck(OP, args)


def _compiled_matches_eager(fn, tensors):
    """torch.compile(fn, fullgraph=True) gives fn's output and gradients (float32)."""
    leaves = [t.detach().float().requires_grad_() for t in tensors]
    y, y_eager = torch.compile(fn, fullgraph=True)(*leaves), fn(*leaves)
    torch.testing.assert_close(y, y_eager)
    for a, e in zip(torch.autograd.grad(y.sum(), leaves),
                    torch.autograd.grad(y_eager.sum(), leaves)):
        torch.testing.assert_close(a, e)


def test_mean_compile_fullgraph_matches_eager():
    x, dw, _, _, b = make_inputs(3, 4, 12, 10, 1, 3, 3)

    def squeeze(x, dw, b):
        return sepconv.depthwise_mean(x, dw, 2, 1, depthwise_bias=b, mid_activation="hardswish")
    _compiled_matches_eager(squeeze, (x, dw, b))


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: sepconv.depthwise_mean(x[0, 0], w), ValueError, "4 dims"),
    (lambda x, w: sepconv.depthwise_mean(x, w[:5]), ValueError, "multiple of the 4 input"),
    (lambda x, w: sepconv.depthwise_mean(x, w.float()), TypeError, "dtype"),
    (lambda x, w: sepconv.depthwise_mean(x, w, depthwise_bias=torch.zeros(3).double()),
     ValueError, "depthwise_bias of shape"),
    (lambda x, w: sepconv.depthwise_mean(x, w, stride=0), ValueError, "stride"),
    (lambda x, w: sepconv.depthwise_mean(x, w, mid_activation="mish"), ValueError, "mish"),
    (lambda x, w: sepconv.depthwise_mean(x[..., :1, :1], w), ValueError, "larger than"),
])
def test_mean_bad_input_raises(call, error, match):
    x, w, _, _, _ = make_inputs(1, 4, 5, 5, 2, 3, 3)
    with pytest.raises(error, match=match):
        call(x, w)


class _Squeeze(torch.nn.Module):
    def __init__(self):
        super().__init__()
        x, dw, _, _, b = make_inputs(1, 3, 1, 1, 2, 1, 3)
        self.dw, self.b = torch.nn.Parameter(dw.float()), torch.nn.Parameter(b.float())

    def forward(self, x):
        return sepconv.depthwise_mean(x, self.dw, 2, 1, depthwise_bias=self.b,
                                      mid_activation="hardswish")


def _se_layer():
    """The mean, the excitation and the scaled separable conv, in one module."""
    torch.manual_seed(0)
    return sepconv.SeparableConv2d(3, 5, 3, 2, 1, depth_multiplier=2, mid_activation="silu",
                                   activation="relu", se_channels=2,
                                   se_gate="hardsigmoid").eval()


@pytest.mark.parametrize("build,convs", [(_Squeeze, {1}), (_se_layer, {2, 3})],
                         ids=["mean", "se"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_mean_onnx_export_is_standard_operators(build, convs, dynamo, tmp_path):
    if os.environ.get("SEPCONV_REQUIRE_ONNX") != "1":
        for name in ("onnx", "onnxruntime", "onnxscript"):
            pytest.importorskip(name)
    import onnx
    import onnxruntime

    model, x = build().eval(), torch.randn(2, 3, 13, 11)
    path = tmp_path / "squeeze.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"],
                      dynamic_axes=None if dynamo else {"x": {0: "batch"}},
                      dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamo else None)
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    # se: the depthwise conv for the mean and for the layer (an exporter may merge the
    # two), the pointwise conv; the excitation's F.linear are Gemm / MatMul nodes
    assert [n.op_type for n in graph.node].count("Conv") in convs
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 3):
        x = torch.randn(n, 3, 13, 11)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


# --- the excitation: separable_conv2d(..., scale=) ----------------------------------------

SCALED_CASES = ["base", "stride2", "multiplier3_stride2", "C1", "batch0", "wide_m2", "k7_rows",
                "same_stride2_odd", "many_bands"]


def _scaled_inputs(name, seed=0):
    N, C, H, W, m, Co, k, s, p, d = CASES[name]
    g = torch.Generator().manual_seed(seed + 11)
    scale = torch.rand(N, C * m, generator=g, dtype=torch.float64) * 1.5 + 0.1
    return (*make_inputs(N, C, H, W, m, Co, k, seed=seed), scale), (s, p, d)


@pytest.mark.parametrize("name", SCALED_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_scaled_shapes(path, name, layout):
    """Forward and every gradient, the scale's included, against the float64 oracle."""
    if (name in INTERPRETER_FLOAT32_ONLY and path["device"] == "cpu"
            and _backend.current_backend() == "triton"):
        pytest.skip("the largest cases: native only (the interpreter takes 4 s each; its "
                    "kernels are the forward's and backward's, tested on them)")
    inputs, (s, p, d) = _scaled_inputs(name)
    # In 16 bits the backward's z (recomputed with the rounded W * scale[n]) and the
    # forward's (W times the rounded mid * scale) differ by a rounding: at relu6's kinks
    # a z that close may fall on the other side. A smooth act2 there; relu6 in 32 / 64.
    act2 = "relu6" if path["dtype"] in (torch.float32, torch.float64) else "silu"
    check_against_oracle(path, inputs, s, p, d, "silu", act2, layout=LAYOUTS[layout])


def test_scaled_triton_split_forward(monkeypatch):
    """The Triton forward that runs the depthwise into a buffer first (splits_depthwise)
    applies the scale there."""
    if sepconv._triton.unsupported(torch.empty(1)) is not None:
        pytest.skip("needs Triton on a GPU or its interpreter")
    from sepconv.triton_kernels import forward
    monkeypatch.setattr(forward, "SPLIT", "always")
    inputs, (s, p, d) = _scaled_inputs("wide_m2", seed=2)
    with sepconv.use_backend("triton"):
        check_against_oracle(dict(dtype=torch.float32, device="cpu"), inputs, s, p, d,
                             "hardswish", None, grads=False)


def test_scaled_zero_scale_and_unbatched():
    """A gate of exactly 0 (hard-sigmoid) and unbatched input."""
    (x, dw, pw, b, bd, scale), _ = _scaled_inputs("base")
    scale[:, 1] = 0.0
    check_against_oracle(dict(dtype=torch.float64, device="cpu"), (x, dw, pw, b, bd, scale),
                         1, 1, 1, "relu", None)
    y = sepconv.separable_conv2d(x[0], dw, pw, b, 1, 1, depthwise_bias=bd, scale=scale[0])
    want = sepconv.separable_conv2d(x[:1], dw, pw, b, 1, 1, depthwise_bias=bd, scale=scale[:1])
    torch.testing.assert_close(y, want[0])


def test_scaled_opcheck_and_compile():
    (x, dw, pw, b, bd, scale), _ = _scaled_inputs("stride2")
    leaves = [t.requires_grad_() for t in (x, dw, pw, bd, b)]
    scale.requires_grad_()
    args = (*leaves, [2, 2], [1, 1, 1, 1], [1, 1], "relu", "silu")
    for backend in ("auto", "reference"):
        torch.library.opcheck(torch.ops.sepconv.separable_conv2d, (*args, backend, scale))

    def layer(x, dw, pw, b, bd, scale):
        return sepconv.separable_conv2d(x, dw, pw, b, 2, 1, depthwise_bias=bd,
                                        mid_activation="relu", activation="silu", scale=scale)
    _compiled_matches_eager(layer, (x, dw, pw, b, bd, scale))


# The native backward takes the scale itself (one call for the batch): under both ways of
# sharing out its work (bands, and the mid channels split over the threads), 1 and 3 threads,
# M made where the weight gradient's stacks are packed or not (Cm 515), relu's kink, a
# gate of exactly 0 (hard-sigmoid), act1 none (Co520). Split cases from test_functional.
@pytest.mark.parametrize("case", ["7x7_k7", "two_images_two_bands", "m2_stride2", "Co520", "Cm515"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_scaled_native_backward_modes(native_path, backward_mode, case, threads, layout):
    N, C, H, W, m, Co, k, s, act1, act2 = SPLIT_CASES[case]
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(N, C * m, generator=g, dtype=torch.float64) * 1.5
    scale[:, ::5] = 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_oracle(native_path, (*make_inputs(N, C, H, W, m, Co, k), scale), s,
                             k // 2, 1, act1, act2, layout=LAYOUTS[layout])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mask", [(True, False, False, False, False, False),
                                  (False, True, True, True, True, False),
                                  (False, False, False, False, False, True)])
def test_scaled_native_partial_gradients(native_path, backward_mode, mask):
    """Each gradient alone, the scale's included, is the one computed with all the others
    (same bits)."""
    from sepconv import _native
    x, dw, pw, b, bd = (t.to(native_path["dtype"]) for t in make_inputs(2, 70, 7, 7, 1, 40, 7))
    scale = torch.rand(2, 70, dtype=x.dtype)
    conf = ((1, 1), (3, 3, 3, 3), (1, 1), "silu", "relu")
    gy = torch.randn(2, 40, 7, 7, dtype=x.dtype)
    full = _native.backward(gy, x, dw, pw, bd, b, *conf, (True,) * 5, scale=scale,
                            want_scale=True)
    part = _native.backward(gy, x, dw, pw, bd, b, *conf, mask[:5], scale=scale,
                            want_scale=mask[5])
    for want, a, e in zip(mask, part, full):
        assert (a is not None) == want
        if want:
            assert torch.equal(a, e)


@pytest.mark.parametrize("case", ["7x7_k7", "two_images_two_bands", "m2_stride2"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_mean_native_backward_modes(native_path, backward_mode, case, layout):
    """depthwise_mean's gradients by the native backward kernel (one output channel, the
    mean's gradient as its scale) under both ways of sharing out its work, against the
    float64 oracle."""
    N, C, H, W, m, _, k, s, act1, _ = SPLIT_CASES[case]
    x, dw, _, _, b = make_inputs(N, C, H, W, m, 1, k)
    with sepconv.use_backend("native"):
        check_mean(native_path, x, dw, b, s, k // 2, 1, act1, layout=LAYOUTS[layout])


def test_mean_backward_takes_the_native_kernel(monkeypatch):
    """The native path's gradients come from the kernel, not the reference formula (which
    stays for create_graph and traced calls, and matches it)."""
    from sepconv import _native, reference
    x, dw, _, _, b = make_inputs(2, 8, 9, 9, 1, 1, 3)
    leaves = [t.clone().requires_grad_() for t in (x, dw, b)]
    y = sepconv.depthwise_mean(leaves[0], leaves[1], 1, 1, depthwise_bias=leaves[2],
                               mid_activation="silu")
    gm = torch.randn(y.shape, dtype=y.dtype)
    monkeypatch.setattr(reference, "mean_backward", None)  # raises if called
    got = torch.autograd.grad(y, leaves, gm, retain_graph=True)
    monkeypatch.undo()
    monkeypatch.setattr(_native, "mean_backward", None)
    twice = torch.autograd.grad(y, leaves, gm, create_graph=True)  # the reference formula
    for a, e in zip(got, twice):
        torch.testing.assert_close(a, e)


# SeparableConv2d's squeeze-and-excitation on the native path: the mean's pass also
# stores the intermediate (mean(keep=True)) and the conv's pass starts from it.
# NCHW batches of one or two small images with more mid channels than a block (64
# floats, 32 doubles): the native mean goes by (image, channel block), the last block
# part of a vector (float) or whole vectors and a part (double)
MEAN_BLOCK_CASES = {
    "blocks_k5": (1, 70, 14, 14, 1, 8, 5, 1, 2, 1),
    "blocks_k3_stride2": (2, 81, 13, 14, 1, 8, 3, 2, 1, 1),
}
KEEP_CASES = ["base", "k5", "stride2", "same_stride2_odd", "multiplier3_stride2", "C1",
              "batch0", "k7_image7", "many_bands", *MEAN_BLOCK_CASES]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", KEEP_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_mean_keeps_the_intermediate(isa, name, layout, dtype):
    """u is act_mid(dw(x) + b), channels-last; the means are those without keep (same
    bits), and the conv from u is the conv from x (same bits: the same tiles' GEMM), in
    x's layout."""
    from sepconv import _native
    from sepconv._backend import _C
    from sepconv.functional import resolve_padding
    N, C, H, W, m, Co, k, s, p, d = {**CASES, **MEAN_BLOCK_CASES}[name]
    x, dw, pw, b, bd = (t.to(dtype) for t in make_inputs(N, C, H, W, m, Co, k))
    x = LAYOUTS[layout](x)
    kk = dw.shape[2:]
    stride, dilation = [s, s], [d, d]
    pads = resolve_padding(p, kk, stride, dilation, (H, W))
    scale = torch.rand(N, C * m, dtype=dtype) + 0.5
    previous = _C.isa()
    _C.set_isa(isa)
    try:
        mean, u = _native.mean(x, dw, bd, stride, pads, dilation, "hardswish", keep=True)
        assert torch.equal(mean, _native.mean(x, dw, bd, stride, pads, dilation, "hardswish"))
        xp = torch.nn.functional.pad(x, (pads[2], pads[3], pads[0], pads[1]))
        want = torch.nn.functional.hardswish(torch.nn.functional.conv2d(
            xp.double(), dw.double(), bd.double(), stride, 0, dilation, groups=C))
        assert u.is_contiguous(memory_format=torch.channels_last)
        assert_close(u, want, dtype, "u")
        assert_close(mean, want.mean((2, 3)), dtype, "mean")
        from_x = _native.forward(x, dw, pw, bd, b, stride, pads, dilation, "hardswish", "relu",
                                 scale=scale)
        from_u = _native.forward_from_mid(u, pw, b, "relu", scale, _native.memory_format(x))
        assert from_u.is_contiguous(memory_format=_native.memory_format(x))  # made so
        assert torch.equal(from_u, from_x)
    finally:
        _C.set_isa(previous)


def test_native_excitation_keeps_nothing_more_for_the_backward():
    """The intermediate made by the mean's pass is a temporary: training saves x and the
    weights, as without it, and the gradients are those of the two passes from x."""
    torch.manual_seed(0)
    m = sepconv.SeparableConv2d(16, 8, 3, padding=1, mid_activation="silu", se_channels=4,
                                stride=2)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        y = m(x)
    assert (2, 16, 6, 6) not in saved  # the intermediate's shape
    ex = m.excitation
    scale = ex(sepconv.depthwise_mean(x, m.depthwise_weight, 2, 1,
                                      depthwise_bias=m.depthwise_bias, mid_activation="silu"))
    want = sepconv.separable_conv2d(x, m.depthwise_weight, m.pointwise_weight, m.bias, 2, 1,
                                    depthwise_bias=m.depthwise_bias, mid_activation="silu",
                                    scale=scale)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    for a, e in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("scale,error,match", [
    (torch.ones(2, 4), ValueError, r"scale of shape \(2, 3\)"),
    (torch.ones(2, 3, dtype=torch.float64), TypeError, "scale has dtype"),
    (torch.ones(2, 3, dtype=torch.int64), TypeError, "floating-point"),
    ([[1.0] * 3] * 2, TypeError, "scale must be a Tensor"),
])
def test_scaled_bad_input_raises(scale, error, match):
    x, dw, pw = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)
    with pytest.raises(error, match=match):
        sepconv.separable_conv2d(x, dw, pw, scale=scale)


# --- SeparableConv2d with squeeze-and-excitation, and fuse() of SE blocks -----------------

def _se_composite(m, x):
    """What an SE SeparableConv2d computes, written out with torch ops."""
    pads = m._pads or [0, 0, 0, 0]
    u = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (pads[2], pads[3], pads[0],
                                                                pads[1])),
                                   m.depthwise_weight, m.depthwise_bias, m.stride, 0,
                                   m.dilation, groups=m.in_channels)
    u = ACTS[m.mid_activation]()(u)
    s = m.excitation.gate(m.excitation.fc2(m.excitation.activation(
        m.excitation.fc1(u.mean((2, 3), keepdim=True)))))
    return ACTS[m.activation]()(torch.nn.functional.conv2d(u * s, m.pointwise_weight, m.bias))


@pytest.mark.parametrize("kw", [dict(se_channels=2), dict(se_channels=3, se_activation="silu",
                                                          se_gate="hardsigmoid",
                                                          depthwise_bias=True, stride=2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_with_excitation_matches_composite(kw, channels_last):
    torch.manual_seed(0)
    m = sepconv.SeparableConv2d(6, 5, 3, padding=1, mid_activation="relu6", activation="silu",
                                dtype=torch.float64, **kw)
    x = torch.randn(3, 6, 10, 9, dtype=torch.float64, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y, want = m(xin), _se_composite(m, x)
    torch.testing.assert_close(y, want)
    params = [x, *m.parameters()]
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(m(x[0]), want[0])  # unbatched
    assert "(excitation): Excitation" in repr(m)


@pytest.mark.parametrize("wanted", ["x", "depthwise", "pointwise", "excitation", "all"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_excitation_one_node_gradients(wanted, channels_last):
    """Training on the native path runs the block as one autograd node (one depthwise
    backward for the conv's and the mean's gradients): every subset of gradients against
    the float64 composite, and double backward refused clearly."""
    from sepconv import _ops
    torch.manual_seed(1)
    m = sepconv.SeparableConv2d(12, 7, 5, padding=2, stride=2, mid_activation="silu",
                                depthwise_bias=True, se_channels=3, se_activation="silu",
                                se_gate="hardsigmoid", dtype=torch.float64)
    x = torch.randn(3, 12, 11, 10, dtype=torch.float64)
    groups = {"x": [x], "depthwise": [m.depthwise_weight, m.depthwise_bias],
              "pointwise": [m.pointwise_weight, m.bias],
              "excitation": list(m.excitation.parameters())}
    leaves = [t for k, ts in groups.items() for t in ts if wanted in (k, "all")]
    for t in [x, *m.parameters()]:
        t.requires_grad_(any(t is u for u in leaves))
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    calls = []
    apply = _ops._NativeExcited.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_ops._NativeExcited, "apply", lambda *a: calls.append(1) or apply(*a))
        y = m(xin)
    assert calls == [1]
    want = _se_composite(m, x)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(y, leaves, g, retain_graph=True),
                    torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, e)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, leaves, g, create_graph=True)


def test_module_with_excitation_on_meta_and_bad_arguments():
    m = sepconv.SeparableConv2d(4, 6, 3, padding=1, se_channels=2, device="meta")
    assert m(torch.empty(2, 4, 7, 7, device="meta")).shape == (2, 6, 7, 7)
    for kw, match in ((dict(se_channels=0), "se_channels"), (dict(se_channels=2, se_gate="tanh"),
                                                             "se_gate")):
        with pytest.raises(ValueError, match=match):
            sepconv.SeparableConv2d(4, 6, 3, **kw)


def test_fuse_leaves_what_only_looks_like_an_se_block():
    """A module with an SE block's parts that computes something else is not taken."""
    class NotSE(sepconv.models.SqueezeExcitation):
        def forward(self, x):
            return x + self.scale_activation(self.fc2(self.activation(self.fc1(x.mean(
                (2, 3), keepdim=True)))))
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, groups=4), torch.nn.ReLU(),
                                NotSE(8, 2), torch.nn.Conv2d(8, 6, 1)).eval()
    fused, report = sepconv.fuse(model)
    assert not report.fused and [name for name, _ in report.skipped] == ["0"]
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


def test_fuse_with_excitation_trains_as_the_original():
    """fold_bn=False on a chain with SE and no norm: fused, the same gradients for every
    parameter, the SE's included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, 2, 1, groups=4), torch.nn.SiLU(),
                                sepconv.models.SqueezeExcitation(8, 2, gate=torch.nn.Hardsigmoid),
                                torch.nn.Conv2d(8, 6, 1), torch.nn.ReLU()).train()
    fused, report = sepconv.fuse(model, fold_bn=False)
    assert len(report.fused) == 1 and fused[0].excitation is not None
    x = torch.randn(3, 4, 12, 11)
    ys = [m(x) for m in (fused, model)]
    torch.testing.assert_close(ys[0], ys[1])
    got = torch.autograd.grad(ys[0].square().sum(), list(fused.parameters()))
    want = torch.autograd.grad(ys[1].square().sum(), list(model.parameters()))
    mine = dict(zip([n for n, _ in fused.named_parameters()], got))
    theirs = dict(zip([n for n, _ in model.named_parameters()], want))
    pairs = {"0.depthwise_weight": "0.weight", "0.depthwise_bias": "0.bias",
             "0.pointwise_weight": "3.weight", "0.bias": "3.bias",
             "0.excitation.fc1.weight": "2.fc1.weight", "0.excitation.fc2.bias": "2.fc2.bias"}
    for a, b in pairs.items():
        torch.testing.assert_close(mine[a], theirs[b], rtol=1e-4, atol=1e-5)


def test_module_with_excitation_compiles_fullgraph():
    model = torch.nn.Sequential(_se_layer(), sepconv.SeparableConv2d(5, 4, 3, padding=1,
                                                                     se_channels=3)).train()
    assert_compiled_matches_eager(model, [torch.randn(2, 3, 13, 11)])
