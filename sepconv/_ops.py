"""The ``sepconv::`` custom ops: forward and backward, their fake kernels and autograd.

Arguments are already checked and normalised by ``sepconv.functional``:
stride / dilation are [h, w], padding is [top, bottom, left, right] (zeros),
activations are names from ``reference.ACTIVATIONS`` and ``backend`` is resolved
at the call site, so forward and backward of one call always take the same path.

Per device ("auto"): CPU float32/float64 -> sepconv._C; CUDA float16/bfloat16/float32
-> the Triton kernels; everything else -> the PyTorch reference.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import _native, _norm, _triton, reference

_warned_no_triton = False


def _impl(x: Tensor, backend: str):
    """The module (_native, _triton or reference) that runs this call's kernels."""
    global _warned_no_triton
    if backend == "reference":
        return reference
    if backend == "native":
        if not _native.supports(x):
            why = "are not built" if _native._C is None else \
                f"have no {x.dtype} {x.device.type} path"
            raise RuntimeError(f"sepconv: backend 'native' requested but the native kernels {why}")
        return _native
    if backend == "triton":
        why = _triton.unsupported(x)
        if why:
            raise RuntimeError(f"sepconv: backend 'triton' requested but {why}")
        return _triton
    if _native.supports(x):
        return _native
    if x.device.type == "cuda":
        if _triton.unsupported(x) is None:
            return _triton
        if not _triton.installed() and not _warned_no_triton:
            _warned_no_triton = True
            warnings.warn("sepconv: Triton is not installed, so CUDA tensors take the PyTorch "
                          "reference path (pip install 'sepconv[gpu]')", RuntimeWarning,
                          stacklevel=4)
    return reference


def _out_like(x: Tensor, shape) -> Tensor:
    return x.new_empty(shape).contiguous(memory_format=_native.memory_format(x))


@torch.library.custom_op("sepconv::separable_conv2d", mutates_args=())
def separable_conv2d(
    x: Tensor, dw_weight: Tensor, pw_weight: Tensor, dw_bias: Tensor | None,
    pw_bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
    mid_activation: str, activation: str, backend: str, scale: Tensor | None = None,
    pw_groups: int = 1, shuffle: int = 1, norm_eps: float | None = None,
) -> Tensor:
    """y = act(pw(act_mid(dw(x) + dw_bias) * scale) + pw_bias), on every device; scale
    (N, C * m) or None: squeeze-and-excitation's per-image factor of each mid channel.
    pw_groups: the pointwise conv's groups (pw_weight (C_out, C * m / pw_groups, 1, 1)).
    shuffle: x goes through a channel shuffle of that many groups first (the native
    kernels read it through the shuffle; elsewhere it is made). norm_eps: None, or
    LayerNorm without affine over each pixel's mid channels before the pointwise conv
    (``call`` folds the affine into pw_weight and pw_bias: _norm.fold)."""
    impl = _impl(x, backend)
    fmt = _native.memory_format(x)
    if shuffle > 1 and impl is not _native:
        x = _native.shuffle_channels(x, shuffle)
    if pw_groups > 1 and impl is _triton:  # (its kernels take a dense pointwise weight)
        pw_weight, pw_groups = dense_pointwise(pw_weight, pw_groups), 1
    args = (x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
            mid_activation, activation)
    kw = {} if scale is None else {"scale": scale}
    if pw_groups > 1:
        kw["pw_groups"] = pw_groups
    if shuffle > 1 and impl is _native:
        kw["shuffle"] = shuffle
    if norm_eps is not None:
        kw["norm_eps"] = norm_eps
    return impl.forward(*args, **kw).contiguous(memory_format=fmt)


