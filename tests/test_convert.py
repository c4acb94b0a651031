"""fuse(), SeparableConv2d.from_conv2d_pair, from_conv2d() and separate()."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import sepconv
from sepconv import models


def _random_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with statistics and affine parameters far from the identity, so that
    folding them is tested (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
            u = lambda a, b: torch.rand(m.running_mean.numel(), generator=g) * (b - a) + a  # noqa: E731
            m.running_mean.copy_(u(-1, 1))
            m.running_var.copy_(u(0.3, 3))
            m.weight.data.copy_(u(0.5, 1.5))
            m.bias.data.copy_(u(-0.5, 0.5))
    return model


def _relative_error(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("build,chains", [(models.mobilenet_v1, 13), (models.mobilenet_v2, 17),
                                          (models.shufflenet_v2, 19)],
                         ids=["mobilenet_v1", "mobilenet_v2", "shufflenet_v2"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=str)
def test_fuse_zoo_models(build, chains, fmt):
    torch.manual_seed(0)
    model = _random_norms(build()).eval()
    fused, report = sepconv.fuse(model)
    assert len(report.fused) == chains and not report.skipped
    assert type(fused) is type(model)  # nothing needed fx: the class and forward are kept
    assert sum(isinstance(m, sepconv.SeparableConv2d) for m in fused.modules()) == chains
    assert not any(isinstance(m, sepconv.SeparableConv2d) for m in model.modules())  # a copy
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=fmt)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


@pytest.mark.parametrize("build,chains,se", [(models.mobilenet_v3_large, 15, 8),
                                             (models.efficientnet_b0, 16, 16)],
                         ids=["mobilenet_v3_large", "efficientnet_b0"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=str)
def test_fuse_zoo_squeeze_excitation_models(build, chains, se, fmt):
    """Every chain fused, squeeze-and-excitation included (hard-sigmoid and sigmoid gates)."""
    torch.manual_seed(0)
    model = _random_norms(build()).eval()
    fused, report = sepconv.fuse(model)
    assert len(report.fused) == chains and not report.skipped
    seps = [m for m in fused.modules() if isinstance(m, sepconv.SeparableConv2d)]
    assert sum(m.excitation is not None for m in seps) == se
    x = torch.randn(2, 3, 97, 96).contiguous(memory_format=fmt)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


def test_fuse_inplace_changes_the_model():
    model = _random_norms(models.mobilenet_v1(width_mult=0.25)).eval()
    fused, report = sepconv.fuse(model, inplace=True)
    assert fused is model and len(report.fused) == 13


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return F.relu6(self.bn(self.dw(x)))


class _Net(nn.Module):
    """Chains across module boundaries, with functional and method activations, and one
    depthwise conv whose output is used twice (not fusable)."""

    def __init__(self):
        super().__init__()
        self.block, self.pw = _Block(), nn.Conv2d(16, 12, 1)
        self.dw2, self.pw2 = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.Conv2d(12, 12, 1)
        self.dw3 = nn.Conv2d(12, 12, 5, padding=2, groups=12, bias=False)
        self.pw3 = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = torch.relu(self.pw(self.block(x)))
        z = self.dw2(y)
        y = y + self.pw2(z) + z
        return F.silu(self.pw3(self.dw3(y)).relu())


class _FunctionalGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return F.gelu(self.pw(F.gelu(self.dw(x), approximate="tanh")))


def test_fuse_functional_gelu_through_fx():
    model = _FunctionalGelu().eval()
    fused, report = sepconv.fuse(model)
    assert len(report.fused) == 1 and report.fused[0][1] == "torch.fx"
    sep = [m for m in fused.modules() if isinstance(m, sepconv.SeparableConv2d)][0]
    assert (sep.mid_activation, sep.activation) == ("gelu_tanh", "gelu")
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


def test_fuse_through_fx_across_modules():
    model = _random_norms(_Net()).eval()
    fused, report = sepconv.fuse(model)
    assert isinstance(fused, fx.GraphModule)
    assert [names for names, _ in report.fused] == [
        ["block.dw", "block.bn", "relu6", "pw", "relu"], ["dw3", "pw3", "relu_1"]]
    assert report.skipped == [("dw2", "the output of dw2 has 2 users")]
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5
    assert "fused 2" in str(report) and "skipped dw2" in str(report)


def _chain(*between, after=(), dw=None, pw=None):
    dw = dw or nn.Conv2d(4, 8, 3, padding=1, groups=4)
    return nn.Sequential(dw, *between, pw or nn.Conv2d(8, 6, 1), *after)


@pytest.mark.parametrize("model,act1,act2", [
    (_chain(nn.BatchNorm2d(8), nn.Hardtanh(0.0, 6.0), after=(nn.BatchNorm2d(6), nn.SiLU())),
     "relu6", "silu"),
    (_chain(nn.Identity(), after=(nn.Hardswish(),)), None, "hardswish"),
    (_chain(dw=nn.Conv2d(4, 8, (3, 5), 2, (1, 2), 2, groups=4, padding_mode="reflect"),
            after=(nn.ReLU(inplace=True),)), None, "relu"),
    (_chain(nn.GELU(), after=(nn.GELU(approximate="tanh"),)), "gelu", "gelu_tanh"),
    # a grouped 1x1 conv (ShuffleNetV1): pointwise_groups
    (_chain(nn.BatchNorm2d(8), pw=nn.Conv2d(8, 6, 1, groups=2), after=(nn.BatchNorm2d(6),)),
     None, None),
])
def test_fuse_chain_variants(model, act1, act2):
    model = _random_norms(model).eval()
    fused, report = sepconv.fuse(model)
    sep = fused[0]
    assert len(report.fused) == 1 and isinstance(sep, sepconv.SeparableConv2d)
    assert (sep.mid_activation, sep.activation) == (act1, act2)
    pw = [m for m in model if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)][0]
    assert sep.pointwise_groups == pw.groups
    x = torch.randn(2, 4, 11, 13)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


class _ShuffledUnit(nn.Module):
    """A functional forward (traced by fx): ``shuffle(x)`` -> dw -> BN -> 1x1 group conv
    -> ReLU, and what else reads the shuffle's output (``also``)."""

    def __init__(self, shuffle, also=False):
        super().__init__()
        self.shuffle, self.also = shuffle, also
        self.dw, self.bn = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6)
        self.pw = nn.Conv2d(6, 4, 1, groups=2)

    def forward(self, x):
        s = self.shuffle(x)
        y = F.relu(self.pw(self.bn(self.dw(s))))
        return y + s[:, :4] if self.also else y


