"""The Triton kernels: what the shared path tests in test_functional do not cover.

Without a GPU they run on CPU tensors in Triton's interpreter (conftest switches it on);
on a GPU the same tests run natively on CUDA tensors.
"""

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from conftest import TRITON_DEVICE, assert_compiled_matches_eager, check_against_oracle, make_inputs
from test_functional import CASES, LAYOUTS

import sepconv
from benchmarks.models import saved_bytes
from sepconv import _ops, _triton

pytestmark = pytest.mark.skipif(not _triton.installed(), reason="triton is not installed")
DEVICE = dict(device=TRITON_DEVICE)
OP = torch.ops.sepconv.separable_conv2d


@pytest.fixture(autouse=True)
def triton_backend():
    with sepconv.use_backend("triton"):
        yield


FP16_CASES = ["base", "k1", "k7", "stride2", "dilation2", "multiplier2", "C1", "wide", "batch0"]


@pytest.mark.parametrize("case", FP16_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float16(case, layout):
    # test_functional runs float16 on a GPU; in the interpreter it is this subset
    N, C, H, W, m, Co, k, s, p, d = CASES[case]
    check_against_oracle(dict(dtype=torch.float16, **DEVICE), make_inputs(N, C, H, W, m, Co, k),
                         s, p, d, "silu", "relu6", layout=LAYOUTS[layout])


@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="GPU only: the interpreter does not "
                    "autotune (benchmarks.triton_fit compiles the autotune configs here)")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_autotuned_launch(monkeypatch, layout):
    """The default GPU path: block sizes chosen by timing (the other GPU tests may run
    with SEPCONV_TRITON_AUTOTUNE=0, to compile each variant once)."""
    from sepconv.triton_kernels import _common
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    N, C, H, W, m, Co, k, s, p, d = CASES["wide"]
    check_against_oracle(dict(dtype=torch.bfloat16, **DEVICE), make_inputs(N, C, H, W, m, Co, k),
                         s, p, d, "relu", "relu6", layout=LAYOUTS[layout])


@pytest.mark.skipif(TRITON_DEVICE == "cuda", reason="a GPU runs these blocks in every test")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_block_sizes_in_the_interpreter(monkeypatch, dtype, layout):
    """The interpreter's tests use small blocks; the fixed blocks a GPU takes (float32's
    narrower ones for its FMA dot, _mid's 32 mid channels) are checked here, on a layer
    that spans several of them in pixels, mid and output channels."""
    from sepconv.triton_kernels import backward, forward
    monkeypatch.setattr(forward, "INTERPRET", False)
    monkeypatch.setattr(backward, "INTERPRET", False)
    assert forward._fixed_config(70, forward.wide_blocks("ieee", False, 90))["BLOCK_CO"] == 64
    check_against_oracle(dict(dtype=dtype, **DEVICE), make_inputs(2, 40, 9, 9, 1, 70, 3), 1, 1, 1,
                         "relu", "silu", layout=LAYOUTS[layout])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_split_forward(monkeypatch, case, layout):
    """The depthwise once into a buffer, then the pointwise GEMM over it
    (splits_depthwise), forced on every case: forward and every gradient (silu's dL/dz
    runs it with GRAD)."""
    from sepconv.triton_kernels import forward
    monkeypatch.setattr(forward, "SPLIT", "always")
    N, C, H, W, m, Co, k, s, p, d = CASES[case]
    check_against_oracle(dict(dtype=torch.float32, **DEVICE), make_inputs(N, C, H, W, m, Co, k),
                         s, p, d, "relu6", "silu", layout=LAYOUTS[layout])


@pytest.mark.parametrize("case", ["base", "k7", "stride2", "dilation2", "multiplier2", "C1"])
@pytest.mark.parametrize("split", ["never", "always"])
def test_nchw_channel_fast_taps(monkeypatch, case, split):
    """NCHW with its taps read as [pixels, channels] tiles (SEPCONV_TRITON_PIXEL_FAST=
    never, the other side of the GPU A/B); the default, [channels, pixels], is what
    every other NCHW test runs."""
    from sepconv.triton_kernels import _common, forward
    monkeypatch.setattr(_common, "PIXEL_FAST", "never")
    monkeypatch.setattr(forward, "SPLIT", split)
    N, C, H, W, m, Co, k, s, p, d = CASES[case]
    check_against_oracle(dict(dtype=torch.float32, **DEVICE), make_inputs(N, C, H, W, m, Co, k),
                         s, p, d, "relu", "hardswish")


