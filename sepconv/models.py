"""SqueezeNet, MobileNetV1, MobileNetV2, ShuffleNetV1, ShuffleNetV2 and Xception (seed
002), MobileNetV3-Large, EfficientNet-B0 and ConvNeXt-T, built from standard ``nn`` layers.

They are what users have: dw conv -> BN -> act -> 1x1 conv -> BN -> act chains written
with ``nn.Conv2d`` (in MobileNetV3 and EfficientNet with squeeze-and-excitation between
the two convs; in ConvNeXt dw conv -> LayerNorm -> Linear -> GELU), so they are the
inputs ``sepconv.fuse`` is tested and benchmarked on.
All but MobileNetV1, ShuffleNetV1 and Xception follow torchvision's modules and attribute
names (their ``state_dict`` keys and shapes are torchvision's, so its weights load);
MobileNetV1 follows Table 1 of Howard et al. 2017 with the last depthwise layer at stride
1, as its 7x7 output needs, ShuffleNetV1 Table 1 of Zhang et al. 2017, and Xception timm's
legacy ``xception`` (torchvision has neither).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2", "squeezenet",
           "xception", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
           "SqueezeExcitation", "ChannelShuffle"]


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, as torchvision's Conv2dNormActivation
    (children 0, 1, 2)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: type[nn.Module] | None = nn.ReLU6,
                 norm=nn.BatchNorm2d) -> None:
        layers = [nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2,
                            groups=groups, bias=False), norm(c_out)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = c_out


def _init(model: nn.Module) -> None:
    """torchvision's initialisation of its MobileNets."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of 8, never 10% below v (torchvision, TF models)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _check(width_mult: float, num_classes: int) -> None:
    if not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


class _PooledClassifier(nn.Module):
    """torchvision's MobileNet forward: features -> global average pool -> classifier."""

    features: nn.Module
    classifier: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# --- MobileNetV1 -------------------------------------------------------------------------

# (C_out, stride) of the 13 depthwise separable layers (Howard et al. 2017, Table 1)
V1_LAYERS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
             (1024, 2), (1024, 1)]


class MobileNetV1(_PooledClassifier):
    """features: stem conv, then 13 ``Sequential(dw ConvNormActivation, pw
    ConvNormActivation)``; classifier: Linear. ReLU after every batch norm."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        _check(width_mult, num_classes)
        c = int(32 * width_mult)
        features = [ConvNormActivation(3, c, 3, 2, activation=nn.ReLU)]
        for c_out, stride in V1_LAYERS:
            c_out = int(c_out * width_mult)
            features.append(nn.Sequential(
                ConvNormActivation(c, c, 3, stride, groups=c, activation=nn.ReLU),
                ConvNormActivation(c, c_out, 1, activation=nn.ReLU)))
            c = c_out
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(c, num_classes)
        _init(self)


def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000) -> MobileNetV1:
    """MobileNetV1 (x: (N, 3, H, W) -> (N, num_classes)); 4,231,976 parameters at 1.0."""
    return MobileNetV1(width_mult, num_classes)


# --- MobileNetV2 -------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """1x1 expansion (if expand_ratio > 1) -> dw 3x3 -> ReLU6 -> 1x1 projection (linear);
    the input is added back when the shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = int(round(c_in * expand_ratio))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(c_in, hidden, 1))
        layers += [ConvNormActivation(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = c_out
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, C_out c, repeats n, first stride s) (Sandler et al. 2018, Table 2)
V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(_PooledClassifier):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        _check(width_mult, num_classes)
        c = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvNormActivation(3, c, 3, 2)]
        for t, c_out, n, s in V2_SETTING:
            c_out = _make_divisible(c_out * width_mult)
            for i in range(n):
                features.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        features.append(ConvNormActivation(c, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(self.last_channel, num_classes))
        _init(self)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000) -> MobileNetV2:
    """MobileNetV2 (x: (N, 3, H, W) -> (N, num_classes)); 3,504,872 parameters at 1.0."""
    return MobileNetV2(width_mult, num_classes)