@pytest.mark.parametrize("shuffle,also,folded", [
    (lambda x: sepconv.models.channel_shuffle(x, 3), False, 3),  # view/transpose/view
    (lambda x: x.reshape(x.shape[0], 2, 3, x.shape[2], x.shape[3]).transpose(1, 2)
     .flatten(1, 2), False, 2),
    (nn.ChannelShuffle(2), False, 2),
    (lambda x: x.view(x.shape[0], 1, 6, x.shape[2], x.shape[3]).transpose(1, 2)
     .reshape(x.shape), False, 1),  # (an identity: no shuffle)
    (lambda x: x.view(x.shape[0], 6, -1).view(x.shape), False, 1),  # not a shuffle
    (lambda x: sepconv.models.channel_shuffle(x, 3), True, 1),  # its output read again
])
def test_fuse_folds_a_shuffle_in_the_graph(shuffle, also, folded):
    """fx: a shuffle before a chain, as steps on the tensor or a module, becomes the
    chain's channel_shuffle where it is one (checked by running it) and only the chain
    reads it; the chain is fused either way, the outputs the model's."""
    model = _random_norms(_ShuffledUnit(shuffle, also)).eval()
    fused, report = sepconv.fuse(model)
    assert len(report.fused) == 1 and report.fused[0][1] == "torch.fx"
    seps = [m for m in fused.modules() if isinstance(m, sepconv.SeparableConv2d)]
    assert len(seps) == 1 and seps[0].channel_shuffle == folded
    assert (len(report.fused[0][0]) == 5) == (folded > 1)  # the shuffle named first
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


def test_fuse_folds_a_channel_shuffle_before_the_chain():
    """torch's nn.ChannelShuffle right before a chain becomes its channel_shuffle (the
    shuffle module replaced); one that does not precede a depthwise conv stays."""
    model = _random_norms(nn.Sequential(
        nn.ChannelShuffle(2), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8),
        nn.Conv2d(8, 6, 1, groups=2), nn.ChannelShuffle(3))).eval()
    fused, report = sepconv.fuse(model)
    assert report.fused == [(["0", "1", "2", "3"], "nn.Sequential")]
    assert isinstance(fused[0], sepconv.SeparableConv2d) and fused[0].channel_shuffle == 2
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[4], nn.ChannelShuffle)
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