def test_split_rule():
    from sepconv.triton_kernels.forward import splits_depthwise
    assert not splits_depthwise(128, 3, 3, 128)  # one column block: nothing recomputed
    assert not splits_depthwise(256, 3, 3, 128)  # two 3x3 blocks: 18 taps redone
    assert splits_depthwise(512, 3, 3, 128)
    assert splits_depthwise(256, 7, 7, 128) and not splits_depthwise(128, 7, 7, 128)
    assert splits_depthwise(256, 3, 3, 64)  # float32's and NCHW's blocks are 64 wide


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("nchw", [False, True])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fixed_blocks_are_among_those_that_fit(precision, nchw, cc):
    """The fixed blocks obey the rule the autotune pruning applies (fits), and the
    pruning leaves a candidate for every case; benchmarks.triton_fit checks the rule
    itself against the compiler."""
    from sepconv.triton_kernels import forward
    bp, bco = forward.wide_blocks(precision, nchw, cc)
    assert forward.fits(bp, bco, 32, 4, precision, nchw, cc)
    assert any(forward.fits(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_K"],
                            c.num_warps, precision, nchw, cc) for c in forward._CONFIGS)
    expected = {("tf32", False, 90): (64, 128), ("tf32", False, 80): (64, 64),
                ("ieee", True, 90): (32, 32), ("ieee", True, 80): (32, 32)}
    assert (bp, bco) == expected.get((precision, nchw, cc), (32, 64))
    # GELU's epilogue beside float32's FMA dot: 32 output channels at most
    bp, bco = forward.wide_blocks(precision, nchw, cc, gelu=True)
    assert forward.fits(bp, bco, 32, 4, precision, nchw, cc, gelu=True)
    assert any(forward.fits(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_K"],
                            c.num_warps, precision, nchw, cc, True) for c in forward._CONFIGS)
    assert bco == (32 if precision == "ieee" else expected.get((precision, nchw, cc), (32, 64))[1])


def test_host_helpers_match_triton():
    """cdiv / next_pow2 stand in for triton's (5 us a call on the host) in the launches."""
    import triton
    from sepconv.triton_kernels._common import cdiv, next_pow2
    for n in range(1, 3000):
        assert next_pow2(n) == triton.next_power_of_2(n)
        for d in (1, 7, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d)


def _grads(x, dw, pw, b, bd):
    y = sepconv.separable_conv2d(x, dw, pw, b, 2, 1, depthwise_bias=bd, mid_activation="relu",
                                 activation="silu")
    return torch.autograd.grad(y, (x, dw, pw, b, bd), torch.ones_like(y))


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradients_are_reproducible(deterministic):
    """Weight gradients are summed in a fixed order (no float atomics): bit-identical
    on every run, and allowed under torch.use_deterministic_algorithms."""
    inputs = [t.to(dtype=torch.float32, **DEVICE).requires_grad_()
              for t in make_inputs(3, 20, 17, 15, 1, 24, 3)]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        first, second = _grads(*inputs), _grads(*inputs)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_training_keeps_less_than_the_conv2d_pair():
    """Forward saves x and the weights, not the intermediate: less than the pair."""
    x, dw, pw, b, bd = (t.to(dtype=torch.float32, **DEVICE).requires_grad_()
                        for t in make_inputs(2, 16, 12, 12, 2, 24, 3))
    ours = saved_bytes(lambda: sepconv.separable_conv2d(
        x, dw, pw, b, 1, 1, depthwise_bias=bd, mid_activation="relu", activation="relu"))
    F = torch.nn.functional
    pair = saved_bytes(lambda: F.relu(F.conv2d(F.relu(F.conv2d(x, dw, bd, 1, 1, groups=16)),
                                                pw, b)))
    weights = sum(t.numel() * 4 for t in (dw, pw, b, bd))
    assert ours <= x.numel() * 4 + weights < pair


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sepconv.SeparableConv2d(5, 16, 3, padding=1, mid_activation="relu", activation="relu"),
        sepconv.SeparableConv2d(16, 8, 5, stride=2, padding="valid", depthwise_bias=True),
    ).to(**DEVICE)
    x = torch.randn(2, 5, 16, 16, **DEVICE).to(memory_format=torch.channels_last)
    assert_compiled_matches_eager(model, [x])


def test_opcheck():
    x, dw, pw, b, bd = (t.to(dtype=torch.float32, **DEVICE)
                        for t in make_inputs(2, 3, 7, 6, 2, 5, 3))
    args = (x.requires_grad_(), dw.requires_grad_(), pw, bd, b, [2, 1], [1, 0, 2, 1], [1, 2],
            "relu", "silu", "triton")
    torch.library.opcheck(OP, args)


def test_float64_is_refused():
    x, dw, pw, b, bd = (t.to(**DEVICE) for t in make_inputs(1, 3, 5, 5, 1, 4, 3))
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        sepconv.separable_conv2d(x, dw, pw, b)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="about CPU tensors")
def test_cpu_tensors_need_the_interpreter():
    code = ("import torch, sepconv\n"
            "with sepconv.use_backend('triton'):\n"
            "    sepconv.separable_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3),"
            " torch.randn(3, 2, 1, 1))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "TRITON_INTERPRET=1" in r.stderr, r.stderr


def test_cuda_without_triton_warns_once_and_takes_the_reference(monkeypatch):
    monkeypatch.setattr(_triton, "installed", lambda: False)
    monkeypatch.setattr(_ops, "_warned_no_triton", False)
    cuda_x = types.SimpleNamespace(device=torch.device("cuda"), is_cpu=False,
                                   dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert _ops._impl(cuda_x, "auto") is sepconv.reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ops._impl(cuda_x, "auto") is sepconv.reference
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        _ops._impl(cuda_x, "triton")


def test_more_than_int32_pixels_is_refused():
    x = torch.zeros(1, 1, 1, 1, **DEVICE).expand(2**15, 1, 2**8, 2**8)  # 2^31 pixels, no memory
    w = torch.ones(1, 1, 1, 1, **DEVICE)
    with pytest.raises(ValueError, match="2\\^31 pixels"):
        sepconv.separable_conv2d(x, w, w)
