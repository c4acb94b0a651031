"""Forward and every gradient against the float64 nn.Conv2d pair, on every path."""

import pytest
import torch
from conftest import (
    ACTS,
    ISAS,
    TRITON_DEVICE,
    TRITON_DTYPES,
    check_against_oracle,
    make_inputs,
    oracle,
)
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import sepconv
from sepconv import _backend, _triton
from sepconv._backend import _C

# (N, C, H, W, m, Co, kernel, stride, padding, dilation): a base case, then one or two
# knobs moved at a time, so that every value of every knob is covered.
CASES = {
    "base": (2, 3, 9, 11, 1, 5, 3, 1, 1, 1),
    "k1": (2, 4, 7, 6, 1, 6, 1, 1, 0, 1),
    "k2_same": (2, 3, 8, 9, 1, 4, 2, 1, "same", 1),
    "k5": (1, 5, 13, 12, 1, 7, 5, 1, 2, 1),
    "k7": (2, 2, 13, 13, 1, 3, 7, 1, 3, 1),
    "k3x5_same": (2, 3, 9, 10, 1, 4, (3, 5), 1, "same", 1),
    "k2x4_same": (1, 4, 7, 9, 1, 5, (2, 4), 1, "same", 1),
    "k2x4_dil2_same": (1, 3, 11, 12, 1, 4, (2, 4), 1, "same", 2),
    "stride2": (2, 4, 13, 11, 1, 6, 3, 2, 1, 1),
    "stride3": (2, 3, 13, 13, 1, 5, 3, 3, 1, 1),
    "stride3_k5_pad2": (1, 3, 13, 7, 1, 4, 5, 3, 2, 1),
    "pad0": (2, 3, 9, 9, 1, 4, 3, 1, 0, 1),
    "pad2": (2, 3, 7, 9, 1, 4, 3, 1, 2, 1),
    "valid": (2, 3, 9, 8, 1, 4, 3, 1, "valid", 1),
    "same_k5": (2, 3, 9, 8, 1, 4, 5, 1, "same", 1),
    # TensorFlow's SAME at stride > 1 (timm's Conv2dSame): the padding depends on the size
    "same_stride2_odd": (2, 3, 9, 11, 1, 4, 3, 2, "same", 1),
    "same_stride2_even_k5": (2, 3, 10, 8, 1, 4, 5, 2, "same", 1),
    "same_stride3_k2x4_dil2": (1, 3, 11, 12, 1, 4, (2, 4), 3, "same", 2),
    "dilation2": (2, 3, 13, 11, 1, 4, 3, 1, 2, 2),
    "dilation2_stride2": (2, 3, 13, 13, 1, 4, 3, 2, 1, 2),
    "multiplier2": (2, 3, 9, 9, 2, 5, 3, 1, 1, 1),
    "multiplier3_stride2": (1, 2, 11, 9, 3, 4, 3, 2, 1, 1),
    "H1": (2, 3, 1, 9, 1, 4, 3, 1, 1, 1),
    "W1": (2, 3, 9, 1, 1, 4, 3, 1, 1, 1),
    "HW1_k1": (3, 3, 1, 1, 1, 4, 1, 1, 0, 1),
    "H7W13": (2, 3, 7, 13, 1, 4, 3, 1, 1, 1),
    "C1": (2, 1, 9, 9, 1, 3, 3, 1, 1, 1),
    "C1_Co1": (2, 1, 7, 7, 1, 1, 3, 1, 1, 1),
    "batch0": (0, 3, 9, 9, 1, 4, 3, 1, 1, 1),
    # channel counts beyond one micro-tile / vector (12 rows, 32 columns on AVX-512)
    "wide": (2, 37, 9, 7, 1, 45, 3, 1, 1, 1),
    "wide_m2": (1, 20, 6, 11, 2, 33, 3, 2, 1, 1),
    "wide_stride2": (1, 40, 13, 17, 1, 36, 3, 2, 1, 1),
    # 17 bands of 2 rows (the last of 1) per image: the NHWC backward stacks 3 bands
    # per weight-gradient GEMM, so stacks fill, flush mid-loop and end part-full
    "many_bands": (2, 5, 33, 33, 1, 7, 3, 1, 1, 1),
    "Cm256": (1, 256, 5, 6, 1, 64, 3, 1, 1, 1),  # a 1 KiB row: padded tile stride
    # spatial sizes spanning several tiles and backward bands
    "tall": (1, 3, 70, 5, 1, 4, 3, 1, 1, 1),
    "long_rows": (1, 3, 5, 150, 1, 4, 3, 1, 1, 1),
    "large_k_pad": (1, 2, 12, 12, 1, 3, 7, 2, 5, 2),
    # rows long enough for the native forward's 5- and 7-tap row segments (8 pixels,
    # AVX-512) beside single pixels and 4-pixel blocks, with channels past the last
    # whole vector
    "k7_rows": (1, 19, 9, 26, 1, 6, 7, 1, 3, 1),
    "k5_stride2_rows": (1, 17, 9, 40, 1, 5, 5, 2, 2, 1),
    "k7_stride2_rows": (1, 16, 9, 44, 1, 5, 7, 2, 3, 1),
    # images where most columns read the zero padding: the native forward's segments
    # (AVX-512) take the border pixels too, with the input columns outside the image
    # masked, 7 pixels long where 7 divides the row (7, 14, 28), and segments / blocks
    # at a row's end start early, recomputing pixels
    "k7_image7": (2, 19, 7, 7, 1, 6, 7, 1, 3, 1),
    "k7_image14": (1, 17, 14, 14, 1, 5, 7, 1, 3, 1),
    "k5_stride2_image14": (1, 17, 14, 13, 1, 5, 5, 2, 2, 1),
    "k5_image28_pad4": (1, 18, 5, 24, 1, 5, 5, 1, (1, 4), 1),
}