# --- ShuffleNetV2 ------------------------------------------------------------------------

def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018, Fig. 3 c/d). Stride 1: half the channels pass,
    the other half go 1x1 -> dw 3x3 -> 1x1; stride 2: both halves are convolved."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(c_in if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


# stage output channels per width (stem, stage2, stage3, stage4, conv5), Table 5
SHUFFLE_CHANNELS = {0.5: (24, 48, 96, 192, 1024), 1.0: (24, 116, 232, 464, 1024),
                    1.5: (24, 176, 352, 704, 1024), 2.0: (24, 244, 488, 976, 2048)}


class ShuffleNetV2(nn.Module):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        _check(width_mult, num_classes)
        if width_mult not in SHUFFLE_CHANNELS:
            raise ValueError(f"ShuffleNetV2 is defined for width_mult in "
                             f"{sorted(SHUFFLE_CHANNELS)}, got {width_mult!r}")
        channels = SHUFFLE_CHANNELS[width_mult]
        c = channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for name, repeats, c_out in zip(("stage2", "stage3", "stage4"), (4, 8, 4), channels[1:]):
            blocks = [ShuffleBlock(c, c_out, 2)] + [ShuffleBlock(c_out, c_out, 1)
                                                     for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*blocks))
            c = c_out
        self.conv5 = nn.Sequential(nn.Conv2d(c, channels[-1], 1, bias=False),
                                   nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2(width_mult: float = 1.0, num_classes: int = 1000) -> ShuffleNetV2:
    """ShuffleNetV2 (x: (N, 3, H, W) -> (N, num_classes)); width_mult 0.5, 1.0, 1.5 or 2.0;
    2,278,604 parameters at 1.0."""
    return ShuffleNetV2(width_mult, num_classes)


# --- ShuffleNetV1 ------------------------------------------------------------------------

class ChannelShuffle(nn.Module):
    """channel_shuffle(x, groups) as a module (seed 002's ChannelShuffle): the channels,
    read as a groups x (C / groups) matrix, transposed."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)


class ShuffleUnitV1(nn.Module):
    """ShuffleNetV1 unit (Zhang et al. 2017, Fig. 2 b/c): 1x1 group conv (g groups) -> BN
    -> ReLU -> channel shuffle(g) -> 3x3 depthwise (stride) -> BN -> 1x1 group conv -> BN,
    added to the input (stride 1) or concatenated after its 3x3 average pool (stride 2),
    then ReLU. The bottleneck has a quarter of the output channels; the first unit of
    stage 2 takes its 24 input channels by an ungrouped 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int,
                 group_first: bool = True) -> None:
        super().__init__()
        self.stride = stride
        mid, branch = c_out // 4, c_out - c_in if stride > 1 else c_out
        self.branch = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, groups=groups if group_first else 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), ChannelShuffle(groups),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, branch, 1, groups=groups, bias=False), nn.BatchNorm2d(branch))
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.branch(x)
        if self.stride > 1:
            return torch.relu(torch.cat((self.shortcut(x), y), dim=1))
        return torch.relu(x + y)