@pytest.mark.parametrize("model,reason", [
    (_chain(nn.BatchNorm2d(8), nn.ELU()), "followed by ELU (2)"),
    (_chain(pw=nn.Conv2d(8, 6, 1, stride=2)), "stride (2, 2)"),
    (_chain(pw=nn.Conv2d(8, 6, 3, padding=1)), "not 1x1"),
    (_chain(nn.BatchNorm2d(8, track_running_stats=False)), "track_running_stats=False"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), "nothing follows"),
])
def test_fuse_says_why_it_skips(model, reason):
    fused, report = sepconv.fuse(model.eval())
    assert not report.fused and len(report.skipped) == 1
    assert reason in report.skipped[0][1]
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


class _NormAct(nn.BatchNorm2d):
    """As timm's BatchNormAct2d: a BatchNorm2d subclass whose forward adds an activation
    (with a data-dependent branch, as timm's momentum logic: not fx-traceable)."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > float("inf"):
            return x
        return self.act(super().forward(x))


class _PadSame(nn.Conv2d):
    """As timm's Conv2dSame: padding from the input, not from its padding attribute."""

    def forward(self, x):
        ph, pw = self.kernel_size[0] // 2, self.kernel_size[1] // 2
        if x.sum() > float("inf"):
            return x
        return F.conv2d(F.pad(x, (pw, pw, ph, ph)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


@pytest.mark.parametrize("model,fused_names,reason", [
    (_chain(_NormAct(8)), None, "1 is a _NormAct, whose forward is its own"),
    (_chain(nn.ReLU(), pw=_PadSame(8, 6, 1)), None, "2 is a _PadSame"),
    (_chain(dw=_PadSame(4, 8, 3, groups=4)), None, "a _PadSame, whose forward is its own"),
    (_chain(nn.ReLU(), after=(_NormAct(6),)), ["0", "1", "2"], None),
    (_chain(nn.BatchNorm2d(8), nn.ReLU(), after=(_NormAct(6), nn.ReLU())),
     ["0", "1", "2", "3"], None),
])
def test_fuse_leaves_subclasses_with_their_own_forward(model, fused_names, reason):
    """A Conv2d or BatchNorm2d subclass that overrides forward is not what its attributes
    say: a chain stops before it, and a depthwise one is left alone, each with a reason.
    (Folded as a plain norm, such a norm's activation was silently dropped.)"""
    model = _random_norms(model).eval()
    fused, report = sepconv.fuse(model)
    if fused_names is None:
        assert not report.fused and len(report.skipped) == 1
        assert reason in report.skipped[0][1]
    else:
        assert [names for names, _ in report.fused] == [fused_names]
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


# --- replicas of timm's blocks (written from timm 1.0's published structure and names) ---

class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: batch norm, then ``.drop``, then ``.act``; its forward
    asserts on ``x.ndim`` (fx sees two metadata reads of the conv output)."""

    def __init__(self, c, act_layer=nn.ReLU, apply_act=True, drop_layer=None):
        super().__init__(c)
        self.drop = drop_layer() if drop_layer else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.SyncBatchNormAct (what convert_sync_batchnorm makes of BatchNormAct2d):
    SyncBatchNorm's forward, then ``.drop`` and ``.act``."""

    def __init__(self, c, act_layer=nn.ReLU):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), act_layer()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (detection backbones; timm has its own):
    statistics and affine parameters as buffers, used in training mode too."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        g = torch.Generator().manual_seed(c)
        for name, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5),
                             ("running_mean", -1, 1), ("running_var", 0.3, 3)):
            self.register_buffer(name, torch.rand(c, generator=g) * (hi - lo) + lo)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Conv2dSame(nn.Conv2d):
    """timm.layers.Conv2dSame: TensorFlow's SAME padding from the input size (not
    fx-traceable: math on the size)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, padding=0)

    def forward(self, x):
        pads = []
        for i, k, s, d in zip(x.size()[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads = [total // 2, total - total // 2] + pads
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


class SqueezeExcite(nn.Module):
    """timm.models._efficientnet_blocks.SqueezeExcite: x * gate(conv_expand(act1(
    conv_reduce(mean_hw(x)))))."""

    def __init__(self, c, rd, act_layer=nn.ReLU, gate_layer=nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, rd, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd, c, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return x * self.gate(x_se)


def _conv(cin, cout, k, stride=1, groups=1, same=False):
    """timm's create_conv2d: Conv2dSame where "same" needs padding from the input size."""
    if same and stride > 1:
        return Conv2dSame(cin, cout, k, stride, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, act=nn.ReLU, pw_act=False, same=False):
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin, same=same)
        self.bn1 = BatchNormAct2d(cin, act)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = BatchNormAct2d(cout, act, apply_act=pw_act)
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, exp=4, act=nn.ReLU6, same=False, se=False):
        super().__init__()
        mid = cin * exp
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = BatchNormAct2d(mid, act)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid, same=same)
        self.bn2 = BatchNormAct2d(mid, act)
        self.aa = nn.Identity()
        self.se = SqueezeExcite(mid, max(1, cin // 4), act, nn.Hardsigmoid) if se \
            else nn.Identity()
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = BatchNormAct2d(cout, apply_act=False)
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    """timm's EfficientNet / MobileNetV2 / MnasNet skeleton: stem, stages of blocks, head."""

    def __init__(self, act=nn.ReLU6, same=False, se=False):
        super().__init__()
        self.conv_stem = _conv(3, 16, 3, 2, same=same)
        self.bn1 = BatchNormAct2d(16, act)
        self.blocks = nn.Sequential(
            nn.Sequential(DepthwiseSeparableConv(16, 16, act=act, same=same)),
            nn.Sequential(InvertedResidual(16, 24, 3, 2, act=act, same=same, se=se),
                          InvertedResidual(24, 24, act=act, same=same)),
            nn.Sequential(InvertedResidual(24, 32, 5, 2, act=act, same=same, se=se),
                          InvertedResidual(32, 32, 5, act=act, same=same, se=se)))
        self.conv_head = _conv(32, 64, 1)
        self.bn2 = BatchNormAct2d(64, act)

    def forward(self, x):
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))


