"""Pieces the forward and backward kernels share: activations, the depthwise tile,
the dot, and how block sizes are chosen."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Same order as sepconv.reference.ACTIVATIONS and csrc/sepconv.h.
ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish", "gelu", "gelu_tanh")

# triton.jit reads this when a kernel is defined, so it is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def activate(v, ACT: tl.constexpr):
    """act(v) with torch's formulas (NaN stays NaN)."""
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0, 0.0, tl.where(v > 6, 6.0, v))
    elif ACT == 3:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 4:
        t = v + 3.0
        v = v * tl.where(t < 0, 0.0, tl.where(t > 6, 6.0, t)) / 6.0
    elif ACT == 5 or ACT == 6:
        v = v * _gelu_cdf(v, ACT)
    return v


@triton.jit
def _gelu_cdf(v, ACT: tl.constexpr):
    """GELU's x factor: Phi(v) (5: exact, erf) or (1 + tanh(a)) / 2 (6: torch's tanh form,
    tanh(a) = 1 - 2 / (e^2a + 1): +-1 where e^2a overflows, NaN for NaN)."""
    if ACT == 5:
        return 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
    a = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    return 1.0 - 1.0 / (tl.exp(a + a) + 1.0)


@triton.jit
def activation_grad(g, z, ACT: tl.constexpr):
    """g * act'(z), as torch's threshold / hardtanh / silu / hardswish backward: a NaN
    pre-activation passes the gradient through where torch's does."""
    if ACT == 1:
        g = tl.where(z <= 0, 0.0, g)
    elif ACT == 2:
        g = tl.where((z <= 0) | (z >= 6), 0.0, g)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = g * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 4:
        g = tl.where(z < -3, 0.0, tl.where(z <= 3, g * (z / 3.0 + 0.5), g))
    elif ACT == 5:  # Phi(z) + z phi(z)
        g = g * (_gelu_cdf(z, ACT) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z))
    elif ACT == 6:  # torch's gelu_backward(approximate="tanh")
        c = _gelu_cdf(z, ACT)  # (1 + t) / 2
        t = c + c - 1.0
        g = g * (c + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z))
    return g