# stage output channels per group count (Table 1; seed 002's table has 567 for the
# paper's 576 at g = 1)
SHUFFLE_V1_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                       4: (272, 544, 1088), 8: (384, 768, 1536)}


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 1x (Zhang et al. 2017, Table 1): conv 3x3/2 (24) -> max pool 3x3/2 ->
    stages of 4, 8 and 4 units (each stage's first at stride 2) -> global pool -> fc."""

    def __init__(self, groups: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        _check(1.0, num_classes)
        if groups not in SHUFFLE_V1_CHANNELS:
            raise ValueError(f"ShuffleNetV1 is defined for groups in "
                             f"{sorted(SHUFFLE_V1_CHANNELS)}, got {groups!r}")
        c = 24
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for name, repeats, c_out in zip(("stage2", "stage3", "stage4"), (4, 8, 4),
                                        SHUFFLE_V1_CHANNELS[groups]):
            units = [ShuffleUnitV1(c, c_out, 2, groups, group_first=name != "stage2")]
            units += [ShuffleUnitV1(c_out, c_out, 1, groups) for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*units))
            c = c_out
        self.fc = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(x.mean([2, 3]))


def shufflenet_v1(groups: int = 3, num_classes: int = 1000) -> ShuffleNetV1:
    """ShuffleNetV1 1x (x: (N, 3, H, W) -> (N, num_classes)), its 1x1 convs in ``groups``
    groups (1, 2, 3, 4 or 8; seed 002); 1,865,728 parameters and 137.5 M multiply-adds at
    224x224 for groups=3 (the paper's Table 2: 137 MFLOPs)."""
    return ShuffleNetV1(groups, num_classes)


# --- SqueezeNet --------------------------------------------------------------------------

class Fire(nn.Module):
    """SqueezeNet's Fire module (Iandola et al. 2016): a 1x1 squeeze conv, then 1x1 and 3x3
    expand convs side by side, concatenated; ReLU after each conv."""

    def __init__(self, c_in: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat((self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))), dim=1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.0 (Iandola et al. 2016, Table 1), torchvision's squeezenet1_0: conv
    7x7/2 (96) -> max pool -> Fire 2-4 -> max pool -> Fire 5-8 -> max pool -> Fire 9 ->
    dropout -> conv 1x1 (classes) -> ReLU -> global average pool. No depthwise conv:
    seed 002's baseline for complexity, which fuse leaves as it is."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        _check(1.0, num_classes)
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2), nn.ReLU(inplace=True), pool(),
            Fire(96, 16, 64, 64), Fire(128, 16, 64, 64), Fire(128, 32, 128, 128), pool(),
            Fire(256, 32, 128, 128), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), pool(), Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Conv2d(512, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                if m is self.classifier[1]:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet(num_classes: int = 1000) -> SqueezeNet:
    """SqueezeNet 1.0 (x: (N, 3, H, W) -> (N, num_classes)); 1,248,424 parameters."""
    return SqueezeNet(num_classes)


# --- Xception ----------------------------------------------------------------------------

class XceptionSeparable(nn.Module):
    """Xception's separable conv: depthwise 3x3 (``conv1``) then 1x1 (``pointwise``), no
    norm or activation between them, no biases (timm's legacy xception names)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.conv1(x))


class XceptionBlock(nn.Module):
    """(ReLU -> separable conv -> BN) x reps, then a 3x3/2 max pool where strided, added to
    the input (through a 1x1 conv + BN where the shape changes). ``grow_first``: the
    first separable conv changes the channels, else the last; the entry flow's first
    block starts without the ReLU."""

    def __init__(self, c_in: int, c_out: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True) -> None:
        super().__init__()
        if c_out != c_in or stride != 1:
            self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(c_out)
        else:
            self.skip = self.skipbn = None
        widths = ([c_in] + [c_out] * reps) if grow_first else ([c_in] * reps + [c_out])
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ReLU(inplace=bool(layers)), XceptionSeparable(a, b), nn.BatchNorm2d(b)]
        if not start_with_relu:
            layers = layers[1:]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.skip is None else self.skipbn(self.skip(x))
        return self.rep(x) + skip


class Xception(nn.Module):
    """Xception (Chollet 2017, Fig. 5), as timm's legacy ``xception``: entry flow (two
    3x3 convs, unpadded, then blocks to 128, 256 and 728 channels at stride 2), middle
    flow (8 blocks of three 728-channel separable convs), exit flow (a block to 1024 at
    stride 2, separable convs to 1536 and 2048), global pool, fc. Input 299x299."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        _check(1.0, num_classes)
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = XceptionBlock(64, 128, 2, 2, start_with_relu=False)
        self.block2 = XceptionBlock(128, 256, 2, 2)
        self.block3 = XceptionBlock(256, 728, 2, 2)
        for i in range(4, 12):
            setattr(self, f"block{i}", XceptionBlock(728, 728, 3, 1))
        self.block12 = XceptionBlock(728, 1024, 2, 2, grow_first=False)
        self.conv3 = XceptionSeparable(1024, 1536)
        self.bn3 = nn.BatchNorm2d(1536)
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = XceptionSeparable(1536, 2048)
        self.bn4 = nn.BatchNorm2d(2048)
        self.act4 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        for i in range(1, 13):
            x = getattr(self, f"block{i}")(x)
        x = self.act4(self.bn4(self.conv4(self.act3(self.bn3(self.conv3(x))))))
        return self.fc(x.mean([2, 3]))


