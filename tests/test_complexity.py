"""complexity(): seed 000's worked examples exactly, the other formulas, FlopCounterMode."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sepconv

SEED_INPUT = (1, 4, 5, 5)
# seed 000: (layer, FLOPs, parameters)
SEED_EXAMPLES = {
    "standard": (nn.Conv2d(4, 6, 3, padding=1, bias=False), 10650, 216),
    "grouped": (nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), 5250, 108),
    "depthwise": (nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), 1700, 36),
    "pointwise": (nn.Conv2d(4, 6, 1, bias=False), 1050, 24),
    "separable": (sepconv.SeparableConv2d(4, 6, 3, padding=1, bias=False), 2750, 60),
    "separable_pair": (nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                                     nn.Conv2d(4, 6, 1, bias=False)), 2750, 60),
}


@pytest.mark.parametrize("layer,flops,params", SEED_EXAMPLES.values(), ids=SEED_EXAMPLES.keys())
def test_seed_examples(layer, flops, params):
    report = sepconv.complexity(layer, SEED_INPUT)
    assert (report.flops, report.params) == (flops, params)


def test_separable_row_compares_with_the_standard_conv():
    report = sepconv.complexity(SEED_EXAMPLES["separable"][0], SEED_INPUT)
    (row,) = report.rows
    assert row["conv2d_flops"] == 10650 and row["R"] == pytest.approx(1 / 6 + 1 / 9)
    text = str(report)
    assert "0.2582 of the FLOPs" in text and "R = 1/C_out + 1/K^2 = 0.2778" in text


@pytest.mark.parametrize("layer,size,macs,flops,params", [
    # conv with bias: 2 * C_in * k^2 per output; MACs as fvcore / ptflops (no bias term)
    (nn.Conv2d(3, 8, 3), (2, 3, 10, 10), 3 * 9 * 8 * 8 * 8 * 2, 2 * 27 * 64 * 8 * 2, 224),
    (nn.Linear(10, 5, bias=False), (3, 10), 150, 19 * 5 * 3, 50),
    (nn.Linear(10, 5), (3, 10), 150, 20 * 5 * 3, 55),
    # (E + H) * H * 4 * 2 per step and layer; params as PyTorch holds them (two biases)
    (nn.LSTM(10, 20), (5, 3, 10), 30 * 20 * 4 * 15, 30 * 20 * 8 * 15,
     4 * (10 * 20 + 20 * 20 + 2 * 20)),
    (nn.GRU(10, 20, num_layers=2), (5, 3, 10), (30 + 40) * 20 * 3 * 15, (30 + 40) * 20 * 6 * 15,
     3 * (10 * 20 + 20 * 20 + 40) + 3 * (20 * 20 + 20 * 20 + 40)),
    (nn.BatchNorm2d(4), (1, 4, 5, 5), 0, 0, 8),  # norms: parameters, no FLOPs
])
def test_formulas(layer, size, macs, flops, params):
    report = sepconv.complexity(layer, size)
    assert (report.macs, report.flops, report.params) == (macs, flops, params)


def test_a_layer_called_twice_counts_its_flops_twice_and_its_parameters_once():
    conv = nn.Conv2d(4, 4, 1, bias=False)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    report = sepconv.complexity(model, SEED_INPUT)
    assert report.flops == 2 * (2 * 4 - 1) * 25 * 4 and report.params == 16
    assert sum(r["params"] for r in report.rows) == 16


def test_mobilenet_v2_totals():
    report = sepconv.complexity(sepconv.models.mobilenet_v2(), (1, 3, 224, 224))
    assert report.params == 3_504_872
    assert report.macs == 300_774_272  # torchvision's "0.30 GFLOPS" are these MACs
    assert len(report.by_name()) == len([m for m in sepconv.models.mobilenet_v2().modules()
                                         if next(m.children(), None) is None])


def test_flop_counter_mode_counts_the_op_as_the_pair():
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    sep = sepconv.SeparableConv2d(32, 64, 3, padding=1)
    pair = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 64, 1))
    counts = []
    for model in (sep, pair):
        with FlopCounterMode(display=False) as counter:
            model(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 256 * (32 * 9 + 32 * 64)
    with FlopCounterMode(display=False) as counter:
        sep(x).sum().backward()
    assert counter.get_total_flops() == 3 * counts[0]  # forward + 2x for the gradients


@pytest.mark.parametrize("size", [(), (1, 4, -5, 5), "1x4x5x5"])
def test_bad_input_size(size):
    with pytest.raises(ValueError, match="input_size"):
        sepconv.complexity(nn.Conv2d(4, 4, 1), size)
