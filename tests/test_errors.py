"""Every bad call raises a clear ValueError / TypeError / RuntimeError naming the problem,
and the process survives it.

The catalogue runs in a child process (this file, run as a script), so that a crash in
native code fails these tests instead of ending the whole run.
"""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

import sepconv
from sepconv import separable_conv2d as sep
from sepconv._backend import _C

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
    "unknown_activation": (ValueError, "unknown activation",
                           lambda: sep(X, DW, PW, activation="mish")),
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
    # sizes past what any tensor can hold, and hyper-parameters that are not numbers
    "huge_padding": (ValueError, r"padding must be < 2\*\*31",
                     lambda: sep(X, DW, PW, padding=2**40)),
    "padding_past_int64": (ValueError, r"padding must be < 2\*\*31",
                           lambda: sep(X, DW, PW, padding=2**63)),
    "huge_stride": (ValueError, r"stride must be < 2\*\*31", lambda: sep(X, DW, PW, stride=2**63)),
    "huge_dilation": (ValueError, r"dilation must be < 2\*\*31",
                      lambda: sep(X, DW, PW, dilation=2**40)),
    "output_past_int64": (RuntimeError, "overflow", lambda: sep(X, DW, PW, padding=2**30)),
    "output_past_memory": (RuntimeError, "allocate",  # 2^40 images as a view of one
                           lambda: sep(torch.randn(1, 4, 8, 8).expand(2**40, 4, 8, 8), DW, PW)),
    "nan_stride": (TypeError, "stride must be an int", lambda: sep(X, DW, PW, stride=math.nan)),
    "inf_padding": (TypeError, "padding must be an int",
                    lambda: sep(X, DW, PW, padding=(1, math.inf))),
    "none_padding": (TypeError, "padding must be an int", lambda: sep(X, DW, PW, padding=None)),
    "string_stride": (TypeError, "stride must be an int", lambda: sep(X, DW, PW, stride="2")),
    "int_activation": (ValueError, "unknown activation", lambda: sep(X, DW, PW, activation=3)),
    "string_bias": (TypeError, "depthwise_bias must be a Tensor",
                    lambda: sep(X, DW, PW, depthwise_bias="x")),
    "none_input": (TypeError, "x must be a Tensor", lambda: sep(None, DW, PW)),
    "complex_weight": (TypeError, "floating-point", lambda: sep(X, DW, PW.to(torch.complex64))),
    "3d_dw_weight": (ValueError, "depthwise_weight of shape", lambda: sep(X, DW[0], PW)),
    "module_inf_kernel": (TypeError, "kernel_size must be an int",
                          lambda: sepconv.SeparableConv2d(4, 4, math.inf)),
    "module_huge_kernel": (ValueError, r"kernel_size must be < 2\*\*31",
                           lambda: sepconv.SeparableConv2d(4, 4, 2**40)),
    "module_nan_stride": (TypeError, "stride must be an int",
                          lambda: sepconv.SeparableConv2d(4, 4, 3, stride=math.nan)),
    "module_float_channels": (ValueError, "in_channels must be a positive int",
                              lambda: sepconv.SeparableConv2d(4.5, 4, 3)),
    "module_multiplier_zero": (ValueError, "depth_multiplier",
                               lambda: sepconv.SeparableConv2d(4, 4, 3, depth_multiplier=0)),
    "module_dtype": (TypeError, "dtype", lambda: sepconv.SeparableConv2d(4, 4, 3)(X.double())),
    "module_integer_input": (TypeError, "floating-point",
                             lambda: sepconv.SeparableConv2d(4, 4, 3)(X.long())),
    "module_reflect_past_input": (RuntimeError, "Padding size should be less",  # as nn.Conv2d
                                  lambda: sepconv.SeparableConv2d(4, 4, 3, padding=9,
                                                                  padding_mode="reflect")(X)),
}

# The C++ layer re-checks what decides where it reads and writes: a geometry tuple with
# one entry spoiled must be refused before any pointer (all null here) is touched.
GOOD_GEOMETRY = (1, 1, 4, 4, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, False, 0, 0, 1)


def _native(geometry, dtype="float32"):
    return lambda: _C.forward(tuple(geometry), dtype, 0, 0, 0, 0, 0, 0, 0)