@pytest.mark.parametrize("act,same,se", [(nn.ReLU6, False, False), (nn.SiLU, False, True),
                                         (nn.ReLU, True, False), (nn.Hardswish, True, True)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=str)
def test_fuse_timm_block_replicas(act, same, se, fmt):
    """timm's blocks: BatchNormAct2d read as norm + act (its ndim asserts are not uses),
    the empty aa / se slots passed through or a SqueezeExcite fused, Conv2dSame as
    padding="same" at stride 2 (odd and even sizes); every depthwise conv fused, through
    fx."""
    model = _random_norms(EfficientNet(act, same, se)).eval()
    fused, report = sepconv.fuse(model)
    assert not report.skipped
    assert [names for names, _ in report.fused][:2] == [
        ["blocks.0.0.conv_dw", "blocks.0.0.bn1", "blocks.0.0.aa", "blocks.0.0.se",
         "blocks.0.0.conv_pw", "blocks.0.0.bn2"],
        ["blocks.1.0.conv_dw", "blocks.1.0.bn2", "blocks.1.0.aa", "blocks.1.0.se",
         "blocks.1.0.conv_pwl", "blocks.1.0.bn3"]]
    seps = [m for m in fused.modules() if isinstance(m, sepconv.SeparableConv2d)]
    assert len(seps) == 5 and {s.mid_activation for s in seps} == {_act(act)}
    assert sum(s.excitation is not None for s in seps) == (3 if se else 0)
    assert [s.padding for s in seps if s.stride == (2, 2)] == (["same"] * 2 if same else
                                                               [(1, 1), (2, 2)])
    for size in (33, 32):
        x = torch.randn(2, 3, size, size - 3).contiguous(memory_format=fmt)
        with torch.no_grad():
            assert _relative_error(fused(x), model(x)) < 1e-5


def _act(act):
    return {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish"}[act]


def _impostor(cls, forward):
    return type(cls.__name__, (cls,), {"forward": forward})


@pytest.mark.parametrize("model,reason", [
    (_chain(BatchNormAct2d(8, nn.ELU)), "act (ELU) or drop (Identity)"),
    (_chain(BatchNormAct2d(8, drop_layer=nn.Tanh)), "act (ReLU) or drop (Tanh)"),
    (_chain(BatchNormAct2d(8, drop_layer=nn.Dropout)), None),  # eval mode: the identity
    (_chain(SyncBatchNormAct(8, nn.Hardswish)), None),
    (_chain(FrozenBatchNorm2d(8), nn.ReLU6(), after=(FrozenBatchNorm2d(6),)), None),
    (_chain(_impostor(FrozenBatchNorm2d, lambda self, x: x * self.weight.reshape(1, -1, 1, 1))(8)),
     "does not compute what fuse() reads it as"),
    # a class of timm's name that computes something else is found out on random inputs
    (_chain(_impostor(BatchNormAct2d, lambda self, x: F.batch_norm(
        self.act(x), self.running_mean, self.running_var, self.weight, self.bias))(8)),
     "does not compute what fuse() reads it as"),
    (_chain(dw=_impostor(Conv2dSame, lambda self, x: F.conv2d(
        x, self.weight, self.bias, self.stride, 0, groups=self.groups))(4, 8, 3, groups=4)),
     "does not compute what fuse() reads it as"),
    (_chain(dw=_impostor(Conv2dSame, lambda self, x: F.conv2d(
        x, self.weight, self.bias, self.stride, 2, groups=self.groups))(4, 8, 3, stride=2,
                                                                      groups=4)),
     "does not compute what fuse() reads it as"),
])
def test_fuse_checks_what_it_reads_from_timm(model, reason):
    model = _random_norms(model).eval()
    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    model.train(frozen)  # a frozen norm folds in training mode too
    fused, report = sepconv.fuse(model)
    if reason is None:
        assert len(report.fused) == 1 and fused[0].padding == (1, 1)
    else:
        assert not report.fused and reason in report.skipped[0][1]
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


class _MetadataReads(nn.Module):
    """Reads of the intermediate's ndim, dtype and spatial sizes are not uses of its data;
    a read of its channel count (it differs after fusion) is."""

    def __init__(self, read_shape=False):
        super().__init__()
        self.dw, self.bn, self.pw = nn.Conv2d(4, 8, 3, groups=4), nn.BatchNorm2d(8), \
            nn.Conv2d(8, 6, 1)
        self.read_shape = read_shape

    def forward(self, x):
        u = self.bn(self.dw(x))
        torch._assert(u.ndim == 4, "4D")
        torch._assert(u.dim() == 4, "4D")
        w = u.size(-1) + u.size(2) + u.shape[-2] + u.size()[3] + u.shape[-2:][0]
        if self.read_shape:
            w = w + u.shape[1]
        return self.pw(F.relu(u)).to(u.dtype) * w


@pytest.mark.parametrize("read_shape", [False, True])
def test_fuse_ignores_metadata_reads(read_shape):
    model = _random_norms(_MetadataReads(read_shape)).eval()
    fused, report = sepconv.fuse(model)
    if read_shape:
        assert not report.fused and "users" in report.skipped[0][1]
    else:
        assert [names for names, _ in report.fused] == [["dw", "bn", "relu", "pw"]]
    x = torch.randn(2, 4, 9, 10)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


@pytest.mark.parametrize("lib,name,dw,se", [
    ("torchvision", "mobilenet_v2", 17, 0), ("torchvision", "mnasnet1_0", 17, 0),
    ("torchvision", "shufflenet_v2_x1_0", 19, 0), ("timm", "mobilenetv2_100", 17, 0),
    ("timm", "mnasnet_100", 17, 0), ("timm", "tf_efficientnet_lite0", 16, 0),
    ("timm", "xception41", 39, 0),
    # squeeze-and-excitation between dw and pw (the last number: chains with one)
    ("torchvision", "mobilenet_v3_large", 15, 8), ("torchvision", "efficientnet_b0", 16, 16),
    ("timm", "mobilenetv3_large_100", 15, 8), ("timm", "efficientnet_b0", 16, 16),
    # torchvision's FrozenBatchNorm2d, as its detection backbones have it
    ("torchvision", "mobilenet_v2+frozen", 17, 0),
    ("torchvision", "mobilenet_v3_large+frozen", 15, 8),
    # ConvNeXt's dw -> LayerNorm -> Linear -> GELU blocks
    ("torchvision", "convnext_tiny", 18, 0), ("timm", "convnext_tiny", 18, 0),
])
def test_fuse_real_timm_and_torchvision_models(lib, name, dw, se):
    """The libraries' own model code, where they import (not in CI: torchvision has no
    build for the pinned CPU torch): every depthwise conv fused."""
    module = pytest.importorskip(lib)
    torch.manual_seed(0)
    build = module.create_model if lib == "timm" else module.models.get_model
    name, _, frozen = name.partition("+")
    kwargs = {"norm_layer": module.ops.misc.FrozenBatchNorm2d} if frozen else {}
    model = _random_norms(build(name, **kwargs)).eval()
    fused, report = sepconv.fuse(model)
    assert len(report.fused) == dw and not report.skipped
    seps = [m for m in fused.modules() if isinstance(m, sepconv.SeparableConv2d)]
    assert sum(m.excitation is not None for m in seps) == se
    x = torch.randn(2, 3, 225, 218)  # odd and even: timm's tf_ models pad by the size
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


def test_fuse_refuses_batch_norm_in_training_mode():
    with pytest.raises(ValueError, match="training mode.*eval"):
        sepconv.fuse(_chain(nn.BatchNorm2d(8)).train())
    model = _chain(nn.ReLU()).train()  # no norm: fused in training mode too
    fused, report = sepconv.fuse(model)
    assert len(report.fused) == 1
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(fused(x), model(x))


class _Trainable(nn.Module):
    """A Sequential chain with a batch norm after the pointwise conv (it stays, in training
    mode, with fold_bn=False), one with a norm between the convs (left), and one the fx
    graph shows, with a frozen depthwise conv."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(),
                                 nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.normed = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6),
                                    nn.BatchNorm2d(6), nn.Conv2d(6, 6, 1))
        self.dw, self.pw = nn.Conv2d(6, 12, 5, 2, 2, groups=6), nn.Conv2d(12, 5, 1)
        self.dw.weight.requires_grad_(False)

    def forward(self, x):
        return F.silu(self.pw(self.dw(self.normed(self.seq(x)))))


def test_fuse_without_folding_trains_as_the_original():
    """fold_bn=False: the fused model trains (norms in training mode), with the original's
    gradients and updates; a frozen conv's fused weight stays frozen."""
    torch.manual_seed(0)
    model = _Trainable().train()
    with pytest.raises(ValueError, match="fold_bn=False"):
        sepconv.fuse(model)
    fused, report = sepconv.fuse(model, fold_bn=False)
    assert [names for names, _ in report.fused] == [["seq.0", "seq.1", "seq.2"],
                                                    ["dw", "pw", "silu"]]
    assert report.skipped == [("normed.0", "followed by BatchNorm2d (normed.1), not a 1x1 "
                                           "Conv2d (fold_bn=False keeps batch norms)")]
    got, want = fused.get_submodule, model.get_submodule  # fused: an fx.GraphModule
    first, second = got("seq.0"), got("dw")
    assert not second.depthwise_weight.requires_grad and second.pointwise_weight.requires_grad
    pairs = [(first.depthwise_weight, want("seq.0").weight),
             (first.depthwise_bias, want("seq.0").bias),
             (first.pointwise_weight, want("seq.2").weight), (first.bias, want("seq.2").bias),
             (got("seq.3").weight, want("seq.3").weight),
             (second.pointwise_weight, model.pw.weight), (second.depthwise_bias, model.dw.bias),
             (got("normed.2").weight, want("normed.2").weight)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (fused, model)]
    for _ in range(2):
        x = torch.randn(3, 4, 11, 10)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        outs = [m(xi) for m, xi in zip((fused, model), xs)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for out, opt in zip(outs, opts):
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-6)
        for mine, theirs in pairs:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got("seq.3").running_var, want("seq.3").running_var)


def test_fuse_skips_shared_modules():
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    model = nn.Sequential(dw, nn.Conv2d(4, 4, 1), dw, nn.Conv2d(4, 4, 1))
    fused, report = sepconv.fuse(model)
    assert not report.fused and "shared" in report.skipped[0][1]


def test_fuse_bad_argument():
    with pytest.raises(TypeError, match="nn.Module"):
        sepconv.fuse("model")


def test_from_conv2d_pair_folds_norms_exactly():
    dw = nn.Conv2d(3, 6, 3, 2, 1, groups=3, dtype=torch.float64)
    pw = nn.Conv2d(6, 5, 1, bias=False, dtype=torch.float64)
    n1, n2 = (_random_norms(nn.BatchNorm2d(c, dtype=torch.float64)).eval() for c in (6, 5))
    sep = sepconv.SeparableConv2d.from_conv2d_pair(dw, pw, depthwise_norm=n1,
                                                   mid_activation="relu", pointwise_norm=n2,
                                                   activation="hardswish")
    assert sep.depth_multiplier == 2 and sep.depthwise_weight.dtype == torch.float64
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(sep(x), F.hardswish(n2(pw(F.relu(n1(dw(x)))))))


@pytest.mark.parametrize("dw,pw,kw,error,match", [
    (nn.Conv2d(3, 6, 3), nn.Conv2d(6, 5, 1), {}, ValueError, "groups == in_channels"),
    (nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(4, 5, 1), {}, ValueError, "takes 4 channels"),
    (nn.Conv2d(3, 3, 3, groups=3), nn.Linear(3, 5), {}, TypeError, "nn.Conv2d"),
    (nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 5, 1), {"depthwise_norm": nn.BatchNorm2d(3)},
     ValueError, "training mode"),
    (nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 5, 1),
     {"pointwise_norm": nn.BatchNorm2d(4).eval()}, ValueError, "4 features"),
    (nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 5, 1), {"depthwise_norm": nn.LayerNorm(3)},
     TypeError, "BatchNorm2d"),
    # attributes that do not say what the module computes: refused, not folded wrongly
    (Conv2dSame(3, 3, 3, 2, groups=3), nn.Conv2d(3, 5, 1), {}, TypeError, "forward is its own"),
    (nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 5, 1),
     {"pointwise_norm": BatchNormAct2d(5).eval()}, TypeError, "pointwise_norm is a BatchNormAct2d"),
])
def test_from_conv2d_pair_errors(dw, pw, kw, error, match):
    with pytest.raises(error, match=match):
        sepconv.SeparableConv2d.from_conv2d_pair(dw, pw, **kw)