def dense_pointwise(w: Tensor, groups: int) -> Tensor:
    """The block-diagonal (C_out, C_mid, 1, 1) weight that a grouped pointwise weight
    (C_out, C_mid / groups, 1, 1) stands for: the dense op's, zeros off the blocks."""
    Co, Kg = w.shape[:2]
    return torch.block_diag(*w.reshape(groups, Co // groups, Kg)).reshape(Co, Kg * groups, 1, 1)


def grouped_grad(g: Tensor, groups: int) -> Tensor:
    """The gradient of the grouped pointwise weight: the diagonal blocks of the dense
    weight's gradient g (C_out, C_mid, 1, 1)."""
    Co, Cm = g.shape[:2]
    blocks = g.reshape(groups, Co // groups, groups, Cm // groups).diagonal(dim1=0, dim2=2)
    return blocks.permute(2, 0, 1).reshape(Co, Cm // groups, 1, 1)


@separable_conv2d.register_fake
def _(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, mid_activation,
      activation, backend, scale=None, pw_groups=1, shuffle=1, norm_eps=None):
    Ho, Wo = _native.output_size(x, dw_weight, stride, padding, dilation)
    return _out_like(x, (x.shape[0], pw_weight.shape[0], Ho, Wo))


@torch.library.custom_op("sepconv::separable_conv2d_backward", mutates_args=())
def separable_conv2d_backward(
    grad_y: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor, dw_bias: Tensor | None,
    pw_bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
    mid_activation: str, activation: str, backend: str, output_mask: list[bool],
    y: Tensor | None = None, pw_groups: int = 1, shuffle: int = 1,
    norm_eps: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, dw_weight, pw_weight, dw_bias, pw_bias); an empty tensor where
    ``output_mask`` is False or the bias is None. ``y``, the forward's output, is given
    where the native kernels read the activation's derivative from it. pw_groups: the
    pointwise conv's groups (the native kernels run them; elsewhere the backward runs on
    the dense block-diagonal weight, the zero blocks' work included). shuffle: the
    forward's channel shuffle of x (grad_x is x's). norm_eps: the forward's."""
    impl = _impl(x, backend)
    if impl is _native:
        grads = _native.backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride,
                                 padding, dilation, mid_activation, activation, output_mask,
                                 y=y, pw_groups=pw_groups, shuffle=shuffle, norm_eps=norm_eps)
        return _pack_grads(x, grads, output_mask)
    dense = pw_weight if pw_groups == 1 else dense_pointwise(pw_weight, pw_groups)
    xs = x if shuffle == 1 else _native.shuffle_channels(x, shuffle)
    kw = {} if norm_eps is None else {"norm_eps": norm_eps}
    grads = list(_grouped(impl.backward(grad_y, xs, dw_weight, dense, dw_bias, pw_bias, stride,
                                        padding, dilation, mid_activation, activation,
                                        output_mask, **kw), output_mask, pw_groups))
    if shuffle > 1 and grads[0] is not None:
        grads[0] = _native.shuffle_channels(grads[0], shuffle, inverse=True)
    return _pack_grads(x, grads, output_mask)


def _grad_shapes(x, dw_weight, pw_weight, dw_bias, pw_bias, output_mask):
    """Shape of each returned gradient; (0,) stands for 'not computed'."""
    shapes = (x.shape, dw_weight.shape, pw_weight.shape,
              None if dw_bias is None else dw_bias.shape,
              None if pw_bias is None else pw_bias.shape)
    return [s if (want and s is not None) else (0,) for s, want in zip(shapes, output_mask)]


def _pack_grads(x, grads, output_mask):
    fmt = _native.memory_format(x)
    out = []
    for i, g in enumerate(grads):
        if g is None or not output_mask[i]:
            out.append(x.new_empty(0))
        else:
            out.append(g.contiguous(memory_format=fmt) if i == 0 else g.contiguous())
    return tuple(out)


@separable_conv2d_backward.register_fake
def _(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
      mid_activation, activation, backend, output_mask, y=None, pw_groups=1, shuffle=1,
      norm_eps=None):
    shapes = _grad_shapes(x, dw_weight, pw_weight, dw_bias, pw_bias, output_mask)
    return tuple(_out_like(x, s) if i == 0 and len(s) == 4 else x.new_empty(s)
                 for i, s in enumerate(shapes))


# Where the native training forward keeps z, the pointwise stage's pre-activation, for the
# backward (_NativeAutograd): GELU, whose derivative needs z. Zen 5, 768x7->3072 with
# LayerNorm, batch 8, channels-last, backward call: AVX2 26.2 -> 17.5 ms (the z GEMM no
# longer recomputed); the forward's extra pass over y is a copy's worth. The memory:
# z, one output's size, which the nn pair keeps too (Linear's output, for GELU).
KEEPS_Z = ("gelu", "gelu_tanh")


def _native_keeps_y(activation: str) -> bool:
    """relu' and relu6' can be read from y: the native backward then skips recomputing
    the pointwise GEMM (1 of its 3). y is what the next layer saves as its input anyway."""
    return activation in ("relu", "relu6")


def _grad_mask(ctx, dw_bias, pw_bias) -> list[bool]:
    """The output_mask of the backward op: the gradients autograd wants and that exist."""
    biases = (True, True, True, dw_bias is not None, pw_bias is not None)
    return [bool(need and has) for need, has in zip(ctx.needs_input_grad[:5], biases)]


def _grads_or_none(grads, mask, n_config: int) -> tuple:
    """The backward's return: a gradient per tensor input (None where not wanted), then
    None for each of the n_config hyper-parameters."""
    return tuple(g if want else None for g, want in zip(grads, mask)) + (None,) * n_config


def _setup_context(ctx, inputs, output):
    x, dw_weight, pw_weight, dw_bias, pw_bias, *config, scale, pw_groups, shuffle, norm_eps = \
        inputs
    activation, backend = config[4], config[5]
    ctx.pw_groups, ctx.shuffle, ctx.norm_eps = pw_groups, shuffle, norm_eps
    keep_y = _native_keeps_y(activation) and _impl(x, backend) is _native and scale is None
    ctx.save_for_backward(x, dw_weight, pw_weight, dw_bias, pw_bias, output if keep_y else None,
                          scale)
    ctx.config = config  # stride, padding, dilation, mid_activation, activation, backend


def _backward(ctx, grad_y):
    x, dw_weight, pw_weight, dw_bias, pw_bias, y, scale = ctx.saved_tensors
    mask = _grad_mask(ctx, dw_bias, pw_bias)
    groups = ctx.pw_groups
    if scale is None:
        grads = separable_conv2d_backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias,
                                          *ctx.config, mask, y, groups, ctx.shuffle,
                                          ctx.norm_eps)
        return _grads_or_none(grads, mask, len(ctx.config)) + (None, None, None, None)
    assert ctx.shuffle == 1 and ctx.norm_eps is None, \
        "a scale with a channel shuffle or a norm (refused by the functional)"
    if groups > 1:  # (a scale with groups: on the dense weight, see _grouped)
        pw_weight = dense_pointwise(pw_weight, groups)
    args = (grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, *ctx.config)
    want_scale = ctx.needs_input_grad[11]  # (scale's position; pw_groups is an int)
    *grads, grad_scale = _scaled_backward(*args, scale, mask, want_scale)
    return (_grads_or_none(_grouped(grads, mask, groups), mask, len(ctx.config))
            + (grad_scale if want_scale else None, None, None, None))


def _grouped(grads, mask, groups: int):
    """The gradients with the pointwise weight's as the grouped weight's, from a backward
    on the dense block-diagonal weight (Triton, the reference, and a scale with groups:
    correct, but their pointwise GEMMs do the zero blocks' work too)."""
    if groups == 1 or not mask[2]:
        return grads
    grads = list(grads)
    grads[2] = grouped_grad(grads[2], groups)
    return tuple(grads)


def _scaled_backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding,
                     dilation, mid_activation, activation, backend, scale, mask, want_scale):
    """Gradients of (x, dw_weight, pw_weight, dw_bias, pw_bias, scale) of the scaled op.

    The native kernels take the scale themselves: one call, dscale summed in their tiles.
    Elsewhere (Triton, the reference, or where the op must be seen): image n's output is
    the unscaled op's with the pointwise weight W * scale[n] (each mid channel's column
    scaled), so the backward op runs per image with that weight: its weight gradient G_n
    gives dW += G_n * scale[n] and dscale[n] = sum_o W * G_n. No intermediate is kept
    between the passes; the price there is a kernel call per image.
    """
    config = (stride, padding, dilation, mid_activation, activation)
    if (_impl(x, backend) is _native and not torch.is_grad_enabled()  # (create_graph: ops)
            and _nothing_to_record((grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, scale))):
        return _native.backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, *config,
                                mask, scale=scale, want_scale=want_scale)
    N, (Co, Cm) = x.shape[0], pw_weight.shape[:2]
    W = pw_weight.reshape(Co, Cm)
    need = [mask[0], mask[1], mask[2] or want_scale, mask[3], mask[4]]

    def backward_one(*tensors):
        return separable_conv2d_backward(*tensors, *config, backend, need)
    zero = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
    gx, gdw, gW, gdwb, gpwb = [], zero(dw_weight), zero(W), zero(dw_bias), zero(pw_bias)
    gscale = torch.zeros_like(scale)
    for n in range(N):
        Wn = (W * scale[n]).reshape(pw_weight.shape)
        g = backward_one(grad_y[n:n + 1], x[n:n + 1], dw_weight, Wn, dw_bias, pw_bias)
        if mask[0]:
            gx.append(g[0])
        if mask[1]:
            gdw += g[1]
        if need[2]:
            Gn = g[2].reshape(Co, Cm)
            gW += Gn * scale[n]
            gscale[n] = (W * Gn).sum(0)
        if mask[3] and dw_bias is not None:
            gdwb += g[3]
        if mask[4] and pw_bias is not None:
            gpwb += g[4]
    if mask[0]:  # (zeros at batch 0: an undefined gradient would read as "unused")
        gx = (torch.cat(gx) if gx else torch.zeros_like(x)).contiguous(
            memory_format=_native.memory_format(x))
    return gx, gdw, gW.reshape(pw_weight.shape), gdwb, gpwb, gscale


