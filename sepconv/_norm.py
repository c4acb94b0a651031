"""LayerNorm's affine folded into the pointwise weight and bias, for the op path.

The native kernels apply the affine themselves (csrc/kernels/norm.h) and sum its
gradients in their tiles. Everywhere else (the Triton kernels, the reference, a compiled,
traced or exported graph) the kernels normalise only, and the affine goes into the
pointwise stage: W (gamma n + beta) + b = (W gamma) n + (W beta + b). That is a pass over
the Co x Cm weight per call, and three more in the backward.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# Folded (weight, bias) of inference calls, by the pointwise weight: the fold writes a new
# Co x Cm weight on every call, a pass over memory beyond the L2 at ConvNeXt's widths
# (0.27 ms of a 1.2 ms 768x7->3072 forward at batch 1 on Zen 5's AVX2 path). Kept while
# the four tensors are the same objects at the same versions (an in-place update, as an
# optimizer step, bumps the version); not where autograd, a compiler or a tracer must
# see the fold. Entry id(W) -> (weakref to W, the four tensors' ids and versions, the
# folded pair), dropped with W: inference holds a folded copy of each such weight.
FOLDED: dict = {}


def fold(w, b, gamma, beta):
    """The pointwise (weight, bias) with LayerNorm's affine (gamma, beta) folded in."""
    tensors = (w, b, gamma, beta)
    key = None
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)) \
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() \
            and type(w) in (Tensor, torch.nn.Parameter):
        try:
            key = tuple((id(t), t._version) if t is not None else None for t in tensors)
        except RuntimeError:  # inference tensors keep no version
            key = None
        hit = FOLDED.get(id(w)) if key is not None else None
        if hit is not None and hit[0]() is w and hit[1] == key:
            return hit[2], hit[3]
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        w, b = fold_plain(w, b, gamma, beta)  # (the torchscript exporter takes no Function)
    else:
        w, b = _Fold.apply(w, b, gamma, beta)
    if key is not None:
        k = id(tensors[0])
        FOLDED[k] = (weakref.ref(tensors[0], lambda _, k=k: FOLDED.pop(k, None)), key, w, b)
    return w, b


def fold_plain(w, b, gamma, beta):
    """fold's formula in standard ops that autograd differentiates itself and ONNX
    exports (a matmul and a broadcast product: no addmv there)."""
    if beta is not None:
        shift = w.flatten(1) @ beta
        b = shift if b is None else b + shift
    return (w * gamma[:, None, None] if gamma is not None else w), b


def fold_grads(w2, gamma, beta, gw2, gb, need):
    """Gradients of (W, gamma, beta) (None where need is False) from those of the folded
    weight (gw2, as the (Co, Cm) matrix) and bias (gb, or None)."""
    gw = ggamma = gbeta = None
    if need[0]:
        gw = gw2 * gamma if gamma is not None else gw2.clone()
        if beta is not None and gb is not None:
            gw = gw.addr_(gb, beta)
    if gamma is not None and need[1]:
        ggamma = (gw2 * w2).sum(0)
    if beta is not None and need[2] and gb is not None:
        gbeta = torch.mv(w2.t(), gb)
    return gw, ggamma, gbeta


class _Fold(torch.autograd.Function):
    """fold's formula and its backward, on W as the (Co, Cm) matrix: autograd's own
    formulas broadcast over the (Co, Cm, 1, 1) weight's unit dims took 1.5 ms a pass at
    3072 x 768 (9 ms of a 12 ms batch-1 training step, Zen 5); as matrices, with the
    weight's two gradient terms in one addr, they are bandwidth-bound passes."""

    @staticmethod
    def forward(ctx, w, b, gamma, beta):
        w2 = w.flatten(1)
        ctx.save_for_backward(w2, gamma, beta)
        ctx.has_b = b is not None
        folded = (w2 * gamma if gamma is not None else w2.clone()).view_as(w)
        if beta is not None:
            b = torch.addmv(b, w2, beta) if b is not None else torch.mv(w2, beta)
        return folded, b

    @staticmethod
    def backward(ctx, gw, gb):
        w2, gamma, beta = ctx.saved_tensors
        need = ctx.needs_input_grad
        gw_in, ggamma, gbeta = fold_grads(w2, gamma, beta, gw.flatten(1), gb,
                                          (need[0], need[2], need[3]))
        return (None if gw_in is None else gw_in.view_as(gw),
                gb if ctx.has_b and need[1] else None, ggamma, gbeta)
