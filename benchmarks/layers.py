"""One separable layer: sepconv against the PyTorch dw+pw pair, timed in turns."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

import sepconv
from benchmarks.shapes import Layer

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
CACHE_BYTES = 64 << 20  # rotate inputs until this much is touched (> L2 + L3 here)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 8e-2}


def _act(name):
    return {None: lambda t: t, "relu": lambda t: F.relu(t, inplace=True),
            "relu6": lambda t: F.relu6(t, inplace=True), "gelu": F.gelu}[name]


LN_EPS = 1e-6  # ConvNeXt's


def pytorch_pair(layer: Layer, dw, pw, b_dw, b_pw, ln_w=None, ln_b=None):
    """The unfused reference users would write: two convs (BN folded) and activations;
    with a LayerNorm between them, ConvNeXt's block as torchvision's CNBlock runs it (dw
    conv, permute, LayerNorm, Linear, GELU; its output stays the permuted view)."""
    act1, act2 = _act(layer.mid_activation), _act(layer.activation)
    if layer.norm:
        def block(x):
            u = F.conv2d(x, dw, b_dw, layer.stride, layer.padding, groups=layer.c_in)
            v = F.layer_norm(u.permute(0, 2, 3, 1), (layer.c_in,), ln_w, ln_b, LN_EPS)
            return act2(F.linear(v, pw.flatten(1), b_pw)).permute(0, 3, 1, 2)
        return block

    def run(x):
        u = F.conv2d(x, dw, b_dw, layer.stride, layer.padding, groups=layer.c_in)
        return act2(F.conv2d(act1(u), pw, b_pw, groups=layer.groups))
    return run


def fused(layer: Layer, dw, pw, b_dw, b_pw, ln_w=None, ln_b=None):
    norm = dict(norm="layernorm", norm_weight=ln_w, norm_bias=ln_b, norm_eps=LN_EPS) \
        if layer.norm else {}

    def run(x):
        return sepconv.separable_conv2d(x, dw, pw, b_pw, layer.stride, layer.padding,
                                        depthwise_bias=b_dw, mid_activation=layer.mid_activation,
                                        activation=layer.activation,
                                        pointwise_groups=layer.groups, **norm)
    return run


def check_agree(ours, pair, what: str, kinks: bool = False) -> None:
    """Refuse to time a wrong result: each of ours must match the pair's within the
    dtype's tolerance (absolute part scaled by the largest value: gradients are sums).

    kinks: gradients through relu / relu6. A pre-activation within rounding of the kink
    (|z| ~ 1e-7 in float32, where both implementations err by ~1e-6) gets derivative 0
    in one and 1 in the other, which moves kh*kw*C grad_x elements and the weight
    gradients that sum over them: a batch-32 MobileNetV1 layer has about one. Those
    tensors are compared by relative L2 error (at most 1%, or the dtype's tolerance
    if larger) instead of element by element; one flip costs 0.03-0.6% there, while a
    wrong band, border row or channel costs several percent.
    """
    for i, (a, b) in enumerate(zip(ours, pair, strict=True)):
        tol = TOLERANCE[b.dtype]
        if kinks:
            err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
            if err > max(1e-2, tol):
                raise AssertionError(f"sepconv disagrees with the pair on {what} (tensor {i}): "
                                     f"relative L2 error {err:.2e} > {max(1e-2, tol):.0e}")
            continue
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"sepconv disagrees with the pair on {what} "
                                   f"(tensor {i}): {m}")


def _train_step(fn, params):
    """Forward + backward: the gradient of every input and weight, as training needs."""
    def run(x):
        y = fn(x)
        return torch.autograd.grad(y, [x, *params], torch.ones_like(y))
    return run


def _stepper(fn, inputs):
    """One call of fn per step, on the next of the rotating inputs (so a layer cannot
    run from a warm cache)."""
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(inputs)
        fn(inputs[state["i"]])
    return step


def _block_timer(step, device: str):
    """Seconds per call of ``calls`` back-to-back steps: CUDA events on a GPU,
    torch.utils.benchmark on CPU."""
    if device == "cuda":
        def block(calls: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        return block
    timer = tbench.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return lambda calls: timer.timeit(calls).mean


def interleaved_seconds(variants: dict, min_run_time: float, rounds: int = 15,
                        warmup: int = 3) -> dict:
    """Median seconds per call of each variant (name -> (fn, inputs)).

    The variants take turns in short blocks, round after round, and each gets the
    median of its blocks: on a shared machine whose speed drifts, the drift then
    hits every variant alike instead of whichever ran during a slow spell.
    """
    blocks = {}
    for name, (fn, inputs) in variants.items():
        step = _stepper(fn, inputs)
        for _ in range(warmup):
            step()  # first-touch allocations, thread pools, autotuning
        block = _block_timer(step, inputs[0].device.type)
        once = block(1)
        calls = max(1, int(min_run_time / rounds / max(once, 1e-7)))
        blocks[name] = (block, calls, [])
    for _ in range(rounds):
        for block, calls, times in blocks.values():
            times.append(block(calls))
    return {name: statistics.median(times) for name, (_, _, times) in blocks.items()}


def cuda_kernels(fn, x, calls: int = 5) -> tuple[list[str], float]:
    """Names of the CUDA kernels a call of fn launches (which library ran), and their
    summed device time per call in seconds: the GPU's share of the call, without the
    host's launch overhead that an eager call's wall time also holds."""
    from torch.profiler import ProfilerActivity, profile
    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return sorted({e.key for e in events}), \
        sum(e.self_device_time_total for e in events) / 1e6 / calls


def pair_library(kernels: list[str]) -> str:
    """cuDNN or PyTorch's own depthwise kernel, from the kernel names."""
    if any("conv_depthwise2d" in k for k in kernels):
        return "aten depthwise"
    # cuDNN's own names, and its runtime-built channels-last depthwise kernels (seen on an
    # H200 with cuDNN 9.19: conv2d_c1_k1_nhwc_specialized)
    if any("cudnn" in k.lower() or "xmma" in k or "implicit" in k or "nhwc_specialized" in k
           for k in kernels):
        return "cudnn"
    return "other"


