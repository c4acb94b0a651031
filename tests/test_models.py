"""The model zoo: published parameter counts, torchvision's names, shapes, bad arguments."""

import pytest
import torch

import sepconv
from sepconv import models

# parameter counts at width 1.0 (Keras' MobileNet trainable count; torchvision's docs)
PUBLISHED = {models.mobilenet_v1: 4_231_976, models.mobilenet_v2: 3_504_872,
             models.shufflenet_v2: 2_278_604, models.mobilenet_v3_large: 5_483_032,
             models.efficientnet_b0: 5_288_548, models.squeezenet: 1_248_424,
             models.xception: 22_855_952,  # timm's legacy xception
             models.convnext_tiny: 28_589_128}


@pytest.mark.parametrize("build", PUBLISHED, ids=lambda f: f.__name__)
def test_parameter_count_is_the_published_one(build):
    assert sum(p.numel() for p in build().parameters()) == PUBLISHED[build]


@pytest.mark.parametrize("build,width", [(models.mobilenet_v1, 0.25), (models.mobilenet_v1, 1.0),
                                         (models.mobilenet_v2, 0.5), (models.mobilenet_v2, 1.4),
                                         (models.shufflenet_v2, 0.5), (models.shufflenet_v2, 2.0)])
def test_output_shape(build, width):
    model = build(width_mult=width, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("build", [models.mobilenet_v3_large, models.efficientnet_b0])
def test_squeeze_excitation_networks_train(build):
    """One training step (stochastic depth and dropout active) gives every parameter a
    finite gradient; eval is deterministic."""
    torch.manual_seed(0)
    model = build(num_classes=5)
    model(torch.randn(2, 3, 64, 48)).square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) and model(x).shape == (1, 5)


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2_x1_0", "mobilenet_v3_large",
                                  "efficientnet_b0", "squeezenet1_0", "convnext_tiny"])
