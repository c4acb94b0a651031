"""The fused forward kernel: depthwise tile in registers -> act_mid -> tl.dot with the
pointwise weight -> bias, act -> store. The intermediate never reaches global memory.

The same kernel, with GRAD set, gives the backward pass gz = grad_y * act'(z): z is
recomputed tile by tile rather than saved, so training keeps only x.

A program computes BLOCK_CO output channels, so each of the ceil(Co / BLOCK_CO) column
blocks recomputes the depthwise tile of its pixels. Where that is many taps many times
(splits_depthwise), the depthwise runs once into a [P, Cm] buffer (_depthwise) and the
same kernel, with DEPTHWISE off, is the pointwise GEMM over it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import norm as _norm
from ._common import (
    ACTIVATIONS,
    INTERPRET,
    MAXNREG,
    activate,
    activation_grad,
    arch,
    autotuned,
    cast,
    cdiv,
    depthwise_tile,
    dot,
    dot_mode,
    next_pow2,
    pixel_geometry,
    pixels,
    taps_major,
    tile,
)


@triton.jit(do_not_specialize=["P"])  # P follows the batch size: no recompile per batch
def _forward(x, wdw, bdw, wpw, bpw, out, gy, sc, P, Cm, Co, H, W, Ho, Wo,
             sxn, sxc, sxh, sxw, son, soc, soh, sow, sh, sw, pt, pl, dh, dw,
             M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PIXEL_FAST: tl.constexpr,
             ACT1: tl.constexpr, ACT2: tl.constexpr, HAS_BDW: tl.constexpr,
             HAS_BPW: tl.constexpr, GRAD: tl.constexpr, DEPTHWISE: tl.constexpr,
             HAS_SCALE: tl.constexpr,
             PRECISION: tl.constexpr,
             EMULATE_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
             BLOCK_K: tl.constexpr):
    # One program: BLOCK_P output pixels x BLOCK_CO output channels.
    p, co = tile(tl.program_id(0), Co, BLOCK_P, BLOCK_CO)
    co_ok, p_ok = co < Co, p < P
    n, ho, wo = pixels(p, Ho, Wo)

    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    if HAS_BPW:
        acc += tl.load(bpw + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    for k0 in range(0, Cm, BLOCK_K):
        cm = k0 + tl.arange(0, BLOCK_K)
        cm_ok = cm < Cm
        if not DEPTHWISE:  # x is act1(dw(x) + b_dw) already, [P, Cm] (_depthwise)
            mid = tl.load(x + p.to(tl.int64)[:, None] * Cm + cm[None, :],
                          mask=p_ok[:, None] & cm_ok[None, :], other=0.0)
        else:
            u = depthwise_tile(x, wdw, bdw, n, ho * sh - pt, wo * sw - pl, p_ok, cm, cm_ok, Cm,
                               H, W, sxn, sxc, sxh, sxw, dh, dw, M, KH, KW, HAS_BDW, PIXEL_FAST,
                               BLOCK_P, BLOCK_K)
            if PIXEL_FAST:  # built as [K, P] (NCHW: the taps read along the pixels)
                u = tl.trans(u)
            v = activate(u, ACT1)
            if HAS_SCALE:  # squeeze-and-excitation: sc[n, cm] per image and mid channel
                v *= tl.load(sc + n.to(tl.int64)[:, None] * Cm + cm[None, :],
                             mask=p_ok[:, None] & cm_ok[None, :], other=0.0).to(tl.float32)
            mid = cast(v, wpw.dtype.element_ty, EMULATE_BF16)
        w = tl.load(wpw + co[None, :] * Cm + cm[:, None], mask=cm_ok[:, None] & co_ok[None, :],
                    other=0.0)
        acc = dot(mid, w, acc, PRECISION, EMULATE_BF16)

    at = n.to(tl.int64) * son + ho.to(tl.int64) * soh + wo.to(tl.int64) * sow
    offs = at[:, None] + co.to(tl.int64)[None, :] * soc
    mask = p_ok[:, None] & co_ok[None, :]
    if GRAD:
        g = tl.load(gy + offs, mask=mask, other=0.0).to(tl.float32)
        res = activation_grad(g, acc, ACT2)
    else:
        res = activate(acc, ACT2)
    tl.store(out + offs, cast(res, out.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit(do_not_specialize=["P"])
def _depthwise(x, wdw, bdw, mid, sc, P, Cm, H, W, Ho, Wo, sxn, sxc, sxh, sxw, sh, sw, pt, pl,
               dh, dw, M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               PIXEL_FAST: tl.constexpr, ACT1: tl.constexpr, HAS_BDW: tl.constexpr,
               HAS_SCALE: tl.constexpr, EMULATE_BF16: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """mid[p, cm] = act1(dw(x) + b_dw) (times sc[n, cm] with HAS_SCALE) ([P, Cm],
    pixel-major) for BLOCK_P pixels x BLOCK_K mid channels: the first half of a split
    forward."""
    p, cm = tile(tl.program_id(0), Cm, BLOCK_P, BLOCK_K)
    cm_ok, p_ok = cm < Cm, p < P
    n, ho, wo = pixels(p, Ho, Wo)
    u = depthwise_tile(x, wdw, bdw, n, ho * sh - pt, wo * sw - pl, p_ok, cm, cm_ok, Cm, H, W,
                       sxn, sxc, sxh, sxw, dh, dw, M, KH, KW, HAS_BDW, PIXEL_FAST, BLOCK_P,
                       BLOCK_K)
    if PIXEL_FAST:  # u is [K, P]
        at, mask = p.to(tl.int64)[None, :] * Cm + cm[:, None], cm_ok[:, None] & p_ok[None, :]
        s_at = n.to(tl.int64)[None, :] * Cm + cm[:, None]
    else:
        at, mask = p.to(tl.int64)[:, None] * Cm + cm[None, :], p_ok[:, None] & cm_ok[None, :]
        s_at = n.to(tl.int64)[:, None] * Cm + cm[None, :]
    v = activate(u, ACT1)
    if HAS_SCALE:
        v *= tl.load(sc + s_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(mid + at, cast(v, mid.dtype.element_ty, EMULATE_BF16), mask=mask)


GELUS = (ACTIVATIONS.index("gelu"), ACTIVATIONS.index("gelu_tanh"))


def fits(bp: int, bco: int, bk: int, warps: int, precision: str, nchw: bool, cc: int,
         gelu: bool = False) -> bool:
    """Whether a forward block compiles without spilling registers (ptxas's spill stores,
    python -m benchmarks.triton_fit, triton 3.6 and 3.9, sm_90a and sm_80):

    - float32's "ieee" dot (torch's default, allow_tf32 off), which Triton builds from
      FMAs with both operands and the accumulator spread over the threads' registers:
      at most 48 such values a thread. 64x64x32 (64 a thread) spilled 8 bytes on sm_90a
      under triton 3.9; 64x128x32 (112) 5.5 KB everywhere.
    - NCHW (x's taps gathered along the pixels, or y's stores strided by H*W): at most
      32 pixels by 64 output channels. Each element of those tiles holds its own 64-bit
      address; 64x128x32 spilled 88-624 bytes, 64x64x32 16-20, 64x32x32 16-152 at stride 2
      (16-bit and float32); float32's 32x64x32 GEMM 8 bytes on sm_80.
    - channels-last 16-bit on sm_80: 64 output channels at most (64x128x32 kept 168
      registers and spilled 8 bytes there).
    - gelu: act2 GELU's epilogue (an erf or exp per accumulator) beside float32's "ieee"
      dot: 32 output channels at most (the split forward's channels-last GEMM, 32x64x32,
      spilled 8 bytes on sm_90a under triton 3.9)."""
    if (nchw or gelu) and precision == "ieee" and bco > 32:
        return False
    if nchw and (bp > 32 or bco > 64):
        return False
    if precision == "ieee":
        return ((bp + bco) * bk + bp * bco) <= 48 * 32 * warps
    return nchw or cc >= 90 or bco <= 64


def _nchw(args: dict) -> bool:
    """Whether a launch takes fits()'s NCHW bounds: x's taps gathered along the pixels,
    or y's stores strided by H*W."""
    return args["PIXEL_FAST"] or args["soc"] != 1


