"""SeparableConv2d as a drop-in for nn.Conv2d: shapes, padding modes, init, repr, state."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ACTS, TOL, oracle, tf_same_pad
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn

import sepconv

# nn.Conv2d argument combinations; SeparableConv2d must give the same output shape.
CONV_ARGS = [
    dict(kernel_size=3),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), padding=(1, 2)),
    dict(kernel_size=2, padding="same"),
    dict(kernel_size=(2, 4), padding="same", dilation=2),
    dict(kernel_size=5, padding="valid"),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=(2, 3), padding=(0, 1), dilation=(1, 2)),
    dict(kernel_size=4, stride=3, padding=2, dilation=2),
    dict(kernel_size=1),
]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("kwargs", CONV_ARGS, ids=str)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_output_shape_matches_conv2d(kwargs, padding_mode, unbatched, device):
    """On the meta device too (timm, accelerate and FSDP build models there): shapes
    only, as nn.Conv2d gives them."""
    x = torch.randn(2, 4, 11, 13, device=device)
    if unbatched:
        x = x[0]
    conv = nn.Conv2d(4, 6, padding_mode=padding_mode, device=device, **kwargs)
    sep = sepconv.SeparableConv2d(4, 6, padding_mode=padding_mode, device=device, **kwargs)
    y = sep(x)
    assert y.shape == conv(x).shape and y.device == x.device


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_matches_conv2d_pair(padding_mode, channels_last):
    torch.manual_seed(0)
    sep = sepconv.SeparableConv2d(3, 5, (2, 4), padding="same", dilation=(1, 2), bias=True,
                                  padding_mode=padding_mode, depth_multiplier=2,
                                  mid_activation="relu6", activation="silu",
                                  depthwise_bias=True, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    # the reference pair: nn.Conv2d(padding_mode=...) then a 1x1 conv
    dconv = nn.Conv2d(3, 6, (2, 4), padding="same", dilation=(1, 2), groups=3,
                      padding_mode=padding_mode, dtype=torch.float64)
    with torch.no_grad():
        dconv.weight.copy_(sep.depthwise_weight)
        dconv.bias.copy_(sep.depthwise_bias)
    expected = nn.functional.silu(nn.functional.conv2d(
        nn.functional.relu6(dconv(x)), sep.pointwise_weight, sep.bias))
    y = sep(xin)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(expected)
    got = torch.autograd.grad(y, [x, sep.depthwise_weight, sep.pointwise_weight], g)
    want = torch.autograd.grad(expected, [x, dconv.weight], g, retain_graph=True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def _pair_of_convs(sep: sepconv.SeparableConv2d) -> nn.Sequential:
    """The float64 nn.Conv2d pair (padding mode on the depthwise conv) with sep's weights."""
    pad = nn.Identity()
    padding = sep.padding
    if padding == "same" and sep.stride != (1, 1):  # nn.Conv2d refuses it: pad first
        mode = "constant" if sep.padding_mode == "zeros" else sep.padding_mode
        pad, padding = _TFPad(sep.kernel_size, sep.stride, sep.dilation, mode), 0
    k = dict(kernel_size=sep.kernel_size, stride=sep.stride, padding=padding,
             dilation=sep.dilation, padding_mode=sep.padding_mode, dtype=torch.float64)
    mid = sep.depthwise_weight.shape[0]
    dconv = nn.Conv2d(sep.in_channels, mid, groups=sep.in_channels,
                      bias=sep.depthwise_bias is not None, **k)
    pconv = nn.Conv2d(mid, sep.out_channels, 1, bias=sep.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        for conv, w, b in ((dconv, sep.depthwise_weight, sep.depthwise_bias),
                           (pconv, sep.pointwise_weight, sep.bias)):
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
    return nn.Sequential(pad, dconv, ACTS[sep.mid_activation](), pconv, ACTS[sep.activation]())


class _TFPad(nn.Module):
    def __init__(self, *args):
        super().__init__()
        self.args = args

    def forward(self, x):
        return tf_same_pad(x, *self.args)


# Every padding mode over the random-configuration ranges of test_functional, on whatever
# backend "auto" picks on the CPU (native in float32 and float64).
@given(N=st.integers(0, 3), C=st.integers(1, 16), m=st.integers(1, 3), Co=st.integers(1, 16),
       kh=st.integers(1, 7), kw=st.integers(1, 7), stride=st.integers(1, 3),
       dilation=st.integers(1, 3), H=st.integers(1, 20), W=st.integers(1, 20),
       padding=st.one_of(st.integers(0, 4), st.just("same"), st.just("valid")),
       padding_mode=st.sampled_from(PADDING_MODES), act1=st.sampled_from(list(ACTS)),
       act2=st.sampled_from(list(ACTS)), bias=st.booleans(), dw_bias=st.booleans(),
       channels_last=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_random_modules_match_conv2d_pair(N, C, m, Co, kh, kw, stride, dilation, H, W, padding,
                                          padding_mode, act1, act2, bias, dw_bias,
                                          channels_last, dtype):
    sep = sepconv.SeparableConv2d(C, Co, (kh, kw), stride, padding, dilation, bias=bias,
                                  padding_mode=padding_mode, depth_multiplier=m,
                                  mid_activation=act1, activation=act2, depthwise_bias=dw_bias,
                                  dtype=torch.float64)
    pair = _pair_of_convs(sep)
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    try:  # padding past the input (reflect), a kernel past the padded input: both refuse
        expected = pair(x.requires_grad_())
    except RuntimeError:
        event("both refuse")
        with pytest.raises((RuntimeError, ValueError)):
            sep(x.detach())
        return
    sep = sep.to(dtype)
    xin = x.detach().to(dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y = sep(xin.requires_grad_())
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])
    gy = torch.randn_like(expected)
    _, dconv, _, pconv, _ = pair
    names = ["x", "depthwise_weight", "depthwise_bias", "pointwise_weight", "bias"]
    ours = [xin, sep.depthwise_weight, sep.depthwise_bias, sep.pointwise_weight, sep.bias]
    theirs = [x, dconv.weight, dconv.bias, pconv.weight, pconv.bias]
    keep = [i for i, t in enumerate(ours) if t is not None]
    got = torch.autograd.grad(y, [ours[i] for i in keep], gy.to(dtype))
    want = torch.autograd.grad(expected, [theirs[i] for i in keep], gy)
    for i, a, e in zip(keep, got, want):
        torch.testing.assert_close(a.double(), e, **TOL[dtype], msg=lambda m: f"{names[i]}: {m}")


def test_parameters_and_init_follow_conv2d():
    torch.manual_seed(0)
    sep = sepconv.SeparableConv2d(64, 128, 3, depth_multiplier=2, depthwise_bias=True)
    assert sep.depthwise_weight.shape == (128, 1, 3, 3)
    assert sep.pointwise_weight.shape == (128, 128, 1, 1)
    assert sep.bias.shape == (128,) and sep.depthwise_bias.shape == (128,)
    # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Conv2d
    for w, fan_in in ((sep.depthwise_weight, 9), (sep.pointwise_weight, 128)):
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert sep.bias.abs().max() <= 1 / math.sqrt(128)
    assert sep.depthwise_bias.abs().max() <= 1 / 3
    assert sepconv.SeparableConv2d(4, 4, 3, bias=False).bias is None
    assert sepconv.SeparableConv2d(4, 4, 3).depthwise_bias is None


def test_device_and_dtype_arguments():
    sep = sepconv.SeparableConv2d(4, 6, 3, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in sep.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_meta_training_step_then_materialise(channels_last):
    """A model built and traced on meta: the backward gives every gradient's shape;
    to_empty + reset_parameters then make it a working module on the CPU."""
    kw = dict(kernel_size=3, stride=2, padding=1, depth_multiplier=2, depthwise_bias=True,
              mid_activation="relu", activation="silu")
    sep = sepconv.SeparableConv2d(4, 6, device="meta", **kw)
    x = torch.randn(3, 4, 9, 8, device="meta", requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y = sep(x)
    assert y.shape == (3, 6, 5, 4) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in sep.parameters():
        assert p.grad.shape == p.shape and p.grad.is_meta
    sep.to_empty(device="cpu")
    sep.reset_parameters()
    ref = sepconv.SeparableConv2d(4, 6, **kw)
    ref.load_state_dict(sep.state_dict())
    xc = torch.randn(3, 4, 9, 8)
    torch.testing.assert_close(sep(xc), ref(xc))
    assert sep(xc).abs().sum() > 0


def test_repr_like_conv2d():
    sep = sepconv.SeparableConv2d(4, 6, 3, stride=2, padding=1, bias=False,
                                  mid_activation="relu", activation="relu6")
    assert repr(sep) == ("SeparableConv2d(4, 6, kernel_size=(3, 3), stride=(2, 2), "
                         "padding=(1, 1), bias=False, mid_activation='relu', "
                         "activation='relu6')")
    assert "padding='same'" in repr(sepconv.SeparableConv2d(4, 6, 3, padding="same"))
    assert "padding_mode=reflect" in repr(sepconv.SeparableConv2d(4, 6, 3, padding_mode="reflect"))


def test_state_dict_round_trip():
    a = sepconv.SeparableConv2d(4, 6, 3, depthwise_bias=True, activation="relu")
    b = sepconv.SeparableConv2d(4, 6, 3, depthwise_bias=True, activation="relu")
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert set(a.state_dict()) == {"depthwise_weight", "pointwise_weight", "bias",
                                   "depthwise_bias"}
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_matches_oracle_in_training_loop():
    """A few SGD steps give the same parameters as the float64 pair (forward + backward)."""
    torch.manual_seed(0)
    sep = sepconv.SeparableConv2d(3, 4, 3, padding=1, mid_activation="relu",
                                  depthwise_bias=True, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in
              (sep.depthwise_weight, sep.pointwise_weight, sep.bias, sep.depthwise_bias)]
    opt_a = torch.optim.SGD(sep.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        opt_a.zero_grad()
        sep(x).square().mean().backward()
        opt_a.step()
        opt_b.zero_grad()
        oracle(x, params[0], params[1], params[2], params[3], 1, 1, 1, "relu", None) \
            .square().mean().backward()
        opt_b.step()
    for p, q in zip((sep.depthwise_weight, sep.pointwise_weight, sep.bias, sep.depthwise_bias),
                    params):
        torch.testing.assert_close(p, q)


def test_groups_other_than_one_is_rejected():
    with pytest.raises(ValueError, match="pointwise_groups groups the 1x1 conv"):
        sepconv.SeparableConv2d(4, 4, 3, 1, 0, 1, 2)


def test_pointwise_groups():
    """nn.Conv2d's grouped 1x1 conv in the module: the weight's shape, the repr, the
    float64 pair's output and gradients in training, and from_conv2d_pair."""
    torch.manual_seed(0)
    sep = sepconv.SeparableConv2d(6, 9, 3, padding=1, mid_activation="relu",
                                  depthwise_bias=True, pointwise_groups=3, dtype=torch.float64)
    assert sep.pointwise_weight.shape == (9, 2, 1, 1)
    assert "pointwise_groups=3" in repr(sep)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in
              (sep.depthwise_weight, sep.pointwise_weight, sep.bias, sep.depthwise_bias)]
    want = oracle(x, *params, 1, 1, 1, "relu", None, groups=3)
    got = sep(x)
    torch.testing.assert_close(got, want)
    gy = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, list(sep.parameters()), gy),
        torch.autograd.grad(want, params, gy))
    dw, pw = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 9, 1, groups=3)
    pair = sepconv.SeparableConv2d.from_conv2d_pair(dw, pw)
    assert pair.pointwise_groups == 3
    xf = x.float()
    torch.testing.assert_close(pair(xf), pw(dw(xf)))