def xception(num_classes: int = 1000) -> Xception:
    """Xception (x: (N, 3, H, W) -> (N, num_classes); seed 002), 22,855,952 parameters,
    34 depthwise separable convs."""
    return Xception(num_classes)


# --- squeeze-and-excitation networks -----------------------------------------------------

class SqueezeExcitation(nn.Module):
    """x * gate(fc2(act(fc1(mean_hw(x))))): a per-image, per-channel scale (Hu et al. 2018),
    as torchvision.ops.SqueezeExcitation (fc1 / fc2 are 1x1 convs with biases)."""

    def __init__(self, channels: int, squeeze: int, activation=nn.ReLU,
                 gate=nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = gate()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class StochasticDepth(nn.Module):
    """Drops the residual branch of a whole image with probability p in training (Huang et
    al. 2016, torchvision's "row" mode); the identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class SEInvertedResidual(nn.Module):
    """MobileNetV3's InvertedResidual and EfficientNet's MBConv (torchvision's names):
    ``block`` = [1x1 expansion] -> dw k x k -> [SqueezeExcitation] -> 1x1 projection
    (linear), each conv with its BN; the input is added back when the shapes allow."""

    def __init__(self, c_in: int, hidden: int, c_out: int, kernel_size: int, stride: int,
                 se: nn.Module | None, activation, norm, drop: float | None = None) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if hidden != c_in:
            layers.append(ConvNormActivation(c_in, hidden, 1, activation=activation, norm=norm))
        layers.append(ConvNormActivation(hidden, hidden, kernel_size, stride, groups=hidden,
                                         activation=activation, norm=norm))
        if se is not None:
            layers.append(se)
        layers.append(ConvNormActivation(hidden, c_out, 1, activation=None, norm=norm))
        self.block = nn.Sequential(*layers)
        if drop is not None:  # EfficientNet's, a module even where p is 0 (torchvision's)
            self.stochastic_depth = StochasticDepth(drop)
        self.out_channels = c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        if not self.use_res_connect:
            return y
        return x + (self.stochastic_depth(y) if hasattr(self, "stochastic_depth") else y)


# (kernel, expanded, C_out, SE, activation, stride) after a 16-channel stem (Howard et al.
# 2019, Table 1; torchvision's setting)
V3_LARGE = [(3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
            (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
            (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1),
            (3, 184, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
            (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
            (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1),
            (5, 960, 160, True, "HS", 1)]


class MobileNetV3(nn.Module):
    """features: stem, 15 inverted residuals (8 with SE, hard-sigmoid gate), last conv;
    classifier: Linear -> Hardswish -> Dropout -> Linear. BN eps 1e-3, as torchvision."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        _check(1.0, num_classes)
        norm = lambda c: nn.BatchNorm2d(c, eps=0.001, momentum=0.01)  # noqa: E731
        acts = {"RE": nn.ReLU, "HS": nn.Hardswish}
        features: list[nn.Module] = [ConvNormActivation(3, 16, 3, 2, activation=nn.Hardswish,
                                                        norm=norm)]
        c = 16
        for k, hidden, c_out, use_se, act, stride in V3_LARGE:
            se = SqueezeExcitation(hidden, _make_divisible(hidden // 4), gate=nn.Hardsigmoid) \
                if use_se else None
            features.append(SEInvertedResidual(c, hidden, c_out, k, stride, se, acts[act], norm))
            c = c_out
        features.append(ConvNormActivation(c, 6 * c, 1, activation=nn.Hardswish, norm=norm))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * c, 1280), nn.Hardswish(inplace=True),
                                        nn.Dropout(dropout, inplace=True),
                                        nn.Linear(1280, num_classes))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Large (x: (N, 3, H, W) -> (N, num_classes)); 5,483,032 parameters."""
    return MobileNetV3(num_classes)


# (expansion, kernel, stride, C_in, C_out, layers) of EfficientNet-B0 (Tan and Le 2019,
# Table 1)
B0_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
             (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
             (6, 3, 1, 192, 320, 1)]


class EfficientNet(nn.Module):
    """features: stem, 7 stages of MBConv blocks (SE in every one, sigmoid gate, SiLU),
    last conv; classifier: Dropout -> Linear. Stochastic depth 0.2, rising linearly over
    the 16 blocks, as torchvision."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2,
                 stochastic_depth: float = 0.2) -> None:
        super().__init__()
        _check(1.0, num_classes)
        features: list[nn.Module] = [ConvNormActivation(3, 32, 3, 2, activation=nn.SiLU)]
        total, block = sum(stage[-1] for stage in B0_STAGES), 0
        for t, k, s, c_in, c_out, n in B0_STAGES:
            stage = []
            for i in range(n):
                c = c_in if i == 0 else c_out
                se = SqueezeExcitation(c * t, max(1, c // 4), activation=nn.SiLU)
                stage.append(SEInvertedResidual(c, c * t, c_out, k, s if i == 0 else 1, se,
                                                nn.SiLU, nn.BatchNorm2d,
                                                stochastic_depth * block / total))
                block += 1
            features.append(nn.Sequential(*stage))
        features.append(ConvNormActivation(320, 1280, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True),
                                        nn.Linear(1280, num_classes))
        _init(self)
        for m in self.classifier.modules():  # torchvision's: uniform, 1 / sqrt(classes)
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -num_classes ** -0.5, num_classes ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0 (x: (N, 3, H, W) -> (N, num_classes)); 5,288,548 parameters."""
    return EfficientNet(num_classes)


# --- ConvNeXt (Liu et al. 2022), as torchvision writes it -------------------------------

class Permute(nn.Module):
    """torch.permute as a module (torchvision.ops.misc.Permute)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor (torchvision's)."""

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                                     self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """dw 7x7 -> permute -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> permute
    -> layer scale -> stochastic depth -> + x (torchvision's CNBlock)."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]), nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim),
            nn.GELU(), nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, input: Tensor) -> Tensor:
        return self.stochastic_depth(self.layer_scale * self.block(input)) + input


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 stochastic_depth_prob: float = 0.1, num_classes: int = 1000) -> None:
        super().__init__()
        norm = lambda c: LayerNorm2d(c, eps=1e-6)  # noqa: E731
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), norm(dims[0]))]
        total, block_id = sum(depths), 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stage = []
            for _ in range(depth):  # the drop probability rises linearly over the blocks
                stage.append(CNBlock(dim, 1e-6, stochastic_depth_prob * block_id / (total - 1)))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(norm(dim), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm(dims[-1]), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(num_classes: int = 1000) -> ConvNeXt:
    """ConvNeXt-T (x: (N, 3, H, W) -> (N, num_classes)); 28,589,128 parameters, torchvision's
    module names (its weights load). Its 18 blocks' dw -> LayerNorm -> Linear -> GELU are
    what ``fuse`` turns into SeparableConv2d(norm="layernorm")."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return ConvNeXt(num_classes=num_classes)