def run_layer(layer: Layer, batch: int, device: str, dtype, mode: str, formats: list[str],
              min_run_time: float, peaks: dict) -> dict:
    """Times of the pair and sepconv in each format, and the derived figures."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    dw = rand(layer.c_in, 1, layer.kernel, layer.kernel, scale=1 / 3)
    k = layer.c_in // layer.groups
    pw = rand(layer.c_out, k, 1, 1, scale=k**-0.5)
    b_dw, b_pw = rand(layer.c_in, scale=0.1), rand(layer.c_out, scale=0.1)
    params = [dw, pw, b_dw, b_pw]
    if layer.norm:  # LayerNorm's weight and bias
        params += [1 + rand(layer.c_in, scale=0.1), rand(layer.c_in, scale=0.1)]
    x_bytes = batch * layer.c_in * layer.hw**2 * dtype.itemsize
    copies = max(1, min(16, CACHE_BYTES // max(x_bytes, 1)))
    backward = mode == "fwdbwd"
    row = {"layer": layer.name(), "c_in": layer.c_in, "hw": layer.hw, "c_out": layer.c_out,
           "stride": layer.stride, "kernel": layer.kernel,
           "flops": layer.flops(batch, backward),
           "min_bytes": layer.min_bytes(batch, dtype.itemsize, backward)}
    variants = {}
    for fmt_name in formats:
        fmt = FORMATS[fmt_name]
        xs = [rand(batch, layer.c_in, layer.hw, layer.hw).contiguous(memory_format=fmt)
              for _ in range(copies)]
        ref, ours = pytorch_pair(layer, *params), fused(layer, *params)
        with torch.no_grad():
            check_agree([ours(xs[0])], [ref(xs[0])], f"{layer.name()} {fmt_name} output")
        if backward:
            for t in xs + params:
                t.requires_grad_()
            ref, ours = _train_step(ref, params), _train_step(ours, params)
            check_agree(ours(xs[0]), ref(xs[0]), f"{layer.name()} {fmt_name} gradients",
                        kinks=True)
        if device == "cuda":
            with torch.set_grad_enabled(backward):
                names, row[f"pytorch_{fmt_name}_kernel_s"] = cuda_kernels(ref, xs[0])
                _, row[f"sepconv_{fmt_name}_kernel_s"] = cuda_kernels(ours, xs[0])
            row[f"pytorch_{fmt_name}_library"] = pair_library(names)
            row[f"pytorch_{fmt_name}_kernels"] = names
        variants[f"pytorch_{fmt_name}_s"] = (ref, xs)
        variants[f"sepconv_{fmt_name}_s"] = (ours, xs)
    with torch.set_grad_enabled(backward):
        row.update(interleaved_seconds(variants, min_run_time))
    best_pair = min(row[f"pytorch_{f}_s"] for f in formats)
    best_ours = min(row[f"sepconv_{f}_s"] for f in formats)
    row["speedup"] = best_pair / best_ours
    row["gflops"] = row["flops"] / best_ours / 1e9
    row["gbs"] = row["min_bytes"] / best_ours / 1e9
    row["pair_gflops"] = row["flops"] / best_pair / 1e9
    row["fraction_compute_peak"] = row["gflops"] / peaks["compute_gflops"]
    row["fraction_bandwidth"] = row["gbs"] / peaks["copy_gbs"]
    return row
