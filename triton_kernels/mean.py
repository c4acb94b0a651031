"""Squeeze-and-excitation's squeeze, fused: the mean over the output pixels of
act1(dw(x) + b_dw) per image and mid channel, without the full-size intermediate.

A program sums one tile of an image's pixels for BLOCK_K mid channels into its own slot
of a [N, tiles, Cm] float32 buffer; the tiles are then summed by torch in a fixed order
(no atomics: the same bits on every run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    ACTIVATIONS,
    INTERPRET,
    MAXNREG,
    activate,
    cdiv,
    depthwise_tile,
    pixel_geometry,
    taps_major,
)


@triton.jit
def _mean(x, wdw, bdw, part, Cm, H, W, Ho, Wo, sxn, sxc, sxh, sxw, sh, sw, pt, pl, dh, dw,
          TILES, M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
          PIXEL_FAST: tl.constexpr, ACT1: tl.constexpr, HAS_BDW: tl.constexpr,
          BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[n, t, cm] = the sum of act1(u) over pixels [t * BLOCK_P, (t + 1) * BLOCK_P) of
    image n (program (n * TILES + t, cm block))."""
    n, t = tl.program_id(0) // TILES, tl.program_id(0) % TILES
    cm = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    q = t * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok, cm_ok = q < Ho * Wo, cm < Cm
    ho, wo = q // Wo, q % Wo
    u = depthwise_tile(x, wdw, bdw, n, ho * sh - pt, wo * sw - pl, q_ok, cm, cm_ok, Cm, H, W,
                       sxn, sxc, sxh, sxw, dh, dw, M, KH, KW, HAS_BDW, PIXEL_FAST, BLOCK_P,
                       BLOCK_K)
    v = activate(u, ACT1)  # pixels past the image hold act1(b_dw): masked out
    if PIXEL_FAST:  # [K, P]
        s = tl.sum(tl.where(q_ok[None, :], v, 0.0), axis=1)
    else:
        s = tl.sum(tl.where(q_ok[:, None], v, 0.0), axis=0)
    tl.store(part + (n * TILES + t).to(tl.int64) * Cm + cm, s, mask=cm_ok)


def _blocks() -> dict:
    """_depthwise's tile (forward.py), on 8 warps: on 4, the sum's shuffles spilled 16
    bytes at 7x7 NCHW (sm_90a and sm_80, triton 3.6); 32x16 on 4 warps also fits."""
    if INTERPRET:  # small tiles, so that small test shapes span several
        return dict(BLOCK_P=16, BLOCK_K=16)
    return dict(BLOCK_P=32, BLOCK_K=32, num_warps=8, maxnreg=MAXNREG)


_ARGS = ("H", "W", "Ho", "Wo", "sxn", "sxc", "sxh", "sxw", "sh", "sw", "pt", "pl", "dh", "dw",
         "M", "KH", "KW", "PIXEL_FAST")


def launch(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation, Ho, Wo):
    """(N, C * m) in x's dtype: the per-image channel means of act_mid(dw(x) + dw_bias)."""
    N, Cm = x.shape[0], dw_weight.shape[0]
    if N == 0:
        return x.new_empty((0, Cm))
    blocks = _blocks()
    tiles = cdiv(Ho * Wo, blocks["BLOCK_P"])
    part = torch.empty((N, tiles, Cm), dtype=torch.float32, device=x.device)
    wdw = taps_major(dw_weight)
    bdw = wdw if dw_bias is None else dw_bias.contiguous()
    geom = pixel_geometry(x, dw_weight, stride, padding, dilation, Ho, Wo)
    grid = (N * tiles, cdiv(Cm, blocks["BLOCK_K"]))
    _mean[grid](x, wdw, bdw, part, Cm, **{k: geom[k] for k in _ARGS}, TILES=tiles,
                ACT1=ACTIVATIONS.index(mid_activation), HAS_BDW=dw_bias is not None, **blocks)
    return (part.sum(1) / (Ho * Wo)).to(x.dtype)