if _C is not None:
    for index, value, what in [(16, 5, "output size"), (6, 0, "kernel"), (8, 0, "stride"),
                               (10, -1, "padding"), (19, 9, "activation"), (21, 0, "threads"),
                               (0, -1, "N >= 0")]:
        spoiled = list(GOOD_GEOMETRY)
        spoiled[index] = value
        BAD_CALLS[f"native_geometry_{index}"] = (ValueError, what, _native(spoiled))
    BAD_CALLS["native_float16"] = (TypeError, "float16", _native(GOOD_GEOMETRY, "float16"))
    BAD_CALLS["native_size_overflow"] = (ValueError, "overflow",
                                         _native((2**40, 2**20) + GOOD_GEOMETRY[2:]))
    BAD_CALLS["native_y_layout"] = (ValueError, "y_layout", lambda: _C.forward(
        GOOD_GEOMETRY, "float32", 0, 0, 0, 0, 0, 0, 0, 2))


def _outcomes() -> dict:
    """{case: (names of the raised exception's classes, message)} for every bad call."""
    seen = {}
    for name, (_, _, call) in BAD_CALLS.items():
        try:
            call()
            seen[name] = ([], "no exception")
        except Exception as exc:
            seen[name] = ([c.__name__ for c in type(exc).__mro__], str(exc))
    return seen


@pytest.fixture(scope="module")
def outcomes():
    child = subprocess.run([sys.executable, "-X", "faulthandler", __file__],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, (f"the catalogue's process died (exit {child.returncode}):\n"
                                   f"{child.stderr[-4000:]}")
    return json.loads(child.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_raises(outcomes, name):
    error, match, _ = BAD_CALLS[name]
    classes, message = outcomes[name]
    assert error.__name__ in classes, f"expected {error.__name__}, got {classes[:1]}: {message}"
    assert re.search(match, message), f"{message!r} does not name the problem ({match!r})"


def test_backend_errors_are_explicit():
    with sepconv.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        sep(X.double(), DW.double(), PW.double())
    with sepconv.use_backend("native"), pytest.raises(RuntimeError, match="bfloat16"):
        sep(X.bfloat16(), DW.bfloat16(), PW.bfloat16())


if __name__ == "__main__":
    print(json.dumps(_outcomes()))


def test_memoised_calls_keep_their_checks():
    """The functional memoises the signatures of checked calls (tensor types, shapes,
    dtypes, devices; hyper-parameters with their types). A bad call equal to a good one
    (True == 1, 1.0 == 1, same shapes in another dtype or with a weight on another
    device) is still refused after the good one was seen, and lists work as tuples."""
    from sepconv import functional

    x, dw, pw = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), torch.randn(3, 2, 1, 1)
    want = sepconv.separable_conv2d(x, dw, pw, padding=1, stride=(1, 1))
    sepconv.separable_conv2d(x, dw, pw, padding=(1, 1), stride=1)  # both forms now seen
    seen = len(functional._CALLS)
    sepconv.separable_conv2d(x, dw, pw, padding=(1, 1), stride=1)
    assert len(functional._CALLS) == seen  # a hit: the memo is in use
    for padding, stride in ((True, 1), (1, (True, 1)), ((1, True), 1), (1.0, 1), (1, (1.0, 1))):
        with pytest.raises(TypeError, match="must be an int"):
            sepconv.separable_conv2d(x, dw, pw, padding=padding, stride=stride)
    with pytest.raises(ValueError, match="unknown activation"):
        sepconv.separable_conv2d(x, dw, pw, padding=1, activation=("relu",))
    with pytest.raises(TypeError, match="floating-point"):
        sepconv.separable_conv2d(x, dw.int(), pw, padding=1, stride=(1, 1))
    with pytest.raises(TypeError, match="has dtype"):
        sepconv.separable_conv2d(x, dw, pw.double(), padding=1, stride=(1, 1))
    with pytest.raises(ValueError, match="meta"):
        sepconv.separable_conv2d(x, dw.to("meta"), pw, padding=1, stride=(1, 1))
    on_meta = sepconv.separable_conv2d(x.to("meta"), dw.to("meta"), pw.to("meta"), padding=1,
                                       stride=(1, 1))  # shapes only, a separate memo entry
    assert on_meta.is_meta and on_meta.shape == want.shape
    with pytest.raises(TypeError, match="must be a Tensor"):
        sepconv.separable_conv2d(x, dw, pw.numpy(), padding=1, stride=(1, 1))
    torch.testing.assert_close(sepconv.separable_conv2d(x, dw, pw, padding=[1, 1],
                                                        stride=[1, 1]), want)