separable_conv2d.register_autograd(_backward, setup_context=_setup_context)


_PLAIN = frozenset((Tensor, torch.nn.Parameter, type(None)))


def _nothing_to_record(tensors) -> bool:
    """True when a call may skip the dispatcher: eager, no tracer, compiler, profiler,
    dispatch / function mode, functorch transform or tensor subclass that needs to see
    the op. The custom-op machinery costs ~40 us per call under no_grad (~100 us with
    its autograd node), as much as a whole batch-1 MobileNet layer's kernel at 7x7."""
    return not (
        torch.compiler.is_compiling() or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.profiler._is_profiler_enabled
        or not _PLAIN.issuperset(map(type, tensors)))


class _NativeAutograd(torch.autograd.Function):
    """The op's autograd formula (_setup_context / _backward) on the native kernels,
    without the dispatcher: in eager grad mode the custom op and its autograd node cost
    ~100 us more per call than this. The same kernels, so the same results."""

    @staticmethod
    def forward(ctx, x, dw_weight, pw_weight, dw_bias, pw_bias, scale, norm_weight, norm_bias,
                pw_groups, shuffle, norm_eps, *config):
        # GELU: the kernel gives z (act2 = "none"), kept for the backward, and y = GELU(z)
        # is a pass over it, so the backward reads act2' from z instead of recomputing it
        # by a third GEMM (gelu' needs z itself, not y).
        keep_z = config[4] in KEEPS_Z and scale is None
        act2 = "none" if keep_z else config[4]
        y = _native.forward(x, dw_weight, pw_weight, dw_bias, pw_bias, *config[:4], act2,
                            scale=scale, pw_groups=pw_groups, shuffle=shuffle, norm_eps=norm_eps,
                            norm_weight=norm_weight, norm_bias=norm_bias)
        keep_y = _native_keeps_y(config[4]) and scale is None
        ctx.y_is_z = keep_z
        if keep_z:
            y, z = reference._FORWARD[config[4]](y), y
        ctx.save_for_backward(x, dw_weight, pw_weight, dw_bias, pw_bias,
                              z if keep_z else y if keep_y else None, scale, norm_weight,
                              norm_bias)
        ctx.config = config  # stride, padding, dilation, mid_activation, activation
        ctx.pw_groups, ctx.shuffle, ctx.norm_eps = pw_groups, shuffle, norm_eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, dw_weight, pw_weight, dw_bias, pw_bias, y, scale, nw, nb = ctx.saved_tensors
        mask = _grad_mask(ctx, dw_bias, pw_bias)
        want_scale = scale is not None and ctx.needs_input_grad[5]
        want_norm = [nw is not None and ctx.needs_input_grad[6],
                     nb is not None and ctx.needs_input_grad[7]]
        groups, shuffle, eps = ctx.pw_groups, ctx.shuffle, ctx.norm_eps
        if scale is not None and groups > 1:  # (on the dense weight, see _grouped)
            pw_weight = dense_pointwise(pw_weight, groups)
        args = (grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, *ctx.config)
        gs = gnw = gnb = None
        if torch.is_grad_enabled():  # create_graph: the backward op, whose own backward
            # raises clearly (it takes no z: None where y is z)
            if nw is not None or nb is not None:
                grads, gnw, gnb = _folded_backward(args, mask, want_norm, y, ctx, nw, nb)
            elif scale is None:
                grads = separable_conv2d_backward(*args, "native", mask,
                                                  None if ctx.y_is_z else y, groups, shuffle,
                                                  eps)
            else:
                *grads, gs = _scaled_backward(*args, "native", scale, mask, want_scale)
        elif scale is None:
            grads = _native.backward(*args, mask, y=y, pw_groups=groups, shuffle=shuffle,
                                     norm_eps=eps, y_is_z=ctx.y_is_z, norm_weight=nw,
                                     norm_bias=nb, want_norm=want_norm)
            if nw is not None or nb is not None:
                *grads, gnw, gnb = grads
        else:
            *grads, gs = _native.backward(*args, mask, scale=scale, want_scale=want_scale)
        if scale is not None:
            grads = _grouped(grads, mask, groups)
        out = _grads_or_none(grads, mask, 0)
        return (*out, gs if want_scale else None, gnw, gnb, None, None, None) + \
            (None,) * len(ctx.config)