def _every_other_row(t, fmt):
    """A view equal to t whose rows lie two apart in a larger ``fmt`` tensor."""
    big = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], t.shape[3], dtype=t.dtype,
                      device=t.device)
    big = big.contiguous(memory_format=fmt)
    big[:, :, ::2] = t
    return big[:, :, ::2]


LAYOUTS = {
    "nchw": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided_nchw": lambda t: torch.stack([t, t], dim=-1)[..., 0],  # W stride 2
    "strided_channels_last": lambda t: _every_other_row(t, torch.channels_last),
    "transposed_hw": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
}


# The largest cases take 12-19 s each under Triton's CPU interpreter in bfloat16, a
# sixth of CI's test time. Their code paths are float32's, which runs them in full,
# and bfloat16 runs every other case; on a GPU, every dtype runs every case.
INTERPRETER_FLOAT32_ONLY = {"Cm256", "many_bands", "k7", "k7_rows", "k5_stride2_rows",
                            "k7_stride2_rows", "k7_image7", "k7_image14", "k5_stride2_image14",
                            "k5_image28_pad4"}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_shapes(path, name, layout):
    if (name in INTERPRETER_FLOAT32_ONLY and path["device"] == "cpu"
            and _backend.current_backend() == "triton" and path["dtype"] != torch.float32):
        pytest.skip("float32 runs it in the interpreter; the same code path")
    N, C, H, W, m, Co, k, s, p, d = CASES[name]
    check_against_oracle(path, make_inputs(N, C, H, W, m, Co, k), s, p, d, "relu", "hardswish",
                         layout=LAYOUTS[layout])


