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

from ._common import (
    ACTIVATIONS,
    INTERPRET,
    activate,
    activation_grad,
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
def _forward(x, wdw, bdw, wpw, bpw, out, gy, P, Cm, Co, H, W, Ho, Wo,
             sxn, sxc, sxh, sxw, son, soc, soh, sow, sh, sw, pt, pl, dh, dw,
             M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PIXEL_FAST: tl.constexpr,
             ACT1: tl.constexpr, ACT2: tl.constexpr, HAS_BDW: tl.constexpr,
             HAS_BPW: tl.constexpr, GRAD: tl.constexpr, DEPTHWISE: tl.constexpr,
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
            mid = cast(activate(u, ACT1), wpw.dtype.element_ty, EMULATE_BF16)
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
def _depthwise(x, wdw, bdw, mid, P, Cm, H, W, Ho, Wo, sxn, sxc, sxh, sxw, sh, sw, pt, pl, dh, dw,
               M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PIXEL_FAST: tl.constexpr,
               ACT1: tl.constexpr, HAS_BDW: tl.constexpr, EMULATE_BF16: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """mid[p, cm] = act1(dw(x) + b_dw) ([P, Cm], pixel-major) for BLOCK_P pixels x BLOCK_K
    mid channels: the first half of a split forward."""
    p, cm = tile(tl.program_id(0), Cm, BLOCK_P, BLOCK_K)
    cm_ok, p_ok = cm < Cm, p < P
    n, ho, wo = pixels(p, Ho, Wo)
    u = depthwise_tile(x, wdw, bdw, n, ho * sh - pt, wo * sw - pl, p_ok, cm, cm_ok, Cm, H, W,
                       sxn, sxc, sxh, sxw, dh, dw, M, KH, KW, HAS_BDW, PIXEL_FAST, BLOCK_P,
                       BLOCK_K)
    if PIXEL_FAST:  # u is [K, P]
        at, mask = p.to(tl.int64)[None, :] * Cm + cm[:, None], cm_ok[:, None] & p_ok[None, :]
    else:
        at, mask = p.to(tl.int64)[:, None] * Cm + cm[None, :], p_ok[:, None] & cm_ok[None, :]
    tl.store(mid + at, cast(activate(u, ACT1), mid.dtype.element_ty, EMULATE_BF16), mask=mask)


def _fits_fma_dot(bp: int, bco: int, bk: int, warps: int) -> bool:
    """Whether a float32 "ieee" dot (torch's default, allow_tf32 off), which Triton
    builds from FMAs with both operands and the accumulator spread over the threads'
    registers, fits them: at most 96 such values a thread. Over it, sm_90a gets a
    5-6 KB stack (32 registers and the operands in local memory) for 64x128x32,
    64x256x32 and 32x128x64; at or under it none, or 8-24 bytes in NCHW (triton 3.6,
    benchmarks/results/triton-fit/ at ec315e6)."""
    return ((bp + bco) * bk + bp * bco) <= 96 * 32 * warps


def _prune(configs, named_args, **kwargs):
    """Drop tiles much wider than the layer's channel counts, and for float32's FMA dot
    those that spill (_fits_fma_dot). Triton passes the positional arguments in
    named_args and the keyword ones (the launch's) in kwargs."""
    args = {**named_args, **kwargs}
    co, cm, ieee = args["Co"], args["Cm"], args["PRECISION"] == "ieee"
    keep = [c for c in configs if c.kwargs["BLOCK_CO"] <= max(32, next_pow2(co))
            and c.kwargs["BLOCK_K"] <= max(16, next_pow2(cm))
            and (not ieee or _fits_fma_dot(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"],
                                           c.kwargs["BLOCK_K"], c.num_warps))]
    return keep or configs[:1]


# Candidates that compile without a stack frame (spills) in 16-bit channels_last on
# sm_90a for the benchmark layers, 3x3 and 7x7 (benchmarks/results/triton-fit/ as of
# commit fca3e76, triton 3.6; on sm_80 three keep 8-160 bytes). Dropped for spilling
# there: 128x32x64 (2.7-6.7 KB of stack on every layer), 128x256x32, 128x128x64,
# 128x64x32, 128x32x32, 256x32x32, 64x64x64. NCHW still spills in most (NOTES.md).
_CONFIGS = [
    triton.Config(dict(BLOCK_P=bp, BLOCK_CO=bco, BLOCK_K=bk), num_warps=warps, num_stages=stages)
    for bp, bco, bk, warps, stages in [
        (64, 32, 32, 4, 2), (64, 64, 32, 4, 2), (64, 128, 32, 4, 2), (128, 128, 32, 8, 2),
        (64, 256, 32, 8, 2), (32, 64, 32, 4, 2), (32, 128, 64, 4, 2),
    ]
]
# The batch (P) is not in the key: a new batch size reuses the tuned choice.
_forward_tuned = triton.autotune(
    _CONFIGS, key=["Cm", "Co", "H", "W", "Ho", "Wo", "sxc", "KH", "KW", "GRAD", "DEPTHWISE"],
    prune_configs_by=dict(early_config_prune=_prune))(_forward)


def _widest(precision: str) -> int:
    """The fixed BLOCK_CO for wide layers: 64 for float32's FMA dot (_fits_fma_dot:
    64x128x32 spills there), else 128."""
    return 64 if precision == "ieee" else 128


def _fixed_config(Co: int, precision: str) -> dict:
    if INTERPRET:  # small tiles, so that small test shapes span several blocks
        return dict(BLOCK_P=64, BLOCK_CO=16, BLOCK_K=16)
    return dict(BLOCK_P=64, BLOCK_CO=min(_widest(precision), max(32, next_pow2(Co))),
                BLOCK_K=32, num_warps=4, num_stages=2)


# SEPCONV_TRITON_SPLIT=auto|always|never: splits_depthwise's rule, or forced (tests).
SPLIT = os.environ.get("SEPCONV_TRITON_SPLIT", "auto")


def splits_depthwise(Co: int, KH: int, KW: int, precision: str) -> bool:
    """Whether the forward computes the depthwise once into a buffer rather than in
    every column block: where there are at least 2 blocks of the fixed width and they
    redo 36 taps or more (3x3 from 4 blocks, 7x7 from 2). H200, bfloat16, fused,
    channels-last, batch 128, pair / sepconv kernel time: 3x3 with Co 64-128 (one
    block) 1.95-2.39x, 256 (two) 1.18-1.46x, 512 (four) 0.59-0.73x; 7x7 convnext
    (3-24 blocks) 0.05-0.22x, about 1 ms a layer whatever its width: the recomputed
    depthwise. The buffer's round trip is 4 bytes per pixel and mid channel (16-bit)."""
    if SPLIT != "auto":
        return SPLIT == "always"
    blocks = cdiv(Co, _widest(precision))
    return blocks >= 2 and blocks * KH * KW >= 36


# _depthwise's scalar and constexpr arguments, taken from the forward's
_DW_ARGS = ("H", "W", "Ho", "Wo", "sxn", "sxc", "sxh", "sxw", "sh", "sw", "pt", "pl", "dh", "dw",
            "M", "KH", "KW", "PIXEL_FAST", "ACT1", "HAS_BDW", "EMULATE_BF16")


def launch(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
           mid_activation, activation, out, grad_y=None) -> torch.Tensor:
    """Writes act(pw(act_mid(dw(x)))) into ``out`` or, given grad_y (same shape and
    strides as out), grad_y * act'(z). x and out may have any strides."""
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
        **dot_mode(x))
    split = splits_depthwise(Co, args["KH"], args["KW"], args["PRECISION"])
    if split:
        mid = torch.empty((P, Cm), dtype=x.dtype, device=x.device)
        bp, bk = (64, 16) if INTERPRET else (64, 32)
        _depthwise[(cdiv(P, bp) * cdiv(Cm, bk),)](
            x, wdw, bdw, mid, P, Cm, **{k: v for k, v in args.items() if k in _DW_ARGS},
            BLOCK_P=bp, BLOCK_K=bk, num_warps=4)
        x = mid
    args["DEPTHWISE"] = not split
    tensors = (x, wdw, bdw, wpw, bpw, out, out if grad_y is None else grad_y)
    if autotuned(x):
        grid = lambda meta: (cdiv(P, meta["BLOCK_P"]) * cdiv(Co, meta["BLOCK_CO"]),)  # noqa: E731
        _forward_tuned[grid](*tensors, **args)
    else:
        cfg = _fixed_config(Co, args["PRECISION"])
        grid = (cdiv(P, cfg["BLOCK_P"]) * cdiv(Co, cfg["BLOCK_CO"]),)
        _forward[grid](*tensors, **args, **cfg)
    return out