def _folded_backward(args, mask, want_norm, y, ctx, nw, nb):
    """_NativeAutograd's backward with LayerNorm's affine where the graph is recorded
    (create_graph): the backward op on the folded weight and bias (the op takes no
    affine), and the gradients of the weight, gamma and beta from its, in torch ops."""
    grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, *config = args
    w_f, b_f = _norm.fold_plain(pw_weight, pw_bias, nw, nb)
    want_w = mask[2] or want_norm[0]
    want_b = b_f is not None and (mask[4] or want_norm[1] or (mask[2] and nb is not None))
    grads = list(separable_conv2d_backward(
        grad_y, x, dw_weight, w_f, dw_bias, b_f, *config, "native",
        [mask[0], mask[1], want_w, mask[3], want_b], None if ctx.y_is_z else y, 1, 1,
        ctx.norm_eps))
    gw, gnw, gnb = _norm.fold_grads(pw_weight.flatten(1), nw, nb,
                                    grads[2].flatten(1) if want_w else None,
                                    grads[4] if want_b else None, (mask[2], *want_norm))
    if gw is not None:
        grads[2] = gw.view_as(pw_weight)
    return grads, gnw, gnb


def call(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, mid_activation,
         activation, backend, scale=None, mid=None, pw_groups=1, shuffle=1,
         norm_eps=None, norm_weight=None, norm_bias=None) -> Tensor:
    """The forward op, or its native CPU kernel directly where nothing needs to see
    the op (same kernel, same result): plain under no_grad, through _NativeAutograd
    where a gradient is wanted. mid: None, or act_mid(dw(x) + dw_bias) from
    ``call_mean(keep=True)``, which the native forward under no_grad then starts from
    (elsewhere it is recomputed; training takes _NativeExcited instead). pw_groups: the
    pointwise conv's groups; shuffle: x's channel shuffle (not with scale or mid);
    norm_eps: LayerNorm over the mid channels (not with scale, mid, groups or shuffle),
    its affine norm_weight / norm_bias in the native kernels, else folded into the
    pointwise weight and bias for the op (_norm.fold)."""
    if shuffle > 1 and _native.memory_format(x) == torch.channels_last:
        # A channels-last x is shuffled here, by a differentiable torch op whose output
        # the backward keeps: read through the shuffle, it was shuffled again for the
        # backward (training step 0.88x at ShuffleNetV1's units, Zen 5, batch 8); an NCHW
        # x is read through it by the native kernels (1.09x; forward 1.16x).
        x, shuffle = _native.shuffle_channels(x, shuffle), 1
    args = (x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
            mid_activation, activation)
    if (backend in ("auto", "native") and _native.supports(x)
            and _nothing_to_record((x, dw_weight, pw_weight, dw_bias, pw_bias, scale,
                                    norm_weight, norm_bias))):
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (*args[:5], scale, norm_weight, norm_bias))
        if not grad:
            if mid is not None:
                return _native.forward_from_mid(mid, pw_weight, pw_bias, activation, scale,
                                                _native.memory_format(x), pw_groups)
            return _native.forward(*args, scale=scale, pw_groups=pw_groups, shuffle=shuffle,
                                   norm_eps=norm_eps, norm_weight=norm_weight,
                                   norm_bias=norm_bias)
        return _NativeAutograd.apply(*args[:5], scale, norm_weight, norm_bias, pw_groups,
                                     shuffle, norm_eps, *args[5:])
    if norm_weight is not None or norm_bias is not None:
        pw_weight, pw_bias = _norm.fold(pw_weight, pw_bias, norm_weight, norm_bias)
        args = (x, dw_weight, pw_weight, dw_bias, pw_bias, *args[5:])
    if torch.onnx.is_in_onnx_export():  # (an export traces, so it never takes the path above)
        # ONNX has no sepconv op: export the same maths as standard Conv / activation nodes.
        if shuffle > 1:
            args = (_native.shuffle_channels(x, shuffle), *args[1:])
        return reference.forward(*args, scale=scale, pw_groups=pw_groups, norm_eps=norm_eps)
    return separable_conv2d(*args, backend, scale, pw_groups, shuffle, norm_eps)


