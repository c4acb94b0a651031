"""MobileNetV1, MobileNetV2 and ShuffleNetV2 (seed 002) built from standard ``nn`` layers.

They are what users have: dw conv -> BN -> act -> 1x1 conv -> BN -> act chains written
with ``nn.Conv2d``, so they are the inputs ``sepconv.fuse`` is tested and benchmarked on.
MobileNetV2 and ShuffleNetV2 follow torchvision's modules and attribute names (their
``state_dict`` keys and shapes are torchvision's); MobileNetV1 follows Table 1 of Howard
et al. 2017 with the last depthwise layer at stride 1, as its 7x7 output needs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mobilenet_v1", "mobilenet_v2", "shufflenet_v2"]


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, as torchvision's Conv2dNormActivation
    (children 0, 1, 2)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: type[nn.Module] | None = nn.ReLU6) -> None:
        layers = [nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2,
                            groups=groups, bias=False), nn.BatchNorm2d(c_out)]
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