# Rows of 4 KiB and more (512 channels in float64): the native backward packs these
# weight-gradient stacks (GZ at Co = 520; M at Cm = 515, with a part panel), over 5
# bands per image. Native only: the Triton interpreter takes minutes at this size.
@pytest.mark.parametrize("case", [(2, 6, 20, 20, 1, 520), (2, 515, 20, 7, 1, 9)],
                         ids=["Co520", "Cm515"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_wide_rows(native_path, case, layout):
    check_against_oracle(native_path, make_inputs(*case, 3), 1, 1, 1, "relu", "hardswish",
                         layout=LAYOUTS[layout])
    check_against_oracle(native_path, make_inputs(*case, 3, seed=1), 1, 1, 1, "silu", "relu",
                         layout=LAYOUTS[layout])


# Pointwise weights beyond half of any L2 up to 4 MiB (545 x 520 in float64: 2.3 MB):
# the channels-last forward writes y by groups of weight panels, the last one part
# full (and a part panel: 520 = 32 x 16 + 8). Native only, as above.
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_weights(native_path, layout):
    check_against_oracle(native_path, make_inputs(2, 545, 6, 5, 1, 520, 3), 1, 1, 1, "relu6",
                         "silu", layout=LAYOUTS[layout])


# The same weights on 5x5 images at batch 10: the native forward joins whole images
# into a tile (3 on 2 threads, 5 on 1; the last tile part full), so that each read
# of the weights serves several images; NCHW then runs a GEMM per image and group of
# weight panels. The tile budget is raised so that any L2 takes this path.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_weights_small_images(native_path, threads, layout):
    budget, before = sepconv.backend_info()["cpu_caches"]["tile_bytes"], torch.get_num_threads()
    try:
        _C.set_tile_bytes(1 << 20)
        torch.set_num_threads(threads)
        check_against_oracle(native_path, make_inputs(10, 545, 5, 5, 1, 520, 3), 1, 1, 1,
                             "relu", None, layout=LAYOUTS[layout])
    finally:
        _C.set_tile_bytes(budget)
        torch.set_num_threads(before)


# An image larger than a quarter of any L2 up to 8 MiB (2.4 MB in float64) at batch 1:
# the native forward cuts it into more tiles than threads, so that a thread has tiles
# to come (whose input its GEMM prefetches), strided and not.
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_image(native_path, stride, layout):
    check_against_oracle(native_path, make_inputs(1, 32, 96, 97, 1, 40, 3), stride, 1, 1, "relu",
                         "relu", layout=LAYOUTS[layout])


# Images larger than half of any L2 up to 2 MiB (1.1 MB in float64) at batch 8 on 2
# threads: the native channels-last forward cuts each into tiles of at most half the
# L2 of input (tile_pixels); at stride 2 (a 32 x 33 output) more tiles than the tile
# budget alone would make (3, not 2, on a 1 MiB L2).
@pytest.mark.parametrize("stride", [1, 2])
def test_large_images_batch(native_path, stride):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        check_against_oracle(native_path, make_inputs(8, 32, 64, 65, 1, 24, 3), stride, 1, 1,
                             "relu6", None, layout=LAYOUTS["channels_last"])
    finally:
        torch.set_num_threads(before)


# The native backward's weight-gradient GEMM past its older rules: GZ^T (Co = 301, rows
# of 1.2 KiB in float32, 2.4 KiB in float64) packed because 15-57 weight panels read it,
# and the 301 x 450 accumulator (1.1 MB in float64: beyond a quarter of any L2 up to 4
# MiB) taken in whole rows across all panels; two images in 17 bands of 2 rows (NCHW:
# 12 of 3), stacks flushed several times, a part panel and a part row block (301 =
# 25 x 12 + 1). Without act2 an NCHW grad_y goes straight into the GEMM's operand.
@pytest.mark.parametrize("backward_mode", ["bands"], indirect=True)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("act2", [None, "relu"])
def test_wide_weight_gradient(native_path, backward_mode, layout, act2):
    check_against_oracle(native_path, make_inputs(2, 450, 34, 33, 1, 301, 3), 1, 1, 1, "relu",
                         act2, layout=LAYOUTS[layout])


# The gradients that are sums over every pixel (both biases', the depthwise weight's) are
# summed in blocks of pixels (kernels/backward.h: BlockSums). In float32, over 12,800
# pixels, their largest error against float64 is then 0.2-1.2x the nn.Conv2d pair's in
# float32 (here, every ISA path, layout and backward mode); added pixel by pixel into one
# accumulator per call it was 0.8-11x (the depthwise weight's at depth multiplier 2 4.9-9.8x).
@pytest.mark.skipif(_C is None, reason="extension not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_pixel_sums(isa, backward_mode, layout):
    inputs = make_inputs(8, 24, 40, 40, 2, 40, 5, seed=3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gy = torch.randn(8, 40, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(dtype, fused):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        x = leaves[0].contiguous(memory_format=fmt)
        if fused:
            y = sepconv.separable_conv2d(x, *leaves[1:4], 1, 2, depthwise_bias=leaves[4],
                                         mid_activation="gelu", activation="gelu")
        else:  # the nn.Conv2d pair, in dtype
            y = oracle(x, *leaves[1:], 1, 2, 1, "gelu", "gelu")
        return [g.double() for g in torch.autograd.grad(y, leaves[1:], gy.to(dtype))]

    previous = _C.isa()
    _C.set_isa(isa)
    try:
        ours = grads(torch.float32, True)
    finally:
        _C.set_isa(previous)
    exact, pair = grads(torch.float64, False), grads(torch.float32, False)
    for name, o, p, e in zip(["dw", "pw", "b", "b_dw"], ours, pair, exact):
        if name != "pw":  # (a GEMM's sums: not these)
            err, err_pair = (o - e).abs().max().item(), (p - e).abs().max().item()
            # as close as the pair, or within 1e-6 of the largest gradient (0.3-0.6e-6
            # here; 1.3-6.2e-6 before): the pair's own error differs with the CPU
            bound = max(2.5 * err_pair, 1e-6 * e.abs().max().item())
            assert err <= bound, f"grad {name}: {err:.2e} from float64, the pair {err_pair:.2e}"


# The native backward shares out its work in one of two ways: bands of pixels in
# parallel, or (where few bands would leave threads idle: batch 1 from 7x7 to 14x14)
# the mid channels split over the threads. Both, forced, on cases that reach each
# branch of the split: packed weight-gradient operands (rows of 4 KiB: Co = 520, and
# Cm = 515 in float64, with a part panel), a depth multiplier, several bands per image,
# z recomputed (hardswish, silu) or read from y (relu, relu6), and 1-3 threads (3: a
# team larger than Co = 40's panels on AVX-512).
# (N, C, H, W, m, Co, k, stride, act1, act2)
SPLIT_CASES = {
    "7x7_k7": (1, 70, 7, 7, 1, 40, 7, 1, "relu", "hardswish"),
    "two_images_two_bands": (2, 45, 23, 9, 1, 33, 3, 1, "relu6", "relu"),
    "m2_stride2": (1, 24, 9, 11, 2, 19, 3, 2, "silu", "relu6"),
    "Co520": (1, 40, 5, 5, 1, 520, 3, 1, None, "silu"),
    "Cm515": (1, 515, 6, 5, 1, 9, 3, 1, "hardswish", None),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_modes(native_path, backward_mode, case, threads, layout):
    N, C, H, W, m, Co, k, s, act1, act2 = SPLIT_CASES[case]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_oracle(native_path, make_inputs(N, C, H, W, m, Co, k), s, k // 2, 1,
                             act1, act2, layout=LAYOUTS[layout])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mask", [(True, False, False, False, False),
                                  (False, True, False, True, False),
                                  (False, False, True, False, True)])
def test_backward_modes_partial_gradients(native_path, backward_mode, mask):
    """Each gradient alone is the one computed with all the others (same bits)."""
    from sepconv import _native
    x, dw, pw, b, bd = (t.to(native_path["dtype"]) for t in make_inputs(1, 70, 7, 7, 1, 40, 7))
    conf = ((1, 1), (3, 3, 3, 3), (1, 1), "relu", "silu")
    gy = torch.randn(1, 40, 7, 7, dtype=x.dtype)
    full = _native.backward(gy, x, dw, pw, bd, b, *conf, (True,) * 5)
    part = _native.backward(gy, x, dw, pw, bd, b, *conf, mask)
    for want, a, e in zip(mask, part, full):
        assert (a is not None) == want
        if want:
            assert torch.equal(a, e)


@pytest.mark.skipif(_C is None, reason="extension not built")
def test_backward_mode_rule():
    """Batch 1 at 7x7 or 10x10 on 2 threads splits the channels (as bands, one thread
    idles half or 38% of the time); 14x14 (12% idle), batch 8, one thread, or too few
    channels for a panel each: bands."""
    from sepconv import _native

    def splits(N, C, hw, threads, m=1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            geom = _native._build_geometry(
                torch.empty(N, C, hw, hw), torch.empty(C * m, 1, 3, 3),
                64, (1, 1), (1, 1, 1, 1), (1, 1),
                torch.contiguous_format, "relu", "relu")
        finally:
            torch.set_num_threads(before)
        return _C.backward_splits(geom, "float32")

    assert splits(1, 768, 7, 2) and splits(1, 512, 10, 2) and not splits(1, 512, 14, 2)
    assert not splits(8, 768, 7, 2) and not splits(1, 768, 7, 1)
    assert not splits(1, 768, 56, 2) and not splits(1, 8, 7, 2)
    assert not splits(0, 768, 7, 2)
    with pytest.raises(ValueError, match="backward mode"):
        _C.set_backward_mode("channels")


# Each thread packs its own copy of the pointwise weights where every thread has 64
# output pixels or more (kernels/pack.h, own_weight_copies), else one shared copy: both
# sides of that line, on 2 and 3 threads, both layouts, a partial weight panel (Co 40).
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("H,W", [(9, 14), (8, 16), (12, 16)], ids=["126px", "128px", "192px"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_copies(native_path, threads, H, W, layout):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(1, 24, H, W, 1, 40, 3, seed=3)
        check_against_oracle(native_path, inputs, 1, 1, 1, "relu", None,
                             layout=LAYOUTS[layout])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("act1", list(ACTS), ids=str)
@pytest.mark.parametrize("act2", list(ACTS), ids=str)
def test_activations(path, act1, act2):
    # inputs scaled so that the pre-activations cross 0, +-3 and 6
    x, dw, pw, b, bd = make_inputs(2, 4, 7, 8, 1, 6, 3, seed=1)
    check_against_oracle(path, (3 * x, dw, 2 * pw, b, bd), 1, 1, 1, act1, act2)


# The native depthwise runs a row's full-tap pixels in one call, with act1 a template
# argument (dw_run): each activation over rows of 23 and 11 such pixels (whole 4-pixel
# blocks and a last block that starts early), at 20 and 40 channels (whole vectors and
# a part), stride 1 and 2. test_activations' 4 channels never reach it.
@pytest.mark.parametrize("act1", list(ACTS), ids=str)
@pytest.mark.parametrize("C,s", [(20, 1), (40, 2)], ids=["C20s1", "C40s2"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_activations_on_long_rows(native_path, act1, C, s, layout):
    x, dw, pw, b, bd = make_inputs(2, C, 9, 25, 1, 7, 3, seed=2)
    check_against_oracle(native_path, (3 * x, dw, 2 * pw, b, bd), s, 1, 1, act1, "relu",
                         layout=LAYOUTS[layout])


# The native GEMM stores whole panels of output channels with act2 a template argument
# (store_tile): each activation at 32 and 64 output channels, in both layouts (the
# 6 channels of test_activations reach only the partial-panel store).
@pytest.mark.parametrize("act2", list(ACTS), ids=str)
@pytest.mark.parametrize("Co", [32, 64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_activations_on_whole_panels(native_path, act2, Co, layout):
    x, dw, pw, b, bd = make_inputs(2, 12, 9, 13, 1, Co, 3, seed=4)
    check_against_oracle(native_path, (3 * x, dw, 2 * pw, b, bd), 1, 1, 1, None, act2,
                         layout=LAYOUTS[layout])


@pytest.mark.parametrize("bias,dw_bias", [(False, False), (True, False), (False, True)])
def test_bias_combinations(path, bias, dw_bias):
    inputs = make_inputs(2, 3, 8, 7, 2, 5, 3, bias=bias, dw_bias=dw_bias)
    check_against_oracle(path, inputs, 2, 1, 1, "relu6", None)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(path, layout):
    x = check_against_oracle(path, make_inputs(2, 5, 9, 10, 1, 6, 3), 1, 1, 1, "silu", "relu",
                             layout=LAYOUTS[layout])
    channels_last = layout in ("channels_last", "strided_channels_last")
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


def test_grad_x_keeps_memory_format(path):
    x, dw, pw, b, bd = (t.to(**path) for t in make_inputs(2, 4, 6, 6, 1, 3, 3))
    for fmt in (torch.channels_last, torch.contiguous_format):
        xf = x.contiguous(memory_format=fmt).requires_grad_()
        out = sepconv.separable_conv2d(xf, dw, pw, b, 1, 1)
        assert out.is_contiguous(memory_format=fmt)
        (g,) = torch.autograd.grad(out.sum(), xf)
        assert g.is_contiguous(memory_format=fmt)


def test_unbatched_input(path):
    x, dw, pw, b, bd = (t.to(**path) for t in make_inputs(1, 3, 7, 7, 1, 4, 3))
    sep = sepconv.separable_conv2d
    torch.testing.assert_close(sep(x[0], dw, pw, b, 1, 1), sep(x, dw, pw, b, 1, 1)[0])


# Grouped pointwise convs (ShuffleNetV1's): (N, C, H, W, m, Co, kernel, stride, padding,
# groups). Groups' widths below, at and past one GEMM panel (NR: 16 or 32 columns), an
# output group narrower than a vector (the bias read past a group's last channel), one
# mid channel per group, a depth multiplier, batch 0.
GROUPED_CASES = {
    "g3": (2, 6, 9, 11, 1, 9, 3, 1, 1, 3),
    "g3_stride2": (2, 12, 13, 11, 1, 24, 3, 2, 1, 3),
    "g2_m2": (1, 4, 7, 9, 2, 6, 3, 1, 1, 2),
    "g5_one_channel_each": (2, 5, 6, 7, 1, 10, 3, 1, 1, 5),
    "g4_wide": (1, 40, 7, 6, 1, 136, 3, 1, 1, 4),  # 34 out per group: a part second panel
    "g8_k5": (1, 16, 9, 8, 1, 24, 5, 2, 2, 8),
    "batch0": (0, 6, 5, 5, 1, 9, 3, 1, 1, 3),
}


@pytest.mark.parametrize("name", GROUPED_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grouped_pointwise(path, name, layout):
    N, C, H, W, m, Co, k, s, p, g = GROUPED_CASES[name]
    check_against_oracle(path, make_inputs(N, C, H, W, m, Co, k, groups=g), s, p, 1, "relu",
                         "hardswish", layout=LAYOUTS[layout], groups=g)


# With a squeeze-and-excitation scale of the mid channels (the functional takes both).
def test_grouped_pointwise_with_scale(path):
    x, dw, pw, b, bd = make_inputs(2, 6, 7, 8, 1, 9, 3, groups=3)
    scale = torch.rand(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    check_against_oracle(path, (x, dw, pw, b, bd, scale), 2, 1, 1, "silu", "relu", groups=3)


# Grouped weights beyond half of any L2 up to 4 MiB (1040 x 272 in float64: 2.3 MB) on
# 5x5 images at batch 10 with the tile budget raised: whole images per tile, each
# thread's own weight copy, an NCHW y by a GEMM per image and group; and at batch 1
# (one tile per image row block). Native only, as above.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("N", [1, 10])
def test_grouped_pointwise_large_weights(native_path, threads, layout, N):
    budget, before = sepconv.backend_info()["cpu_caches"]["tile_bytes"], torch.get_num_threads()
    try:
        _C.set_tile_bytes(1 << 20)
        torch.set_num_threads(threads)
        check_against_oracle(native_path, make_inputs(N, 544, 5, 5, 1, 1040, 3, groups=2), 1,
                             1, 1, "relu", None, layout=LAYOUTS[layout], groups=2)
    finally:
        _C.set_tile_bytes(budget)
        torch.set_num_threads(before)


# A channel shuffle before the depthwise conv (ShuffleNetV1), read through by the native
# kernels: (N, C, H, W, m, Co, kernel, stride, padding, pointwise groups, shuffle groups).
# Shuffles as wide as the pointwise groups and not, a depth multiplier, channels past
# one transpose block (16 / 8 lanes), batch 0.
SHUFFLE_CASES = {
    "s3_g3": (2, 6, 9, 11, 1, 9, 3, 1, 1, 3, 3),
    "s2_g3_stride2": (2, 12, 13, 11, 1, 24, 3, 2, 1, 3, 2),
    "s4_m2": (1, 8, 7, 9, 2, 8, 3, 1, 1, 1, 4),
    "s8_wide": (1, 40, 7, 6, 1, 136, 3, 1, 1, 4, 8),
    "s3_k5_dil2": (1, 18, 11, 9, 1, 12, 5, 1, 4, 3, 3),
    "batch0": (0, 6, 5, 5, 1, 9, 3, 1, 1, 3, 3),
}


@pytest.mark.parametrize("name", SHUFFLE_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_shuffle(path, name, layout):
    N, C, H, W, m, Co, k, s, p, g, sh = SHUFFLE_CASES[name]
    d = 2 if name.endswith("dil2") else 1
    check_against_oracle(path, make_inputs(N, C, H, W, m, Co, k, groups=g), s, p, d, "relu6",
                         "silu", layout=LAYOUTS[layout], groups=g, shuffle=sh)


# Strided and transposed layouts, and images of many backward bands (the even and odd
# bands add their grad_x bands back through the shuffle in two phases) on 1-3 threads.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_channel_shuffle_many_bands(native_path, threads, layout):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_against_oracle(native_path, make_inputs(2, 36, 33, 20, 1, 24, 3, groups=3), 1, 1,
                             1, "relu", None, layout=LAYOUTS[layout], groups=3, shuffle=3)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shuffle,message", [
    (0, "channel_shuffle must be a positive int"),
    (5, "does not divide the 12 input channels"),
])
def test_channel_shuffle_errors(shuffle, message):
    x, dw, pw = torch.randn(1, 12, 5, 5), torch.randn(12, 1, 3, 3), torch.randn(6, 12, 1, 1)
    with pytest.raises(ValueError, match=message):
        sepconv.separable_conv2d(x, dw, pw, channel_shuffle=shuffle)
    with pytest.raises(ValueError, match="does not go with a scale"):
        sepconv.separable_conv2d(x, dw, pw, channel_shuffle=3, scale=torch.ones(1, 12))


@pytest.mark.parametrize("groups,shape,message", [
    (0, (6, 12, 1, 1), "pointwise_groups must be a positive int"),
    (True, (6, 12, 1, 1), "pointwise_groups must be a positive int"),
    (5, (5, 2, 1, 1), "does not divide the 12 mid channels"),
    (3, (6, 12, 1, 1), r"expected pointwise_weight of shape \(C_out \(a multiple of 3\), 4"),
    (4, (6, 3, 1, 1), r"C_out \(a multiple of 4\)"),
])
def test_grouped_pointwise_errors(groups, shape, message):
    x, dw = torch.randn(1, 12, 5, 5), torch.randn(12, 1, 3, 3)
    with pytest.raises(ValueError, match=message):
        sepconv.separable_conv2d(x, dw, torch.randn(shape), pointwise_groups=groups)


def _configs(C, Co, k, dilation, HW, layouts):
    return dict(
        N=st.integers(0, 3), C=st.integers(1, C), m=st.integers(1, 3), Co=st.integers(1, Co),
        kh=st.integers(1, k), kw=st.integers(1, k), stride=st.integers(1, 3),
        dilation=st.integers(1, dilation), H=st.integers(1, HW), W=st.integers(1, HW),
        pad=st.one_of(st.integers(0, 3), st.just("same"), st.just("valid")),
        act1=st.sampled_from(list(ACTS)), act2=st.sampled_from(list(ACTS)),
        layout=st.sampled_from(layouts), bias=st.booleans(), dw_bias=st.booleans(),
    )


def _check_random(target, N, C, m, Co, kh, kw, stride, dilation, H, W, pad, act1, act2,
                  layout, bias, dw_bias):
    ph = pad if isinstance(pad, int) else 0
    assume(pad == "same" or (H + 2 * ph >= dilation * (kh - 1) + 1
                             and W + 2 * ph >= dilation * (kw - 1) + 1))
    check_against_oracle(target, make_inputs(N, C, H, W, m, Co, (kh, kw), bias=bias,
                                             dw_bias=dw_bias), stride, pad, dilation, act1, act2,
                         layout=LAYOUTS[layout])


# (max C, max C_out, max kernel, max dilation, max H and W, layouts) drawn from
NATIVE_RANGES = (64, 64, 7, 3, 40, list(LAYOUTS))
TRITON_RANGES = (9, 40, 5, 2, 14, ["nchw", "channels_last"])  # the interpreter is slow

# Pinned examples: every configuration a random run ever fails on goes here (with the
# date and what broke), so that every CI run repeats it. None has failed so far (two
# long runs of 2000); until one does, the list holds corners of the ranges, which
# random draws seldom reach.
CORNER = dict(N=1, C=1, m=1, Co=1, kh=1, kw=1, stride=1, dilation=1, H=1, W=1, pad=0,
              act1=None, act2=None, layout="nchw", bias=False, dw_bias=False)
PINNED = [
    CORNER,
    dict(CORNER, N=0, C=64, m=3, Co=64, kh=7, kw=7, dilation=3, H=19, W=19),  # kernel fills x
    dict(CORNER, N=3, C=64, Co=64, kh=7, kw=7, stride=3, H=40, W=40, pad=3,
         layout="strided_channels_last", bias=True, dw_bias=True, act1="hardswish"),
    dict(CORNER, C=5, m=2, Co=3, kh=2, kw=6, dilation=3, H=2, W=40, pad="same",
         layout="transposed_hw", act2="relu6"),
    dict(CORNER, N=2, C=9, m=3, Co=40, kh=5, kw=2, stride=2, dilation=2, H=14, W=3, pad=2,
         layout="channels_last", dw_bias=True, act1="relu6", act2="silu"),
    # 2026-12-06, Triton bfloat16: grad b_dw 0.23 against 0.17, a sum of rounded terms
    # that cancel (the oracle now rounds the gradients the kernels store, as they do)
    dict(CORNER, N=2, Co=16, kw=4, stride=2, H=13, W=6, pad="valid", act2="hardswish",
         bias=True, dw_bias=True),
]


def pinned(ranges, **extra):
    """The PINNED configurations within ``ranges``, as hypothesis examples."""
    C, Co, k, dilation, HW, layouts = ranges

    def decorate(test):
        for c in PINNED:
            if (c["C"] <= C and c["Co"] <= Co and max(c["kh"], c["kw"]) <= k
                    and c["dilation"] <= dilation and max(c["H"], c["W"]) <= HW
                    and c["layout"] in layouts):
                test = example(**c, **extra)(test)
        return test
    return decorate


# SEPCONV_HYPOTHESIS=long (conftest) runs 2000 examples instead of CI's 60.
@given(dtype=st.sampled_from([torch.float32, torch.float64]),
       isa=st.sampled_from(ISAS or [None]), **_configs(*NATIVE_RANGES))
@pinned(NATIVE_RANGES, dtype=torch.float32, isa=None)
def test_random_configurations(dtype, isa, **config):
    if isa is not None:
        previous = _C.isa()
        _C.set_isa(isa)
    try:
        _check_random(dict(dtype=dtype), **config)
    finally:
        if isa is not None:
            _C.set_isa(previous)


# Wider shapes than above, with the blocking knobs drawn too: the forward's tile budget
# (4 KiB: many tiles and bands), 1-3 threads, both backward modes. In float64: float32
# may round a pre-activation to the other side of relu's, relu6's or hardswish's corner,
# as the nn.Conv2d pair in float32 does too, which is not a fault. (A sweep of 27,551
# such configurations, float32 included, found the float32 sums that BlockSums fixed;
# none failed in float64.)
WIDE_RANGES = (160, 160, 7, 3, 56, list(LAYOUTS))


@pytest.mark.skipif(_C is None, reason="extension not built")
@given(isa=st.sampled_from(ISAS or [None]), tile=st.sampled_from([0, 4096, 65536]),
       threads=st.integers(1, 3), mode=st.sampled_from(["bands", "split"]),
       **_configs(*WIDE_RANGES))
def test_random_wide_configurations(isa, tile, threads, mode, **config):
    before = (_C.isa(), sepconv.backend_info()["cpu_caches"]["tile_bytes"],
              torch.get_num_threads(), _C.backward_mode())
    _C.set_isa(isa)
    if tile:
        _C.set_tile_bytes(tile)
    torch.set_num_threads(threads)
    _C.set_backward_mode(mode)
    try:
        _check_random(dict(dtype=torch.float64), **config)
    finally:
        _C.set_isa(before[0])
        _C.set_tile_bytes(before[1])
        torch.set_num_threads(before[2])
        _C.set_backward_mode(before[3])


@pytest.mark.skipif(not _triton.installed(), reason="triton is not installed")
@settings(max_examples=25)  # the interpreter is slow; the fixed cases above cover each knob
@given(dtype=st.sampled_from(TRITON_DTYPES),
       **_configs(*TRITON_RANGES))
@pinned(TRITON_RANGES, dtype=torch.float32)
def test_random_configurations_triton(dtype, **config):
    with sepconv.use_backend("triton"):
        _check_random(dict(dtype=dtype, device=TRITON_DEVICE), **config)


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "hardswish", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float_activations_over_their_range(native_path, act, layout):
    """Each activation's float vector code, after the depthwise stage and in the GEMM's
    epilogue (a transposed store for an NCHW y), and its derivative, on values from -40
    to 40 (GELU's erf is a rational fit on |x| <= 4, zero below: torch's float GELU is
    -0 there too) and the edges of those ranges, against float64 torch: within a few
    float ulps of max(1, |f|)."""
    if native_path["dtype"] != torch.float32:
        pytest.skip("the vector approximations are float32's (double takes libm)")
    v = torch.cat([torch.linspace(-40, 40, 4001, dtype=torch.float64),
                   torch.tensor([-5.657, -5.6569, -4.0, 4.0, 0.0, -1e-30, 1e-30])])
    n = v.numel()
    x = v.reshape(1, 1, 1, n).float()
    one = torch.ones(1, 1, 1, 1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ref = ACTS[act]()
    for where in ("mid", "out"):
        xs = x.contiguous(memory_format=fmt).requires_grad_()
        pw = torch.ones(16, 1, 1, 1)  # 16 identical output channels: whole vectors
        kw = {"mid_activation": act} if where == "mid" else {"activation": act}
        y = sepconv.separable_conv2d(xs, one, pw, **kw)
        (g,) = torch.autograd.grad(y[:, 0].sum(), xs)
        vv = v.clone().requires_grad_()
        want = ref(vv)
        (gw,) = torch.autograd.grad(want.sum(), vv)
        scale = want.detach().abs().clamp_min(1)
        smooth = torch.stack([(v - k).abs() > 1e-6 for k in (-3, 0, 3, 6)]).all(0)  # (kinks)
        for name, got, exp in (("value", y[0, :, 0].double(), want.detach()),
                               ("derivative", g[0, 0, 0].double(), gw)):
            err = ((got - exp) / (scale if name == "value" else 1))
            err = (err if name == "value" else err[smooth]).abs().max().item()
            assert err <= 2e-6, f"{act} {where} {name}: error {err:.2e}"