# --- squeeze-and-excitation's squeeze: the channel means of the intermediate -------------

@torch.library.custom_op("sepconv::depthwise_mean", mutates_args=())
def depthwise_mean(x: Tensor, dw_weight: Tensor, dw_bias: Tensor | None, stride: list[int],
                   padding: list[int], dilation: list[int], mid_activation: str,
                   backend: str) -> Tensor:
    """(N, C * m): mean over the output pixels of act_mid(dw(x) + dw_bias), per image,
    without the full-size intermediate (native and Triton kernels; the reference
    elsewhere)."""
    return _impl(x, backend).mean(x, dw_weight, dw_bias, stride, padding, dilation,
                                  mid_activation)


@depthwise_mean.register_fake
def _(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation, backend):
    return x.new_empty((x.shape[0], dw_weight.shape[0]))


def _mean_setup_context(ctx, inputs, output):
    x, dw_weight, dw_bias, *config = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias)
    ctx.config, ctx.backend = config[:4], config[4]  # stride, padding, dilation, mid_activation


def _mean_backward(ctx, grad):
    """Recomputes the intermediate, which the forward did not keep: the native backward
    kernel where nothing needs to see the ops (_native.mean_backward), else the reference
    formula (torch ops, every device, differentiable)."""
    x, dw_weight, dw_bias = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.needs_input_grad[2] and dw_bias is not None]
    if (_impl(x, ctx.backend) is _native and not torch.is_grad_enabled()
            and _nothing_to_record((grad, x, dw_weight, dw_bias))):
        grads = _native.mean_backward(grad, x, dw_weight, dw_bias, *ctx.config, mask)
    else:
        grads = reference.mean_backward(grad, x, dw_weight, dw_bias, *ctx.config, mask)
    return (*(g if want else None for g, want in zip(grads, mask)), None, None, None, None, None)