@triton.jit
def cast(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 v to the storage dtype, rounding to nearest even as the GPU does.
    EMULATE_BF16 (Triton's CPU interpreter only, which truncates to bfloat16 instead)
    rounds in fp32 bits first, so that the value then truncates exactly."""
    if EMULATE_BF16 and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc + a @ b with fp32 accumulation. EMULATE_BF16 (interpreter only, which
    multiplies bfloat16 bit patterns as integers) feeds the operands to the dot as
    fp32: bf16 x bf16 products are exact in fp32, so it is the same maths."""
    if EMULATE_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def pixels(p, Ho, Wo):
    """(n, h, w) of flat pixel indices p over an N x Ho x Wo grid."""
    return p // (Wo * Ho), (p // Wo) % Ho, p % Wo


@triton.jit
def tile(pid, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Row and column indices of tile ``pid`` of a (rows x n_cols) grid of tiles. The
    column tiles of one row tile are neighbours in launch order, so they share its
    inputs in L2."""
    per_row = tl.cdiv(n_cols, BLOCK_COLS)
    rows = (pid // per_row) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (pid % per_row) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return rows, cols


@triton.jit
def depthwise_tile(x, wdw, bdw, n, hi0, wi0, p_ok, cm, cm_ok, Cm, H, W,
                   sxn, sxc, sxh, sxw, dh, dw,
                   M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   HAS_BDW: tl.constexpr, PIXEL_FAST: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """u[p, k] = b_dw[cm] + sum_ij x[n, cm // M, hi0 + i*dh, wi0 + j*dw] * wdw[i, j, cm]
    in fp32, for a tile of output pixels (n, hi0, wi0: [BLOCK_P]) and mid channels
    (cm: [BLOCK_K]); zero padding by masks. Offsets are int64: x may pass 2^31.

    PIXEL_FAST (pixel_fast: x's pixels adjacent in memory, NCHW) returns the tile as
    [BLOCK_K, BLOCK_P]. The compiler cannot prove the gather's pixels contiguous
    (w = p % Wo), so it puts a warp's threads along a tile's last dimension: as [P, K]
    in NCHW that is 32 threads on 32 channel planes, 32 transactions a load; as [K, P],
    consecutive pixels."""
    row = x + n.to(tl.int64) * sxn
    col = (cm // M).to(tl.int64) * sxc
    if PIXEL_FAST:
        u = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    else:
        u = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    # Rows in a loop, taps of a row unrolled. All KH*KW taps unrolled let the pipeliner
    # stage every tap's gather in shared memory (7x7 float32: 430 KB, over any GPU's
    # limit; 7x7 bfloat16: 215 KB, one block per SM) and kept their addresses live
    # (a 1.8 KB stack in triton 3.6). A loop over rows: 12-24 KB, and no stack in bf16
    # channels_last (benchmarks/triton_fit.py).
    for i in range(KH):
        hi = hi0 + i * dh
        h_ok = p_ok & (hi >= 0) & (hi < H)
        for j in tl.static_range(KW):
            wi = wi0 + j * dw
            ok = h_ok & (wi >= 0) & (wi < W)
            at = row + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
            tap = wdw + (i * KW + j) * Cm + cm
            if PIXEL_FAST:
                xv = tl.load(col[:, None] + at[None, :], mask=cm_ok[:, None] & ok[None, :],
                             other=0.0)
                u += xv.to(tl.float32) * tl.load(tap, mask=cm_ok, other=0.0).to(tl.float32)[:, None]
            else:
                xv = tl.load(at[:, None] + col[None, :], mask=ok[:, None] & cm_ok[None, :],
                             other=0.0)
                u += xv.to(tl.float32) * tl.load(tap, mask=cm_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BDW:
        b = tl.load(bdw + cm, mask=cm_ok, other=0.0).to(tl.float32)
        if PIXEL_FAST:
            u += b[:, None]
        else:
            u += b[None, :]
    return u


# ptxas's register limit for every launch (PTX .maxnreg). Without one, ptxas trades a
# few spilled registers for occupancy on its own: 4-8 bytes of spill stores at 72-128
# registers in 40 kernels (sm_80 and sm_90a, triton 3.6 and 3.9), such as the 32x32x32
# NCHW forward at 96 registers. With the limit stated it keeps them in registers
# (that one: 141 registers, no spill): the blocks per SM that leaves are in
# benchmarks/results/triton-fit/.
MAXNREG = 255


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. triton.cdiv and triton.next_power_of_2 are
    constexpr_functions, about 5 us a call in Python (triton 3.6 and 3.9): a dozen of
    them per backward call were 60 us of its host time."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host (see cdiv)."""
    return 1 << (n - 1).bit_length()


def taps_major(dw_weight: torch.Tensor) -> torch.Tensor:
    """The depthwise weight as (kh, kw, C*m): a tap's weights for a channel block are
    then one coalesced load."""
    return dw_weight.reshape(dw_weight.shape[0], -1).t().contiguous()


def dot_mode(x: torch.Tensor) -> dict:
    """PRECISION / EMULATE_BF16 for the dots and casts: tf32 for float32 only where
    torch allows it; the interpreter's bfloat16 repaired (see cast and dot)."""
    ieee = x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    return dict(PRECISION="ieee" if ieee else "tf32",  # 16-bit operands: tf32 is a no-op
                EMULATE_BF16=INTERPRET and x.dtype == torch.bfloat16)


# SEPCONV_TRITON_AUTOTUNE=0 (read at import) takes the fixed block sizes: one compile per
# kernel variant instead of one per candidate tile, for test runs and short GPU sessions.
AUTOTUNE = os.environ.get("SEPCONV_TRITON_AUTOTUNE", "1") != "0"


def autotuned(x: torch.Tensor) -> bool:
    """Tune block sizes by timing on a GPU, except under the interpreter (nothing to
    time), where SEPCONV_TRITON_AUTOTUNE=0, and under torch.use_deterministic_algorithms:
    another block size sums in another order, and a timing-based choice may differ from
    one process to the next."""
    return (x.is_cuda and AUTOTUNE and not INTERPRET
            and not torch.are_deterministic_algorithms_enabled())


# SEPCONV_TRITON_PIXEL_FAST=never (read at import) keeps NCHW's taps in [pixels,
# channels] tiles, for an A/B on a GPU (benchmarks/gpu_run.sh).
PIXEL_FAST = os.environ.get("SEPCONV_TRITON_PIXEL_FAST", "auto")


def pixel_fast(x: torch.Tensor) -> bool:
    """Whether the forward and _dw_weight read x's depthwise taps as [channels, pixels]
    tiles (depthwise_tile's PIXEL_FAST): where x's pixels, not its channels, are adjacent
    in memory (NCHW). sm_90a, triton 3.6, 16-bit 3x3 forward at 64x128x32: coalesced gathers
    for 0-224 bytes of stack (the [pixels, channels] tile: 0-8); unmeasured on a GPU.
    (_mid keeps [pixels, channels]: transposed, it spilled 480-736 bytes at 7x7.)"""
    return PIXEL_FAST != "never" and x.stride(3) == 1 and x.stride(1) != 1


def arch(x: torch.Tensor) -> int:
    """x's GPU as 10 * major + minor of its compute capability (90: H100/H200, 80: A100),
    for the block sizes that compile without spills there; 90 off a GPU (the
    interpreter's tests take the H100's blocks). benchmarks/triton_fit.py sets its
    target's."""
    return _capability(x.device.index) if x.is_cuda else 90


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    """Once per device: every launch asks (host time is most of a small layer's call)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def pixel_geometry(x, dw_weight, stride, padding, dilation, Ho, Wo) -> dict:
    """The scalar arguments every kernel takes for the depthwise gather."""
    return dict(H=x.shape[2], W=x.shape[3], Ho=Ho, Wo=Wo,
                sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
                sh=stride[0], sw=stride[1], pt=padding[0], pl=padding[2],
                dh=dilation[0], dw=dilation[1],
                M=dw_weight.shape[0] // x.shape[1], KH=dw_weight.shape[2], KW=dw_weight.shape[3],
                PIXEL_FAST=pixel_fast(x))
