"""LayerNorm over the mid channels of each pixel, for the fused dw -> LN -> pw forms
(ConvNeXt's block), on the [P, Cm] pixel-major buffer of the split forward
(forward._depthwise): normalise in place, and its backward.

The kernels normalise only, (v - mean) * rstd with nn.LayerNorm's biased variance; the
affine is folded into the pointwise weight and bias by sepconv._ops.call. Statistics
and arithmetic are float32 whatever the storage dtype. A program takes BLOCK_P whole
rows and walks their channels in BLOCK_K steps: a pass for the mean, one for the
centred squares (no cancellation), one to write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    MAXNREG,
    activation_grad,
    cast,
    cdiv,
)


@triton.jit(do_not_specialize=["P"])
def _normalize(mid, rstd, P, Cm, eps, EMULATE_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """mid[p, :] = (mid[p, :] - mean) * rstd[p], rstd[p] = 1 / sqrt(var + eps)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    row = p.to(tl.int64)[:, None] * Cm
    s = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, Cm, BLOCK_K):
        cm = k0 + tl.arange(0, BLOCK_K)
        ok = p_ok[:, None] & (cm < Cm)[None, :]
        s += tl.sum(tl.load(mid + row + cm[None, :], mask=ok, other=0.0).to(tl.float32), axis=1)
    mean = s / Cm
    q = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, Cm, BLOCK_K):
        cm = k0 + tl.arange(0, BLOCK_K)
        ok = p_ok[:, None] & (cm < Cm)[None, :]
        v = tl.load(mid + row + cm[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]
        v = tl.where(ok, v, 0.0)
        q += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.sqrt(q / Cm + eps)
    for k0 in range(0, Cm, BLOCK_K):
        cm = k0 + tl.arange(0, BLOCK_K)
        ok = p_ok[:, None] & (cm < Cm)[None, :]
        v = tl.load(mid + row + cm[None, :], mask=ok, other=0.0).to(tl.float32)
        v = (v - mean[:, None]) * inv[:, None]
        tl.store(mid + row + cm[None, :], cast(v, mid.dtype.element_ty, EMULATE_BF16), mask=ok)
    tl.store(rstd + p, inv, mask=p_ok)


@triton.jit(do_not_specialize=["P"])
def _grad(g, normed, rstd, u, P, Cm, ACT1: tl.constexpr, EMULATE_BF16: tl.constexpr,
          BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """In place: g = dL/dN on entry (N = normed, the normalised act1(u)); on return
    dL/du = act1'(u) * rstd * (g - mean(g) - N * mean(g * N))."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    row = p.to(tl.int64)[:, None] * Cm
    a = tl.zeros((BLOCK_P,), dtype=tl.float32)
    b = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, Cm, BLOCK_K):
        cm = k0 + tl.arange(0, BLOCK_K)
        ok = p_ok[:, None] & (cm < Cm)[None, :]
        gv = tl.load(g + row + cm[None, :], mask=ok, other=0.0).to(tl.float32)
        nv = tl.load(normed + row + cm[None, :], mask=ok, other=0.0).to(tl.float32)
        a += tl.sum(gv, axis=1)
        b += tl.sum(gv * nv, axis=1)
    a, b = a / Cm, b / Cm
    s = tl.load(rstd + p, mask=p_ok, other=0.0)
    for k0 in range(0, Cm, BLOCK_K):
        cm = k0 + tl.arange(0, BLOCK_K)
        ok = p_ok[:, None] & (cm < Cm)[None, :]
        gv = tl.load(g + row + cm[None, :], mask=ok, other=0.0).to(tl.float32)
        nv = tl.load(normed + row + cm[None, :], mask=ok, other=0.0).to(tl.float32)
        gv = s[:, None] * (gv - a[:, None] - nv * b[:, None])
        if ACT1 != 0:
            uv = tl.load(u + row + cm[None, :], mask=ok, other=0.0).to(tl.float32)
            gv = activation_grad(gv, uv, ACT1)
        tl.store(g + row + cm[None, :], cast(gv, g.dtype.element_ty, EMULATE_BF16), mask=ok)


def _blocks() -> dict:
    if INTERPRET:
        return dict(BLOCK_P=16, BLOCK_K=16)
    return dict(BLOCK_P=16, BLOCK_K=64, num_warps=4, maxnreg=MAXNREG)


def normalize(mid: torch.Tensor, eps: float, emulate_bf16: bool) -> torch.Tensor:
    """Normalises the rows of mid [P, Cm] in place; returns rstd [P] (float32)."""
    P, Cm = mid.shape
    rstd = torch.empty(P, dtype=torch.float32, device=mid.device)
    b = _blocks()
    if P:
        _normalize[(cdiv(P, b["BLOCK_P"]),)](mid, rstd, P, Cm, eps, EMULATE_BF16=emulate_bf16,
                                             **b)
    return rstd


def grad(g: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor, u: torch.Tensor | None,
         act1: int, emulate_bf16: bool) -> torch.Tensor:
    """g [P, Cm] = dL/d(normalised rows) becomes dL/du in place (act1' from u where act1
    is not the identity); returns g."""
    P, Cm = g.shape
    b = _blocks()
    if P:
        _grad[(cdiv(P, b["BLOCK_P"]),)](g, normed, rstd, normed if u is None else u, P, Cm,
                                        ACT1=act1, EMULATE_BF16=emulate_bf16, **b)
    return g