def test_from_conv2d_pair_takes_a_padding():
    """padding="same" for a conv padded as TensorFlow's SAME (timm's Conv2dSame)."""
    dw = nn.Conv2d(3, 3, 5, 2, groups=3, dtype=torch.float64)
    pw = nn.Conv2d(3, 4, 1, dtype=torch.float64)
    sep = sepconv.SeparableConv2d.from_conv2d_pair(dw, pw, padding="same")
    for size in (9, 10):
        x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)
        pads = [max((math.ceil(i / 2) - 1) * 2 + 5 - i, 0) for i in x.shape[-2:]]
        xp = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        torch.testing.assert_close(sep(x), pw(dw(xp)))


def test_from_conv2d_is_exact_at_full_rank_and_optimal_below():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, (3, 2), stride=2, padding=(1, 0), dilation=(2, 1),
                     padding_mode="circular", dtype=torch.float64)
    x = torch.randn(2, 5, 12, 11, dtype=torch.float64)
    errors = []
    for m in (1, 2, 3, 6, 8):  # min(C_out, kh * kw) = 6
        sep, err = sepconv.from_conv2d(conv, depth_multiplier=m)
        assert sep.depth_multiplier == m
        errors.append(err)
        # Eckart-Young: the error is the discarded singular values, per input channel
        W = conv.weight.detach().permute(1, 0, 2, 3).reshape(5, 7, 6)
        S = torch.linalg.svdvals(W)
        want = (S[:, m:].square().sum() / S.square().sum()).sqrt().item()
        assert err == pytest.approx(want, abs=1e-12)
        if m >= 6:
            torch.testing.assert_close(sep(x), conv(x))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12 < errors[0]