def _prune(configs, named_args, **kwargs):
    """Drop tiles much wider than the layer's channel counts, and those that spill
    (fits). Triton passes the positional arguments in named_args and the keyword ones
    (the launch's) in kwargs."""
    args = {**named_args, **kwargs}
    co, cm = args["Co"], args["Cm"]
    nchw, cc = _nchw(args), arch(args["x"])
    keep = [c for c in configs if c.kwargs["BLOCK_CO"] <= max(32, next_pow2(co))
            and c.kwargs["BLOCK_K"] <= max(16, next_pow2(cm))
            and fits(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_K"],
                     c.num_warps, args["PRECISION"], nchw, cc, args["ACT2"] in GELUS)]
    return keep or configs[:1]


# Candidates that compile without a stack frame (spills) in 16-bit channels_last on
# sm_90a for the benchmark layers, 3x3 and 7x7 (benchmarks/results/triton-fit/ as of
# commit fca3e76, triton 3.6). Dropped for spilling there: 128x32x64 (2.7-6.7 KB of
# stack on every layer), 128x256x32, 128x128x64, 128x64x32, 128x32x32, 256x32x32,
# 64x64x64. The others (float32, NCHW, sm_80) take those of them that fits() allows.
_CONFIGS = [
    triton.Config(dict(BLOCK_P=bp, BLOCK_CO=bco, BLOCK_K=bk), num_warps=warps, num_stages=stages,
                  maxnreg=MAXNREG)
    for bp, bco, bk, warps, stages in [
        (64, 32, 32, 4, 2), (64, 64, 32, 4, 2), (64, 128, 32, 4, 2), (128, 128, 32, 8, 2),
        (64, 256, 32, 8, 2), (32, 64, 32, 4, 2), (32, 128, 64, 4, 2), (32, 32, 32, 4, 2),
    ]
]
# The batch (P) is not in the key: a new batch size reuses the tuned choice.
_forward_tuned = triton.autotune(
    _CONFIGS, key=["Cm", "Co", "H", "W", "Ho", "Wo", "sxc", "soc", "KH", "KW", "GRAD",
                   "DEPTHWISE"],
    prune_configs_by=dict(early_config_prune=_prune))(_forward)


