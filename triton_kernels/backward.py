"""The fused backward: gradients of x, both weights and both biases from x alone.

    gz  = grad_y * act'(z)                  forward kernel, GRAD epilogue (z recomputed)
    gu  = (gz @ W_pw) * act_mid'(u)         _mid: u recomputed, gmid by tl.dot
    mid = act_mid(u)                        _mid, same tile
    g W_pw = gz^T @ mid                     _pw_weight: split over pixels, two-stage sum
    g W_dw = sum_p gu * x[tap(p)]           _dw_weight: split over pixels, two-stage sum
    g x    = transposed depthwise of gu     _input: a gather, every element written once

gz, gu and mid are stored in the input dtype, as the nn.Conv2d pair stores its
gradients, and live only while the backward runs (the nn.Conv2d pair keeps the
intermediate from forward to backward). Weight gradients are summed in a fixed order:
each program writes its partial sum and torch adds the partials, no float atomics,
so the result is the same on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import forward as _fwd
from . import norm as _norm
from ._common import (
    ACTIVATIONS,
    INTERPRET,
    MAXNREG,
    activate,
    activation_grad,
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


@triton.jit(do_not_specialize=["P"])
def _mid(x, wdw, bdw, wpw, gz, gu, mid, P, Cm, Co, H, W, Ho, Wo,
         sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sh, sw, pt, pl, dh, dw,
         M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACT1: tl.constexpr,
         HAS_BDW: tl.constexpr, STORE_GU: tl.constexpr, STORE_MID: tl.constexpr,
         PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
         BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """gu and mid ([P, Cm], pixel-major) for BLOCK_P pixels x BLOCK_K mid channels. The
    taps are read as [pixels, channels] in every layout (see pixel_fast)."""
    p, cm = tile(tl.program_id(0), Cm, BLOCK_P, BLOCK_K)
    cm_ok, p_ok = cm < Cm, p < P
    n, ho, wo = pixels(p, Ho, Wo)
    u = depthwise_tile(x, wdw, bdw, n, ho * sh - pt, wo * sw - pl, p_ok, cm, cm_ok, Cm, H, W,
                       sxn, sxc, sxh, sxw, dh, dw, M, KH, KW, HAS_BDW, False, BLOCK_P, BLOCK_K)
    buf = p.to(tl.int64)[:, None] * Cm + cm[None, :]
    mask = p_ok[:, None] & cm_ok[None, :]
    if STORE_MID:
        tl.store(mid + buf, cast(activate(u, ACT1), mid.dtype.element_ty, EMULATE_BF16), mask=mask)
    if STORE_GU:
        at = n.to(tl.int64) * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
        gmid = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        for co0 in range(0, Co, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            co_ok = co < Co
            g = tl.load(gz + at[:, None] + co.to(tl.int64)[None, :] * sgc,
                        mask=p_ok[:, None] & co_ok[None, :], other=0.0)
            w = tl.load(wpw + co[:, None] * Cm + cm[None, :], mask=co_ok[:, None] & cm_ok[None, :],
                        other=0.0)
            gmid = dot(cast(g.to(tl.float32), w.dtype, EMULATE_BF16), w, gmid, PRECISION,
                       EMULATE_BF16)
        tl.store(gu + buf, cast(activation_grad(gmid, u, ACT1), gu.dtype.element_ty, EMULATE_BF16),
                 mask=mask)


@triton.jit(do_not_specialize=["P"])
def _pw_weight(gz, mid, partial, P, Cm, Co, Ho, Wo, sgn, sgc, sgh, sgw, chunk,
               PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[s] = gz[chunk s]^T @ mid[chunk s]: one (BLOCK_CO, BLOCK_K) tile of it."""
    pid = tl.program_id(0)
    n_k, n_co = tl.cdiv(Cm, BLOCK_K), tl.cdiv(Co, BLOCK_CO)
    cm = (pid % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    co = ((pid // n_k) % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    s = pid // (n_k * n_co)
    cm_ok, co_ok = cm < Cm, co < Co
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    for p0 in range(s * chunk, tl.minimum(s * chunk + chunk, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        n, ho, wo = pixels(p, Ho, Wo)
        at = n.to(tl.int64) * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
        g = tl.load(gz + at[:, None] + co.to(tl.int64)[None, :] * sgc,
                    mask=p_ok[:, None] & co_ok[None, :], other=0.0)
        m = tl.load(mid + p.to(tl.int64)[:, None] * Cm + cm[None, :],
                    mask=p_ok[:, None] & cm_ok[None, :], other=0.0)
        g = cast(g.to(tl.float32), m.dtype, EMULATE_BF16)
        acc = dot(tl.trans(g), m, acc, PRECISION, EMULATE_BF16)
    out = partial + s.to(tl.int64) * Co * Cm + co[:, None] * Cm + cm[None, :]
    tl.store(out, acc, mask=co_ok[:, None] & cm_ok[None, :])


@triton.jit(do_not_specialize=["P"])
def _dw_weight(x, gu, partial, P, Cm, H, W, Ho, Wo, sxn, sxc, sxh, sxw, sh, sw, pt, pl, dh, dw,
               chunk, M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               PIXEL_FAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[s, cm, tap] = sum over the pixels of chunk s of gu * x at that tap.
    One tap per program: the KH*KW programs of a chunk are neighbours in launch order,
    so gu and x come from DRAM about once, and from L2 for the other taps."""
    pid = tl.program_id(0)
    t = pid % (KH * KW)
    n_k = tl.cdiv(Cm, BLOCK_K)
    cm = (pid // (KH * KW) % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    s = pid // (KH * KW * n_k)
    cm_ok = cm < Cm
    col = (cm // M).to(tl.int64) * sxc
    i, j = t // KW, t % KW
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for p0 in range(s * chunk, tl.minimum(s * chunk + chunk, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        n, ho, wo = pixels(p, Ho, Wo)
        hi, wi = ho * sh - pt + i * dh, wo * sw - pl + j * dw
        ok = p_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        at = n.to(tl.int64) * sxn + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
        if PIXEL_FAST:  # [BLOCK_K, BLOCK_P]: the warp along the pixels (depthwise_tile)
            xv = tl.load(x + col[:, None] + at[None, :], mask=cm_ok[:, None] & ok[None, :],
                         other=0.0)
            g = tl.load(gu + p.to(tl.int64)[None, :] * Cm + cm[:, None],
                        mask=cm_ok[:, None] & p_ok[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=1)
        else:
            xv = tl.load(x + at[:, None] + col[None, :], mask=ok[:, None] & cm_ok[None, :],
                         other=0.0)
            g = tl.load(gu + p.to(tl.int64)[:, None] * Cm + cm[None, :],
                        mask=p_ok[:, None] & cm_ok[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=0)
    tl.store(partial + (s.to(tl.int64) * Cm + cm) * (KH * KW) + t, acc, mask=cm_ok)


@triton.jit(do_not_specialize=["Q"])
def _input(gu, wdw, gx, Q, C, Cm, H, W, Ho, Wo, sgn, sgc, sgh, sgw, sh, sw, pt, pl, dh, dw,
           M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, EMULATE_BF16: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gx[n, c, hi, wi] = sum over the taps and outputs (ho, wo) that read that input of
    gu[n, ho, wo, c*M + r] * wdw[i, j, c*M + r]: a gather, so no two programs write
    the same element."""
    q, c = tile(tl.program_id(0), C, BLOCK_P, BLOCK_C)
    c_ok, q_ok = c < C, q < Q
    n, hi, wi = pixels(q, H, W)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in range(KH):  # rows in a loop, as in depthwise_tile
        hs = hi + pt - i * dh  # = ho * sh for the output row that reads hi at tap i
        ho = tl.maximum(hs, 0) // sh
        h_ok = q_ok & (hs >= 0) & (ho * sh == hs) & (ho < Ho)
        for j in tl.static_range(KW):
            ws = wi + pl - j * dw
            wo = tl.maximum(ws, 0) // sw
            ok = h_ok & (ws >= 0) & (wo * sw == ws) & (wo < Wo)
            row = ((n.to(tl.int64) * Ho + ho) * Wo + wo) * Cm
            for r in range(M):
                cm = c * M + r
                g = tl.load(gu + row[:, None] + cm[None, :], mask=ok[:, None] & c_ok[None, :],
                            other=0.0)
                wv = tl.load(wdw + (i * KW + j) * Cm + cm, mask=c_ok, other=0.0)
                acc += g.to(tl.float32) * wv.to(tl.float32)[None, :]
    at = n.to(tl.int64) * sgn + hi.to(tl.int64) * sgh + wi.to(tl.int64) * sgw
    tl.store(gx + at[:, None] + c.to(tl.int64)[None, :] * sgc,
             cast(acc, gx.dtype.element_ty, EMULATE_BF16), mask=q_ok[:, None] & c_ok[None, :])


def _strides(t: torch.Tensor, prefix: str) -> dict:
    return {prefix + k: s for k, s in zip("nchw", t.stride())}


def _blocks() -> dict:
    """Block sizes of the backward kernels. Fixed, not tuned: the split of the weight
    reductions must not depend on a timing (see the module docstring). 32 pixels a
    program: at 64, sm_90a / sm_80 spilled 8-112 bytes (ptxas) in float32's _input and
    _pw_weight and in NCHW 7x7's _mid (python -m benchmarks.triton_fit)."""
    if INTERPRET:
        return dict(P=64, C=16, LAUNCH=dict(num_warps=1))
    return dict(P=32, C=64, LAUNCH=dict(num_warps=4, maxnreg=MAXNREG))


def _mid_blocks(bco: int, bk: int) -> tuple[int, int]:
    """_mid's output channels per step of its dot (K) and mid channels per program. It
    holds the depthwise tile, the dot's operands and its accumulator at once: with 64
    mid channels sm_90a spilled 1232 bytes in 16-bit NCHW 7x7 and 240-1520 in float32
    (triton 3.6); with 64 output channels a step, 8 bytes at 32 pixels (7x7 bf16)."""
    return min(bco, 32), min(bk, 32)


def _splits(x: torch.Tensor, programs: int, p_blocks: int, partial_size: int) -> int:
    """How many pixel chunks a weight reduction is split into: enough programs to
    fill the GPU, at most 2^24 partial elements (64 MiB)."""
    target = 2 if INTERPRET or not x.is_cuda else \
        4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(cdiv(target, programs), p_blocks, (1 << 24) // partial_size))


def launch(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
           mid_activation, activation, output_mask, memory_format, norm_eps=None):
    """(gx, gdw, gpw, gdwb, gpwb), None where output_mask is False or the bias is None.
    norm_eps: the forward's LayerNorm over the mid channels (_normed_mid)."""
    need_x, need_dw, need_pw, need_dwb, need_pwb = output_mask
    need_dwb &= dw_bias is not None
    need_pwb &= pw_bias is not None
    N, C, H, W = x.shape
    _, Co, Ho, Wo = grad_y.shape
    Cm, P = dw_weight.shape[0], N * Ho * Wo
    KK = dw_weight.shape[2] * dw_weight.shape[3]
    need_gu = need_x or need_dw or need_dwb
    gx = torch.empty_like(x, memory_format=memory_format) if need_x else None
    if P == 0:  # batch 0: every sum is empty
        zeros = lambda t, want: torch.zeros_like(t) if want else None  # noqa: E731
        return gx, zeros(dw_weight, need_dw), zeros(pw_weight, need_pw), \
            zeros(dw_bias, need_dwb), zeros(pw_bias, need_pwb)

    wdw, wpw = taps_major(dw_weight), pw_weight.reshape(Co, Cm).contiguous()
    geom = pixel_geometry(x, dw_weight, stride, padding, dilation, Ho, Wo)
    b = _blocks()
    channel_block = lambda n: min(b["C"], max(16, next_pow2(n)))  # noqa: E731
    bco, bk = channel_block(Co), channel_block(Cm)
    mode = dot_mode(x)

    grad_y = grad_y.contiguous(memory_format=memory_format)
    config = (dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, mid_activation)
    if norm_eps is not None:
        gz, gu, mid = _normed_mid(grad_y, x, *config, activation, need_gu, memory_format,
                                  norm_eps)
    elif activation == "none":
        gz = grad_y
    else:
        gz = torch.empty_like(grad_y, memory_format=memory_format)
        _fwd.launch(x, *config, activation, gz, grad_y)

    if norm_eps is None:
        gu = torch.empty((P, Cm), dtype=x.dtype, device=x.device) if need_gu else None
        mid = torch.empty((P, Cm), dtype=x.dtype, device=x.device) if need_pw else None
    if norm_eps is None and (need_gu or need_pw):
        bco_mid, bk_mid = _mid_blocks(bco, bk)
        grid = (cdiv(P, b["P"]) * cdiv(Cm, bk_mid),)
        _mid[grid](x, wdw, wdw if dw_bias is None else dw_bias.contiguous(), wpw, gz,
                   gu if need_gu else wpw, mid if need_pw else wpw, P, Cm, Co,
                   **{k: v for k, v in geom.items() if k != "PIXEL_FAST"},
                   **_strides(gz, "sg"), ACT1=ACTIVATIONS.index(mid_activation),
                   HAS_BDW=dw_bias is not None, STORE_GU=need_gu, STORE_MID=need_pw, **mode,
                   BLOCK_P=b["P"], BLOCK_CO=bco_mid, BLOCK_K=bk_mid,
                   **b["LAUNCH"])

    gdw = gpw = None
    p_blocks = cdiv(P, b["P"])
    if need_pw:
        # float32's FMA dot over 64 output channels spilled 24 bytes (NCHW, sm_80, triton
        # 3.9; over 32 mid channels instead, 80-88 on both targets)
        bco_pw = min(bco, 32) if mode["PRECISION"] == "ieee" else bco
        tiles = cdiv(Co, bco_pw) * cdiv(Cm, bk)
        S = _splits(x, tiles, p_blocks, Co * Cm)
        chunk = cdiv(p_blocks, S) * b["P"]
        partial = torch.empty((S, Co, Cm), dtype=torch.float32, device=x.device)
        _pw_weight[(tiles * S,)](gz, mid, partial, P, Cm, Co, Ho, Wo, **_strides(gz, "sg"),
                                 chunk=chunk, **mode, BLOCK_P=b["P"], BLOCK_CO=bco_pw,
                                 BLOCK_K=bk, **b["LAUNCH"])
        gpw = partial.sum(0).to(pw_weight.dtype).view(pw_weight.shape)
    if need_dw:
        tiles = cdiv(Cm, bk) * KK
        S = _splits(x, tiles, p_blocks, Cm * KK)
        chunk = cdiv(p_blocks, S) * b["P"]
        partial = torch.empty((S, Cm, KK), dtype=torch.float32, device=x.device)
        _dw_weight[(tiles * S,)](
            x, gu, partial, P, Cm, **geom, chunk=chunk, BLOCK_P=b["P"], BLOCK_K=bk,
            **b["LAUNCH"])
        gdw = partial.sum(0).to(dw_weight.dtype).view(dw_weight.shape)
    if need_x:
        bc = channel_block(C)
        grid = (cdiv(N * H * W, b["P"]) * cdiv(C, bc),)
        skip = ("sxn", "sxc", "sxh", "sxw", "PIXEL_FAST")
        _input[grid](gu, wdw, gx, N * H * W, C, Cm,
                     **{k: v for k, v in geom.items() if k not in skip}, **_strides(gx, "sg"),
                     EMULATE_BF16=mode["EMULATE_BF16"], BLOCK_P=b["P"], BLOCK_C=bc,
                     **b["LAUNCH"])
    gdwb = gu.sum(0, dtype=torch.float32).to(dw_bias.dtype) if need_dwb else None
    gpwb = gz.sum((0, 2, 3), dtype=torch.float32).to(pw_bias.dtype) if need_pwb else None
    return gx, gdw, gpw, gdwb, gpwb


def _normed_mid(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
                mid_activation, activation, need_gu, memory_format, eps):
    """(gz, gu, mid) of a forward with LayerNorm: mid is the normalised act1(u) [P, Cm],
    made once by the forward's split path and read by every stage after; gu = dL/du
    [P, Cm] (None unless need_gu), by LN's backward (norm.grad) on gz @ W_pw. That GEMM
    is torch's (cuBLAS on the GPU): _mid's dot recomputes the depthwise per column block,
    and LN's backward needs whole rows of its result."""
    N, Co, Ho, Wo = grad_y.shape
    P, Cm = N * Ho * Wo, dw_weight.shape[0]
    config = (dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation)
    mid = torch.empty((P, Cm), dtype=x.dtype, device=x.device)
    emulate = dot_mode(x)["EMULATE_BF16"]
    # the buffer as the forward makes it (act1(u), normalised), and its rstd
    _depthwise_into(mid, x, dw_weight, dw_bias, stride, padding, dilation, mid_activation, Ho, Wo)
    rstd = _norm.normalize(mid, eps, emulate)
    if activation == "none":
        gz = grad_y
    else:
        gz = torch.empty_like(grad_y, memory_format=memory_format)
        _fwd.launch(x, *config, mid_activation, activation, gz, grad_y, mid=mid)
    gu = None
    if need_gu:
        gz_rows = gz.permute(0, 2, 3, 1).reshape(P, Co)  # (a copy where gz is NCHW)
        gu = torch.matmul(gz_rows, pw_weight.reshape(Co, Cm).to(gz_rows.dtype))
        u = None
        if mid_activation != "none":  # act1' reads u itself
            u = torch.empty((P, Cm), dtype=x.dtype, device=x.device)
            _depthwise_into(u, x, dw_weight, dw_bias, stride, padding, dilation, "none", Ho, Wo)
        _norm.grad(gu, mid, rstd, u, ACTIVATIONS.index(mid_activation), emulate)
    return gz, gu, mid


def _depthwise_into(buf, x, dw_weight, dw_bias, stride, padding, dilation, mid_activation, Ho,
                    Wo) -> None:
    """buf [P, Cm] = act1(dw(x) + b_dw) by the forward's _depthwise kernel."""
    wdw = taps_major(dw_weight)
    args = dict(pixel_geometry(x, dw_weight, stride, padding, dilation, Ho, Wo),
                ACT1=ACTIVATIONS.index(mid_activation), HAS_BDW=dw_bias is not None,
                HAS_SCALE=False, EMULATE_BF16=dot_mode(x)["EMULATE_BF16"])
    _fwd.depthwise_into(buf, x, wdw, wdw if dw_bias is None else dw_bias.contiguous(), wdw, args)