def test_from_conv2d_errors():
    with pytest.raises(ValueError, match="groups=1"):
        sepconv.from_conv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="depth_multiplier"):
        sepconv.from_conv2d(nn.Conv2d(4, 4, 3), depth_multiplier=0)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        sepconv.from_conv2d(nn.Linear(4, 4))


def test_separate_small_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 3, groups=4),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    new, report = sepconv.separate(net, depth_multiplier=2, input_size=(1, 3, 32, 32))
    assert [r["name"] for r in report.rows] == ["0", "2"]  # 1x1 and grouped convs stay
    assert isinstance(new[0], sepconv.SeparableConv2d) and type(new[4]) is nn.Conv2d
    assert type(net[0]) is nn.Conv2d  # not in place
    for row, conv in zip(report.rows, (net[0], net[2])):
        assert row["error"] == pytest.approx(sepconv.from_conv2d(conv, 2)[1])
        assert row["params_after"] < row["params_before"]
        assert row["flops_after"] < row["flops_before"]
    # conv 2 (16 -> 32, 3x3, stride 2, no bias) at 16x16 output, seed 000 formulas
    assert report.rows[1]["flops_before"] == (2 * 16 * 9 - 1) * 16 * 16 * 32
    assert report.rows[1]["flops_after"] == (2 * 9 - 1) * 256 * 32 + (2 * 32 - 1) * 256 * 32
    assert "error" in str(report)
    x = torch.randn(2, 3, 32, 32)
    assert new(x).shape == net(x).shape