def test_channel_shuffle():
    """F.channel_shuffle before the depthwise conv, in the module and from_conv2d_pair."""
    torch.manual_seed(0)
    sep = sepconv.SeparableConv2d(6, 9, 3, padding=1, pointwise_groups=3, channel_shuffle=2,
                                  dtype=torch.float64)
    assert "pointwise_groups=3, channel_shuffle=2" in repr(sep)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    plain = sepconv.SeparableConv2d(6, 9, 3, padding=1, pointwise_groups=3, dtype=torch.float64)
    plain.load_state_dict(sep.state_dict())
    torch.testing.assert_close(sep(x), plain(F.channel_shuffle(x, 2)))
    dw, pw = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 9, 1, groups=3)
    pair = sepconv.SeparableConv2d.from_conv2d_pair(dw, pw, channel_shuffle=3)
    xf = x.float()
    torch.testing.assert_close(pair(xf), pw(dw(F.channel_shuffle(xf, 3))))


def test_module_saved_before_groups_and_shuffle_still_runs():
    """A whole module pickled by an earlier version has no pointwise_groups or
    channel_shuffle attribute: it runs as it did (the class defaults, 1)."""
    sep = sepconv.SeparableConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    want = sep(x)
    for name in ("pointwise_groups", "channel_shuffle"):
        del sep.__dict__[name]
    torch.testing.assert_close(sep(x), want)