depthwise_mean.register_autograd(_mean_backward, setup_context=_mean_setup_context)


class _NativeMean(torch.autograd.Function):
    """The mean op's autograd formula on the native kernels without the dispatcher (as
    _NativeAutograd)."""

    @staticmethod
    def forward(ctx, x, dw_weight, dw_bias, stride, padding, dilation, mid_activation):
        ctx.save_for_backward(x, dw_weight, dw_bias)
        ctx.config, ctx.backend = (stride, padding, dilation, mid_activation), "native"
        return _native.mean(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation)

    @staticmethod
    def backward(ctx, grad):
        return _mean_backward(ctx, grad)[:3] + (None,) * 4


def call_mean(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation,
              backend, keep=False) -> Tensor | tuple[Tensor, Tensor | None]:
    """The mean op, or its native kernel directly where nothing needs to see the op (as
    ``call``). keep: returns (mean, mid) where mid is act_mid(dw(x) + dw_bias) for
    ``call``'s forward to start from, made by the native kernel in the same pass under
    no_grad (elsewhere None: the forward recomputes it)."""
    if (backend in ("auto", "native") and _native.supports(x)
            and _nothing_to_record((x, dw_weight, dw_bias))):
        config = (stride, padding, dilation, mid_activation)
        if not (torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in (x, dw_weight, dw_bias))):
            return _native.mean(x, dw_weight, dw_bias, *config, keep=keep)
        out = _NativeMean.apply(x, dw_weight, dw_bias, *config)
        return (out, None) if keep else out
    if torch.onnx.is_in_onnx_export():  # standard Conv / activation / ReduceMean nodes
        out = reference.mean(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation)
    else:
        out = depthwise_mean(x, dw_weight, dw_bias, stride, padding, dilation, mid_activation,
                             backend)
    return (out, None) if keep else out