def test_separate_reports_no_flops_for_a_conv_the_forward_skips():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.used(x)

    _, report = sepconv.separate(Skips(), input_size=(1, 3, 8, 8))
    rows = {r["name"]: r for r in report.rows}
    assert rows["used"]["flops_before"] == (2 * 27) * 36 * 4  # with bias
    assert rows["unused"]["flops_before"] is None and rows["unused"]["flops_after"] is None


# --- ConvNeXt's blocks ---------------------------------------------------------------------
# torchvision's and timm's classes as their libraries write them (neither library is in CI:
# the tests above run the real ones where they import; timm's are read by module and class
# name, so these copies carry timm's module names).

class Permute(nn.Module):  # torchvision.ops.misc.Permute
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):  # torchvision.models.convnext.CNBlock (stochastic depth: eval)
    def __init__(self, dim, permute=Permute):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            permute([0, 2, 3, 1]), nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim),
            nn.GELU(), nn.Linear(4 * dim, dim), permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * 0.5)

    def forward(self, input):
        return self.layer_scale * self.block(input) + input


def _timm(cls):
    cls.__module__ = "timm.layers" if cls.__name__ != "ConvNeXtBlock" else "timm.models.convnext"
    return cls


@_timm
class GELU(nn.Module):
    def forward(self, input):
        return F.gelu(input)


