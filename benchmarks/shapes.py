"""Benchmark shapes of DESIGN.md: one Layer per separable conv of each suite."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    c_in: int
    hw: int  # input height = width
    c_out: int
    stride: int = 1
    kernel: int = 3
    mid_activation: str | None = "relu"
    activation: str | None = "relu"
    groups: int = 1  # the pointwise conv's (ShuffleNetV1)
    norm: bool = False  # LayerNorm over the mid channels between the convs (ConvNeXt)

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def flops(self, batch: int, backward: bool = False) -> int:
        """Multiply-adds of both stages, counted as 2 flops each; the backward pass
        (grad of the input and of the weights) counted as twice the forward."""
        pixels = batch * self.out_hw**2
        return 2 * pixels * self.c_in * (self.kernel**2 + self.c_out // self.groups) \
            * (3 if backward else 1)

    def min_bytes(self, batch: int, itemsize: int, backward: bool = False) -> int:
        """Forward: x read once, y written once, weights read once. With the backward
        pass: x and grad_y read, grad_x written, weights read and their grads written."""
        x, y = batch * self.c_in * self.hw**2, batch * self.c_out * self.out_hw**2
        w = self.c_in * (self.kernel**2 + 1) + self.c_out * (self.c_in // self.groups + 1)
        elems = 3 * x + 2 * y + 3 * w if backward else x + y + w
        return elems * itemsize

    def name(self) -> str:
        name = f"{self.c_in}x{self.hw}->{self.c_out}/s{self.stride}/k{self.kernel}"
        return name + (f"/g{self.groups}" if self.groups > 1 else "") + ("/ln" if self.norm else "")


def _mobilenet_v1() -> list[Layer]:
    spec = [(32, 112, 64, 1), (64, 112, 128, 2), (128, 56, 128, 1), (128, 56, 256, 2),
            (256, 28, 256, 1), (256, 28, 512, 2)] + [(512, 14, 512, 1)] * 5 \
        + [(512, 14, 1024, 2), (1024, 7, 1024, 1)]
    return [Layer(c, hw, co, s) for c, hw, co, s in spec]


def _mobilenet_v2() -> list[Layer]:
    # (expansion t, output channels c, repeats n, first stride s) at 224x224
    blocks = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, c_in, hw = [], 32, 112
    for t, c, n, s in blocks:
        for i in range(n):
            stride = s if i == 0 else 1
            layers.append(Layer(c_in * t, hw, c, stride, 3, "relu6", None))
            hw, c_in = (hw + 2 - 3) // stride + 1, c
    return layers


def _xception() -> list[Layer]:
    return [Layer(728, 19, 728, 1, 3, None, None)] * 3  # one middle-flow block


def _convnext() -> list[Layer]:
    """ConvNeXt-T's block per stage: dw 7x7 -> LayerNorm -> Linear(C, 4C) -> GELU (the pair
    as torchvision's CNBlock runs it: layers.pytorch_pair)."""
    return [Layer(c, hw, 4 * c, 1, 7, None, "gelu", norm=True)
            for c, hw in ((96, 56), (192, 28), (384, 14), (768, 7))]


def _shufflenet_v2() -> list[Layer]:
    """The 19 chains fuse() takes in sepconv.models.shufflenet_v2() (width 1.0): dw 3x3
    -> BN -> 1x1 -> BN -> ReLU, per stage a stride-2 unit (both branches) and then
    stride-1 units (branch 2 only, on half the channels)."""
    layers, c_in, hw = [], 24, 56
    for half, repeats in ((58, 4), (116, 8), (232, 4)):
        layers += [Layer(c, hw, half, 2, 3, None, "relu") for c in (c_in, half)]
        hw = (hw - 1) // 2 + 1
        layers += [Layer(half, hw, half, 1, 3, None, "relu")] * (repeats - 1)
        c_in = 2 * half
    return layers


def _shufflenet_v1(groups: int = 3) -> list[Layer]:
    """The 16 chains fuse() takes in sepconv.models.shufflenet_v1(groups): dw 3x3 -> BN ->
    1x1 group conv -> BN on each unit's bottleneck (a quarter of the stage's channels),
    per stage a stride-2 unit (out: the stage's channels less the input's, concatenated
    with the pooled input) and then stride-1 units. (The channel shuffle before the dw
    conv stays a module: not measured here.)"""
    from sepconv.models import SHUFFLE_V1_CHANNELS
    layers, c_in, hw = [], 24, 56
    for c_out, repeats in zip(SHUFFLE_V1_CHANNELS[groups], (4, 8, 4)):
        mid = c_out // 4
        layers.append(Layer(mid, hw, c_out - c_in, 2, 3, None, None, groups))
        hw = (hw - 1) // 2 + 1
        layers += [Layer(mid, hw, c_out, 1, 3, None, None, groups)] * (repeats - 1)
        c_in = c_out
    return layers


SUITES = {
    "tiny": [Layer(8, 12, 16, 1), Layer(16, 11, 8, 2, 5, "relu6", None)],  # harness tests
    "mobilenet_v1": _mobilenet_v1(),
    "mobilenet_v2": _mobilenet_v2(),
    "xception": _xception(),
    "convnext": _convnext(),
    "shufflenet_v2": _shufflenet_v2(),
    "shufflenet_v1": _shufflenet_v1(),
}