# --- a squeeze-and-excitation separable conv as one autograd node ----------------------

class _NativeExcited(torch.autograd.Function):
    """``excited_conv2d`` on the native kernels as one node: the mean's pass (keeping the
    intermediate), the excitation (PyTorch: its small graph, from the means to the scale,
    is kept inside the node), the conv from the intermediate. Separately, the conv's and
    the mean's backward each ran a depthwise backward (recompute, act', the scatter into
    grad_x and the depthwise weight's sums): here the conv's backward gives the pointwise
    gradients, the scale's and dL/d act_mid(u) only, the excitation's backward the means'
    gradient, and one depthwise backward takes both. The intermediate's gradient is a
    temporary of the backward; the forward saves what the two nodes saved."""

    @staticmethod
    def forward(ctx, x, dw_weight, pw_weight, dw_bias, pw_bias, config, excitation, *params):
        stride, padding, dilation, act1, act2 = config
        mean, mid = _native.mean(x, dw_weight, dw_bias, stride, padding, dilation, act1,
                                 keep=True)
        with torch.enable_grad():
            means = mean.requires_grad_()
            scale = excitation(means)
        y = _native.forward_from_mid(mid, pw_weight, pw_bias, act2, scale.detach(),
                                     _native.memory_format(x))
        ctx.save_for_backward(x, dw_weight, pw_weight, dw_bias, pw_bias)
        ctx.excitation = (means, scale, params)
        ctx.config = config
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            raise RuntimeError("sepconv: double backward (create_graph=True) through a "
                               "squeeze-and-excitation SeparableConv2d is not supported")
        x, dw_weight, pw_weight, dw_bias, pw_bias = ctx.saved_tensors
        means, scale, params = ctx.excitation
        stride, padding, dilation, act1, act2 = ctx.config
        need = ctx.needs_input_grad
        depthwise = [need[0], need[1], need[3] and dw_bias is not None]
        out = _native.backward(grad_y, x, dw_weight, pw_weight, dw_bias, pw_bias, *ctx.config,
                               [False, False, need[2], False, need[4] and pw_bias is not None],
                               scale=scale.detach(), want_scale=True, want_mid=any(depthwise))
        gpw, gpwb, gscale, gmid = out[2], out[4], out[5], out[6] if any(depthwise) else None
        wanted = [p for p, n in zip(params, need[7:]) if n]
        inputs = ([means] if any(depthwise) else []) + wanted
        grads = list(torch.autograd.grad(scale, inputs, gscale, retain_graph=True,
                                         allow_unused=True)) if inputs else []
        gx = gdw = gdwb = None
        if any(depthwise):
            gx, gdw, gdwb = _native.mean_backward(grads.pop(0), x, dw_weight, dw_bias, stride,
                                                  padding, dilation, act1, depthwise,
                                                  mid_in=gmid)
        gparams = [grads.pop(0) if n else None for n in need[7:]]
        return gx, gdw, gpw, gdwb, gpwb, None, None, *gparams


def call_excited(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
                 mid_activation, activation, backend, excitation) -> Tensor | None:
    """The one-node native SE conv (_NativeExcited) where it applies: the native kernels,
    eager with nothing to see the ops, a gradient wanted. None elsewhere (the caller runs
    the mean and the conv as two ops)."""
    params = tuple(excitation.parameters())
    tensors = (x, dw_weight, pw_weight, dw_bias, pw_bias, *params)
    if not (backend in ("auto", "native") and _native.supports(x) and x.dim() == 4
            and torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in tensors)
            and _nothing_to_record(tensors)):
        return None
    config = (stride, padding, dilation, mid_activation, activation)
    return _NativeExcited.apply(x, dw_weight, pw_weight, dw_bias, pw_bias, config, excitation,
                                *params)