@_timm
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@_timm
class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@_timm
class Mlp(nn.Module):
    def __init__(self, dim, hidden, conv):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.fc1, self.act, self.drop1 = layer(dim, hidden), GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), layer(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


@_timm
class ConvNeXtBlock(nn.Module):  # timm.models.convnext.ConvNeXtBlock (stride 1, no GRN)
    def __init__(self, dim, conv_mlp=False):
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = (LayerNorm2d if conv_mlp else LayerNorm)(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, conv_mlp)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.shortcut, self.drop_path = nn.Identity(), nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + self.shortcut(shortcut)


def _random_layer_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("channels_last", [False, True])
def test_fuse_convnext_blocks(channels_last):
    """torchvision's CNBlock and timm's ConvNeXtBlock (Linear and conv_mlp forms): each dw
    conv -> LayerNorm -> Linear -> GELU becomes one SeparableConv2d(norm="layernorm"); the
    blocks give what they gave, and train."""
    torch.manual_seed(0)
    model = _random_layer_norms(nn.Sequential(CNBlock(8), ConvNeXtBlock(8),
                                              ConvNeXtBlock(8, conv_mlp=True)))
    fused, report = sepconv.fuse(model)
    assert [via for _, via in report.fused] == ["ConvNeXt block"] * 3 and not report.skipped
    assert report.fused[0][0] == ["0.block.0", "0.block.1", "0.block.2", "0.block.3",
                                  "0.block.4"]
    assert report.fused[1][0] == ["1.conv_dw", "1.norm", "1.mlp.fc1", "1.mlp.act"]
    seps = [m for m in fused.modules() if isinstance(m, sepconv.SeparableConv2d)]
    assert len(seps) == 3 and all(s.norm == "layernorm" and s.norm_eps == 1e-6 for s in seps)
    assert [s.activation for s in seps] == ["gelu"] * 3 and seps[0].out_channels == 32
    x = torch.randn(2, 8, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5
    fused.train()
    x.requires_grad_()
    fused(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in fused.parameters())


def test_fuse_convnext_checks_what_it_reads():
    """A block whose parts are what fuse() reads but whose Permute is not (its dims say one
    thing, its forward does another) is checked on a random input and left; a LayerNorm
    over something else than the channels is not taken."""
    class Scaling(Permute):  # a "Permute" that also doubles (LayerNorm undoes that)
        def forward(self, x):
            return torch.permute(x, self.dims) * (2 if self.dims == [0, 2, 3, 1] else 1)
    Scaling.__name__ = "Permute"
    torch.manual_seed(0)
    model = _random_layer_norms(nn.Sequential(CNBlock(6, permute=Scaling))).eval()
    fused, report = sepconv.fuse(model)
    assert not report.fused and report.skipped[0][0] == "0.block.0"
    assert "computes something else" in report.skipped[0][1]
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    block = CNBlock(6)
    block.block[2] = nn.LayerNorm([6, 1])
    _, report = sepconv.fuse(nn.Sequential(block))
    assert not report.fused
