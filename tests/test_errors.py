"""Every bad call raises a clear ValueError / TypeError naming the problem."""

import pytest
import torch

import sepconv
from sepconv import separable_conv2d as sep

X = torch.randn(2, 4, 8, 8)
DW = torch.randn(4, 1, 3, 3)
PW = torch.randn(6, 4, 1, 1)

BAD_CALLS = {
    "2d_input": (ValueError, "4 dims", lambda: sep(torch.randn(8, 8), DW, PW)),
    "5d_input": (ValueError, "4 dims", lambda: sep(torch.randn(1, 2, 4, 8, 8), DW, PW)),
    "not_a_tensor": (TypeError, "x must be a Tensor", lambda: sep([[1.0]], DW, PW)),
    "channel_mismatch": (ValueError, "not a positive multiple",
                         lambda: sep(torch.randn(2, 3, 8, 8), DW, PW)),
    "dw_weight_shape": (ValueError, "depthwise_weight of shape",
                        lambda: sep(X, torch.randn(4, 2, 3, 3), PW)),
    "pw_weight_shape": (ValueError, "pointwise_weight of shape",
                        lambda: sep(X, DW, torch.randn(6, 5, 1, 1))),
    "pw_not_1x1": (ValueError, "pointwise_weight of shape",
                   lambda: sep(X, DW, torch.randn(6, 4, 3, 3))),
    "bias_shape": (ValueError, "bias of shape", lambda: sep(X, DW, PW, torch.randn(5))),
    "dw_bias_shape": (ValueError, "depthwise_bias of shape",
                      lambda: sep(X, DW, PW, depthwise_bias=torch.randn(3))),
    "dtype_mismatch": (TypeError, "dtype", lambda: sep(X.double(), DW, PW)),
    "integer_x": (TypeError, "floating-point", lambda: sep(X.long(), DW, PW)),
    "bool_weight": (TypeError, "floating-point", lambda: sep(X, DW.bool(), PW)),
    "complex_x": (TypeError, "floating-point",
                  lambda: sep(X.to(torch.complex64), DW, PW)),
    "device_mismatch": (ValueError, "meta", lambda: sep(X, DW.to("meta"), PW)),
    "meta_input": (ValueError, "meta tensor", lambda: sep(X.to("meta"), DW.to("meta"),
                                                          PW.to("meta"))),
    "kernel_too_large": (ValueError, "larger than the padded input",
                         lambda: sep(torch.randn(1, 4, 2, 8), DW, PW)),
    "dilated_kernel_too_large": (ValueError, "larger than the padded input",
                                 lambda: sep(X, DW, PW, dilation=4)),
    "empty_spatial": (ValueError, "empty spatial", lambda: sep(torch.randn(1, 4, 0, 8), DW, PW)),
    "stride_zero": (ValueError, "stride must be >= 1", lambda: sep(X, DW, PW, stride=0)),
    "stride_negative": (ValueError, "stride must be >= 1", lambda: sep(X, DW, PW, stride=(1, -2))),
    "dilation_zero": (ValueError, "dilation must be >= 1", lambda: sep(X, DW, PW, dilation=0)),
    "negative_padding": (ValueError, "padding must be >= 0", lambda: sep(X, DW, PW, padding=-1)),
    "float_stride": (TypeError, "stride must be an int", lambda: sep(X, DW, PW, stride=1.5)),
    "bool_padding": (TypeError, "padding must be an int", lambda: sep(X, DW, PW, padding=True)),
    "triple_stride": (TypeError, "stride must be an int", lambda: sep(X, DW, PW, stride=(1, 1, 1))),
    "unknown_padding": (ValueError, "padding must be", lambda: sep(X, DW, PW, padding="full")),
    "same_with_stride": (ValueError, "strided", lambda: sep(X, DW, PW, stride=2, padding="same")),
    "unknown_activation": (ValueError, "unknown activation",
                           lambda: sep(X, DW, PW, activation="gelu")),
    "unknown_mid_activation": (ValueError, "unknown mid_activation",
                               lambda: sep(X, DW, PW, mid_activation="tanh")),
    "module_groups": (ValueError, "groups", lambda: sepconv.SeparableConv2d(4, 4, 3, groups=4)),
    "module_zero_channels": (ValueError, "in_channels",
                             lambda: sepconv.SeparableConv2d(0, 4, 3)),
    "module_padding_mode": (ValueError, "padding_mode",
                            lambda: sepconv.SeparableConv2d(4, 4, 3, padding_mode="mirror")),
    "module_bad_kernel": (ValueError, "kernel_size", lambda: sepconv.SeparableConv2d(4, 4, 0)),
    "module_5d": (ValueError, r"\(N, C, H, W\)",
                  lambda: sepconv.SeparableConv2d(4, 4, 3)(torch.randn(1, 1, 4, 8, 8))),
    "module_wrong_channels": (ValueError, "multiple",
                              lambda: sepconv.SeparableConv2d(4, 4, 3)(torch.randn(1, 3, 8, 8))),
    "unknown_backend": (ValueError, "unknown backend",
                        lambda: sepconv.use_backend("cudnn").__enter__()),
}


@pytest.mark.parametrize("error,match,call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises(error, match, call):
    with pytest.raises(error, match=match):
        call()


def test_native_rejects_inconsistent_geometry():
    """The C++ layer re-checks what decides where it reads and writes."""
    _C = pytest.importorskip("sepconv._C")
    good = (1, 1, 4, 4, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, False, 0, 0, 1)
    for i, value, what in [(16, 5, "output size"), (6, 0, "kernel"), (8, 0, "stride"),
                           (10, -1, "padding"), (19, 9, "activation"), (21, 0, "threads"),
                           (0, -1, "N >= 0")]:
        geom = list(good)
        geom[i] = value
        with pytest.raises(ValueError, match=what):
            _C.forward(tuple(geom), "float32", 0, 0, 0, 0, 0, 0)
    with pytest.raises(TypeError, match="float16"):
        _C.forward(good, "float16", 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="overflow"):
        _C.forward((2**40, 2**20, 4, 4, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, False,
                    0, 0, 1), "float32", 0, 0, 0, 0, 0, 0)


def test_backend_errors_are_explicit():
    with sepconv.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        sep(X.double(), DW.double(), PW.double())
    with sepconv.use_backend("native"), pytest.raises(RuntimeError, match="bfloat16"):
        sep(X.bfloat16(), DW.bfloat16(), PW.bfloat16())