def test_torchvision_weights_load_and_give_its_outputs(name):
    """torchvision's state_dict loads strictly, and the networks then agree exactly (where
    torchvision imports: not in CI, it has no build for the pinned CPU torch)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name).eval()
    for m in theirs.modules():  # statistics away from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    ours = getattr(models, name.removesuffix("_x1_0").removesuffix("1_0"))().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_torchvision_names_and_shapes():
    v2 = models.mobilenet_v2().state_dict()
    assert v2["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # first block: no expansion
    assert v2["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)
    assert v2["features.2.conv.2.weight"].shape == (24, 96, 1, 1)
    assert v2["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert v2["classifier.1.weight"].shape == (1000, 1280)
    s = models.shufflenet_v2().state_dict()
    assert s["stage2.0.branch1.0.weight"].shape == (24, 1, 3, 3)
    assert s["stage2.1.branch2.3.weight"].shape == (58, 1, 3, 3)
    assert s["conv5.0.weight"].shape == (1024, 464, 1, 1)
    assert s["fc.weight"].shape == (1000, 1024)
    v3 = models.mobilenet_v3_large().state_dict()
    assert v3["features.4.block.1.0.weight"].shape == (72, 1, 5, 5)
    assert v3["features.4.block.2.fc1.weight"].shape == (24, 72, 1, 1)
    assert v3["features.16.0.weight"].shape == (960, 160, 1, 1)
    assert v3["classifier.3.weight"].shape == (1000, 1280)
    b0 = models.efficientnet_b0().state_dict()
    assert b0["features.1.0.block.0.0.weight"].shape == (32, 1, 3, 3)
    assert b0["features.2.0.block.2.fc2.weight"].shape == (96, 4, 1, 1)
    assert b0["features.8.0.weight"].shape == (1280, 320, 1, 1)


@pytest.mark.parametrize("call,match", [
    (lambda: models.mobilenet_v2(width_mult=0), "width_mult"),
    (lambda: models.mobilenet_v1(num_classes=0), "num_classes"),
    (lambda: models.shufflenet_v2(width_mult=0.75), "0.5, 1.0, 1.5, 2.0"),
    (lambda: models.shufflenet_v1(groups=5), r"\[1, 2, 3, 4, 8\]"),
    (lambda: models.squeezenet(num_classes=0), "num_classes"),
    (lambda: models.convnext_tiny(num_classes=0), "num_classes"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ShuffleNetV1 1x at 224x224, Zhang et al. 2017 Table 2: multiply-adds ("MFLOPs") by groups
SHUFFLE_V1_PAPER_MMACS = {1: 143, 2: 140, 3: 137, 4: 133, 8: 137}


def _shufflenet_v1_by_hand(groups: int) -> tuple[int, int]:
    """(parameters, multiply-adds) at 224x224 in seed 002's convention: a conv has
    kh kw c_in c_out / g weights and that times H_out W_out multiply-adds, a batch norm
    2 C parameters, the fc c_in c_out + c_out weights and c_in c_out multiply-adds."""
    params, macs = 3 * 3 * 3 * 24 + 2 * 24, 3 * 3 * 3 * 24 * 112 * 112
    c, size = 24, 56  # after the max pool
    for stage, (repeats, c_out) in enumerate(zip((4, 8, 4),
                                                 models.SHUFFLE_V1_CHANNELS[groups])):
        for unit in range(repeats):
            stride = 2 if unit == 0 else 1
            g1 = 1 if stage == 0 and unit == 0 else groups
            mid, branch, out = c_out // 4, c_out - c if stride > 1 else c_out, size // stride
            params += c * mid // g1 + 2 * mid + 9 * mid + 2 * mid + mid * branch // groups \
                + 2 * branch
            macs += c * mid // g1 * size * size + 9 * mid * out * out \
                + mid * branch // groups * out * out
            c, size = c_out, out
    return params + c * 1000 + 1000, macs + c * 1000


@pytest.mark.parametrize("groups", sorted(SHUFFLE_V1_PAPER_MMACS))
def test_shufflenet_v1_complexity_by_hand_and_the_papers(groups):
    import sepconv
    report = sepconv.complexity(models.shufflenet_v1(groups), (1, 3, 224, 224))
    assert (report.params, report.macs) == _shufflenet_v1_by_hand(groups)
    assert abs(report.macs / 1e6 - SHUFFLE_V1_PAPER_MMACS[groups]) < 1.5  # its rounding


@pytest.mark.parametrize("groups", [1, 8])
def test_shufflenet_v1_output_shape(groups):
    model = models.shufflenet_v1(groups, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_channel_shuffle_is_the_transpose():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert models.ChannelShuffle(3)(x).flatten().tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize("groups", [1, 3, 8])
def test_fuse_takes_every_shufflenet_v1_unit(groups):
    """Every unit's channel shuffle -> dw -> BN -> 1x1 group conv -> BN fused (the
    shuffle folded as channel_shuffle=g, the 1x1 conv as pointwise_groups=g), the same
    outputs, no shuffle module left."""
    import sepconv
    torch.manual_seed(0)
    model = models.shufflenet_v1(groups, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        fused, report = sepconv.fuse(model)
        assert len(report.fused) == 16 and not report.skipped
        seps = [m for m in fused.modules() if isinstance(m, sepconv.SeparableConv2d)]
        assert len(seps) == 16 and all(m.pointwise_groups == groups for m in seps)
        assert all(m.channel_shuffle == groups for m in seps)
        assert not any(isinstance(m, models.ChannelShuffle) for m in fused.modules())
        assert all(names[0].endswith(".3") for names, _ in report.fused)  # branch.3: shuffle
        got = fused(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _squeezenet_by_hand() -> tuple[int, int]:
    """(parameters, multiply-adds) of SqueezeNet 1.0 at 224x224, seed 002's convention
    (convs with biases: k^2 c_in c_out + c_out parameters, k^2 c_in c_out H_out W_out
    multiply-adds)."""
    def conv(k, c_in, c_out, size):
        return k * k * c_in * c_out + c_out, k * k * c_in * c_out * size * size
    def fire(c_in, s, e, size):
        parts = [conv(1, c_in, s, size), conv(1, s, e, size), conv(3, s, e, size)]
        return sum(p for p, _ in parts), sum(m for _, m in parts)
    # 224 -> conv 7x7/2: 109 -> pools (ceil): 54, 27, 13
    parts = [conv(7, 3, 96, 109), fire(96, 16, 64, 54), fire(128, 16, 64, 54),
             fire(128, 32, 128, 54), fire(256, 32, 128, 27), fire(256, 48, 192, 27),
             fire(384, 48, 192, 27), fire(384, 64, 256, 27), fire(512, 64, 256, 13),
             conv(1, 512, 1000, 13)]
    return sum(p for p, _ in parts), sum(m for _, m in parts)


def test_squeezenet_complexity_by_hand_and_fuse_leaves_it():
    """torchvision lists squeezenet1_0 at 0.82 GFLOPS (multiply-adds); no depthwise conv,
    so fuse changes nothing and reports nothing."""
    import sepconv
    model = models.squeezenet().eval()
    report = sepconv.complexity(model, (1, 3, 224, 224))
    assert (report.params, report.macs) == _squeezenet_by_hand()
    assert round(report.macs / 1e9, 2) == 0.82
    fused, fuse_report = sepconv.fuse(model)
    assert not fuse_report.fused and not fuse_report.skipped
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


def _xception_by_hand() -> tuple[int, int]:
    """(parameters, multiply-adds) of Xception at 299x299, seed 002's convention: a
    separable conv c -> c' is 9 c depthwise weights and c c' pointwise weights, times
    H W multiply-adds each; a batch norm 2 C parameters."""
    params = macs = 0
    def conv(k, c_in, c_out, size, groups=1):
        nonlocal params, macs
        params += k * k * c_in * c_out // groups
        macs += k * k * c_in * c_out // groups * size * size
    def bn(c):
        nonlocal params
        params += 2 * c
    def sep(c_in, c_out, size):
        conv(3, c_in, c_in, size, c_in)
        conv(1, c_in, c_out, size)
        bn(c_out)
    conv(3, 3, 32, 149), bn(32), conv(3, 32, 64, 147), bn(64)
    for c_in, c_out, size in [(64, 128, 147), (128, 256, 74), (256, 728, 37)]:
        sep(c_in, c_out, size), sep(c_out, c_out, size)
        conv(1, c_in, c_out, (size + 1) // 2), bn(c_out)  # the strided skip
    for _ in range(8 * 3):
        sep(728, 728, 19)
    sep(728, 728, 19), sep(728, 1024, 19), conv(1, 728, 1024, 10), bn(1024)
    sep(1024, 1536, 10), sep(1536, 2048, 10)
    return params + 2048 * 1000 + 1000, macs + 2048 * 1000


def test_xception_complexity_by_hand_and_fuse_takes_all_34():
    import sepconv
    model = models.xception().eval()
    report = sepconv.complexity(model, (1, 3, 299, 299))
    assert (report.params, report.macs) == _xception_by_hand()  # 8.36 G multiply-adds
    torch.manual_seed(0)
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        want = model(x)
        fused, fuse_report = sepconv.fuse(model)
        assert len(fuse_report.fused) == 34 and not fuse_report.skipped
        torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4 * want.abs().max())


def test_convnext_tiny_fuse_takes_all_18_blocks():
    """Each CNBlock's dw -> LayerNorm -> Linear -> GELU becomes one
    SeparableConv2d(norm="layernorm"); with layer scales and LayerNorms away from their
    initial values (1e-6 would hide the blocks), the network gives what it gave, in both
    memory formats, and trains."""
    torch.manual_seed(0)
    model = models.convnext_tiny(num_classes=10).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.2, 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    fused, report = sepconv.fuse(model)
    assert len(report.fused) == 18 and not report.skipped
    assert {via for _, via in report.fused} == {"ConvNeXt block"}
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 64, 72).contiguous(memory_format=fmt)
        with torch.no_grad():
            want, got = model(x), fused(x)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    fused.train()
    fused(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