def wide_blocks(precision: str, nchw: bool, cc: int, gelu: bool = False) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_CO) of the fixed blocks for layers with many output channels: the
    largest that fits() allows, 64x128 where it allows that."""
    if nchw:
        return 32, 32 if precision == "ieee" else 64
    if precision == "ieee":
        return 32, 32 if gelu else 64
    return 64, 128 if cc >= 90 else 64


def _fixed_config(Co: int, wide: tuple[int, int]) -> dict:
    if INTERPRET:  # small tiles, so that small test shapes span several blocks
        return dict(BLOCK_P=64, BLOCK_CO=16, BLOCK_K=16)
    return dict(BLOCK_P=wide[0], BLOCK_CO=min(wide[1], max(32, next_pow2(Co))), BLOCK_K=32,
                num_warps=4, num_stages=2, maxnreg=MAXNREG)


# SEPCONV_TRITON_SPLIT=auto|always|never: splits_depthwise's rule, or forced (tests).
SPLIT = os.environ.get("SEPCONV_TRITON_SPLIT", "auto")


def splits_depthwise(Co: int, KH: int, KW: int, widest: int) -> bool:
    """Whether the forward computes the depthwise once into a buffer rather than in
    every column block of ``widest`` output channels: where there are at least 2 and
    they would redo 36 taps or more (at 128 wide: 3x3 from 4 blocks, 7x7 from 2). H200,
    bfloat16, fused, channels-last, batch 128, pair / sepconv kernel time: 3x3 with Co
    64-128 (one block) 1.95-2.39x, 256 (two) 1.18-1.46x, 512 (four) 0.59-0.73x; 7x7
    convnext (3-24 blocks) 0.05-0.22x, about 1 ms a layer whatever its width: the
    recomputed depthwise. The buffer's round trip is 4 bytes per pixel and mid channel
    (16-bit)."""
    if SPLIT != "auto":
        return SPLIT == "always"
    blocks = cdiv(Co, widest)
    return blocks >= 2 and blocks * KH * KW >= 36


def _depthwise_blocks() -> dict:
    """_depthwise's blocks: 64x32 spilled 208-280 bytes in NCHW 7x7 (sm_90a, triton
    3.9); 32x32 none."""
    if INTERPRET:
        return dict(BLOCK_P=64, BLOCK_K=16)
    return dict(BLOCK_P=32, BLOCK_K=32, num_warps=4, maxnreg=MAXNREG)


# _depthwise's scalar and constexpr arguments, taken from the forward's
_DW_ARGS = ("H", "W", "Ho", "Wo", "sxn", "sxc", "sxh", "sxw", "sh", "sw", "pt", "pl", "dh", "dw",
            "M", "KH", "KW", "PIXEL_FAST", "ACT1", "HAS_BDW", "HAS_SCALE", "EMULATE_BF16")


def depthwise_into(mid, x, wdw, bdw, sc, args: dict) -> None:
    """mid [P, Cm] = act1(dw(x) + b_dw) (times sc with HAS_SCALE) by _depthwise; args: the
    scalar and constexpr arguments, as launch makes them."""
    P, Cm = mid.shape
    blocks = _depthwise_blocks()
    grid = (cdiv(P, blocks["BLOCK_P"]) * cdiv(Cm, blocks["BLOCK_K"]),)
    _depthwise[grid](x, wdw, bdw, mid, sc, P, Cm,
                     **{k: v for k, v in args.items() if k in _DW_ARGS}, **blocks)


def launch(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
           mid_activation, activation, out, grad_y=None, scale=None, norm_eps=None,
           mid=None) -> torch.Tensor:
    """Writes act(pw(act_mid(dw(x)) * scale)) into ``out`` or, given grad_y (same shape and
    strides as out), grad_y * act'(z). x and out may have any strides; scale (N, C * m)
    or None. norm_eps: LayerNorm over each pixel's mid channels (no affine) before the
    pointwise conv: the split forward, its buffer normalised in place (norm.normalize;
    a row needs all of its channels, which the fused kernel's programs do not hold).
    mid: that buffer already made ([P, Cm], what the pointwise stage reads): only the
    pointwise stage runs."""
    N, Co, Ho, Wo = out.shape
    P, Cm = N * Ho * Wo, dw_weight.shape[0]
    if P == 0:
        return out
    wdw, wpw = taps_major(dw_weight), pw_weight.reshape(Co, Cm).contiguous()
    bdw = wdw if dw_bias is None else dw_bias.contiguous()
    bpw = wpw if pw_bias is None else pw_bias.contiguous()
    if grad_y is not None:
        assert grad_y.shape == out.shape and grad_y.stride() == out.stride()
    args = dict(
        P=P, Cm=Cm, Co=Co, **pixel_geometry(x, dw_weight, stride, padding, dilation, Ho, Wo),
        son=out.stride(0), soc=out.stride(1), soh=out.stride(2), sow=out.stride(3),
        ACT1=ACTIVATIONS.index(mid_activation), ACT2=ACTIVATIONS.index(activation),
        HAS_BDW=dw_bias is not None, HAS_BPW=pw_bias is not None, GRAD=grad_y is not None,
        HAS_SCALE=scale is not None, **dot_mode(x))
    sc = wdw if scale is None else scale.contiguous()
    wide = wide_blocks(args["PRECISION"], _nchw(args), arch(x), args["ACT2"] in GELUS)
    split = mid is not None or norm_eps is not None or \
        splits_depthwise(Co, args["KH"], args["KW"], wide[1])
    if mid is None and split:
        mid = torch.empty((P, Cm), dtype=x.dtype, device=x.device)
        depthwise_into(mid, x, wdw, bdw, sc, args)
        if norm_eps is not None:
            _norm.normalize(mid, norm_eps, args["EMULATE_BF16"])
    if split:
        x = mid
    args["DEPTHWISE"] = not split
    tensors = (x, wdw, bdw, wpw, bpw, out, out if grad_y is None else grad_y, sc)
    if autotuned(x):
        grid = lambda meta: (cdiv(P, meta["BLOCK_P"]) * cdiv(Co, meta["BLOCK_CO"]),)  # noqa: E731
        _forward_tuned[grid](*tensors, **args)
    else:
        cfg = _fixed_config(Co, wide)
        grid = (cdiv(P, cfg["BLOCK_P"]) * cdiv(Co, cfg["BLOCK_CO"]),)
        _forward[grid](*tensors, **args, **cfg)
    return out