@pytest.mark.parametrize("kwargs,message", [
    (dict(channel_shuffle=4), "channel_shuffle=4 must divide the 6 in_channels"),
    (dict(channel_shuffle=2, se_channels=2), "squeeze-and-excitation"),
    (dict(pointwise_groups=4), "must divide the 6 mid channels and the 9 out_channels"),
    (dict(pointwise_groups=0), "pointwise_groups must be a positive int"),
    (dict(pointwise_groups=3, se_channels=2), "squeeze-and-excitation"),
])
def test_pointwise_groups_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sepconv.SeparableConv2d(6, 9, 3, **kwargs)


def test_parametrized_parameters():
    """forward reads its parameters from the module's dict (faster than nn.Module's
    __getattr__), and as nn.Module does where a parametrization made one a property:
    the output and gradients are the functional's on the parametrized tensors."""
    from torch.nn.utils import parametrize

    class Triple(nn.Module):
        def forward(self, w):
            return 3 * w

    torch.manual_seed(0)
    m = sepconv.SeparableConv2d(4, 5, 3, padding=1, depthwise_bias=True).double()
    dw, pw = m.depthwise_weight.detach().clone(), m.pointwise_weight.detach().clone()
    b, db = m.bias.detach().clone(), m.depthwise_bias.detach().clone()
    for name in ("pointwise_weight", "bias"):
        parametrize.register_parametrization(m, name, Triple())
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    want = sepconv.separable_conv2d(x, dw, 3 * pw, 3 * b, 1, 1, depthwise_bias=db)
    got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    original = m.parametrizations.pointwise_weight.original
    pw_ = pw.clone().requires_grad_()
    sepconv.separable_conv2d(x, dw, 3 * pw_, 3 * b, 1, 1, depthwise_bias=db).sum().backward()
    torch.testing.assert_close(original.grad, pw_.grad, rtol=1e-12, atol=1e-12)
