"""Do the Triton kernels fit the GPU? Compiled here, no GPU needed.

    python -m benchmarks.triton_fit [--target 90 80] [--quick] [--max-spill BYTES] [--out DIR]

Every launch of the forward and backward kernels is made as sepconv makes it, for a set
of benchmark layers (both layouts, float16 / bfloat16 / float32, the fixed block sizes
and every autotune config of the forward), but on CPU tensors against a stand-in driver
that names an sm_90a (H100/H200) or sm_80 (A100) target: Triton's launcher specialises
the arguments (ints equal to 1, multiples of 16) as on the GPU and compiles the kernel
without launching it. ptxas -v's report gives the spill stores and loads, cuobjdump the
registers and the stack frame off the cubin, and the compiler's metadata the shared memory.

Writes a table per target to DIR (default benchmarks/results/triton-fit/) and exits 1
where a kernel fails to compile, needs more shared memory than the target has, or (with
--max-spill) spills more than that many bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# ptxas -v's report (spill stores and loads) of every kernel compiled, none from the cache
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from sepconv.triton_kernels import forward  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks.shapes import Layer  # noqa: E402
from sepconv import _triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Shared memory a block may use (the opt-in maximum): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}
SHARED_PER_SM = {90: 233472, 80: 167936}  # 228 / 164 KiB, 1 KiB of it reserved per block


def blocks_per_sm(r: dict, cc: int) -> int:
    """Resident blocks per SM (occupancy), as the CUDA occupancy calculator counts:
    65536 registers (allocated per warp in 256s), 64 warps, 32 blocks, shared memory."""
    regs_per_warp = -(-r["registers"] * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * r["warps"])
    by_shared = SHARED_PER_SM[cc] // (r["shared"] + 1024)
    return min(by_regs, by_shared, 64 // r["warps"], 32)
LAYERS = [Layer(144, 56, 24, 1), Layer(512, 14, 512, 1), Layer(64, 112, 128, 2),
          Layer(960, 7, 160, 1), Layer(192, 28, 768, 1, kernel=7, norm=True)]
# --quick: one layer the forward runs fused (960x7->160) and one it splits (7x7 ->768;
# ConvNeXt's, also with its LayerNorm and GELU: compile_layer)
QUICK_LAYERS = [LAYERS[3], LAYERS[4]]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


class _Target:
    """A stand-in for Triton's CUDA driver: one target, no device. The device id is the
    compute capability, so that each target keeps its own kernel cache."""

    def __init__(self, cc: int):
        self.cc = cc

    def get_current_device(self):
        return self.cc

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.cc, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


_compiled: list[tuple[str, dict, object, tuple[int, int]]] = []
_seen: set[int] = set()  # ids of the kernels in _compiled (a cache hit returns the same one)


def _record(jit_run):
    """JITFunction.run, compiling only: each new kernel recorded with its arguments and
    the spill stores and loads ptxas -v reported for it (Triton prints its log)."""
    def run(self, *args, grid, warmup, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()) as log:
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and id(kernel) not in _seen:
            _seen.add(id(kernel))
            name = self.fn.__name__ + (" (GRAD)" if kwargs.get("GRAD") else "") \
                + (" (GEMM)" if kwargs.get("DEPTHWISE") is False else "")
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                log.getvalue())
            assert len(spills) == 1, f"no single ptxas report for {name}: {log.getvalue()}"
            _compiled.append((name, kwargs, kernel, tuple(map(int, spills[0]))))
        return kernel
    return run


def _every_config(self, *args, grid, warmup, **kwargs):
    """Autotuner.run, compiling every config the pruning keeps instead of timing them."""
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())


def resources(kernel) -> dict:
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"sepconv_fit_{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True,
                         text=True, check=True).stdout
    cubin.unlink()
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(registers=int(m[1]), stack=int(m[2]), shared=kernel.metadata.shared,
                warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages)


def compile_layer(layer: Layer, dtype, fmt, autotune: bool) -> None:
    """The launches of one layer's forward, backward (every gradient) and mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, layer.c_in, layer.hw, layer.hw, generator=g).to(dtype) \
        .contiguous(memory_format=fmt)
    k = layer.kernel
    dw = torch.randn(layer.c_in, 1, k, k, generator=g).to(dtype)
    pw = torch.randn(layer.c_out, layer.c_in, 1, 1, generator=g).to(dtype)
    b = torch.randn(layer.c_out, generator=g).to(dtype)
    bd = torch.randn(layer.c_in, generator=g).to(dtype)
    s, p = (layer.stride,) * 2, (k // 2,) * 4
    # the forward launch's own choice, forced: on CPU tensors it would always say no
    forward.autotuned = lambda t: autotune
    y = _triton.forward(x, dw, pw, bd, b, s, p, (1, 1), "relu", "relu6")
    _triton.backward(torch.randn(y.shape, generator=g).to(dtype).contiguous(memory_format=fmt),
                     x, dw, pw, bd, b, s, p, (1, 1), "relu", "relu6", (True,) * 5)
    _triton.mean(x, dw, bd, s, p, (1, 1), "silu")  # squeeze-and-excitation's squeeze
    if layer.norm:  # ConvNeXt's block: LayerNorm's kernels and GELU's forms
        y = _triton.forward(x, dw, pw, bd, b, s, p, (1, 1), "gelu_tanh", "gelu", norm_eps=1e-6)
        _triton.backward(torch.randn(y.shape, generator=g).to(dtype).contiguous(memory_format=fmt),
                         x, dw, pw, bd, b, s, p, (1, 1), "gelu_tanh", "gelu", (True,) * 5,
                         norm_eps=1e-6)


def _commit() -> str:
    run = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                         capture_output=True, text=True)
    return run.stdout.strip() or "(not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.triton_fit",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=int, nargs="+", choices=sorted(SHARED_LIMIT),
                    default=[90, 80])
    ap.add_argument("--quick", action="store_true",
                    help="two layers, bfloat16 and float32, the fixed block sizes (and the "
                    "autotune configs of one case): for CI")
    ap.add_argument("--max-spill", type=int, default=None, metavar="BYTES",
                    help="fail where ptxas reports more bytes of spill stores")
    ap.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                    help="the cases whose name holds each TEXT, e.g. '960x7' nchw float32")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "triton-fit")
    args = ap.parse_args(argv)
    JITFunction.run = _record(JITFunction.run)
    Autotuner.run = _every_config
    layers = QUICK_LAYERS if args.quick else LAYERS
    dtypes = [torch.bfloat16, torch.float32] if args.quick else DTYPES
    rows, errors = [], []
    t0 = time.time()
    for cc in args.target:
        driver.set_active(_Target(cc))
        forward.arch = lambda x, cc=cc: cc  # the launch's block sizes for this target
        for layer in layers:
            for fmt_name, fmt in FORMATS.items():
                for dtype in dtypes:
                    # --quick: the autotune configs for one case (the launch path)
                    tune = not args.quick or (layer is layers[0] and dtype == torch.bfloat16
                                              and fmt_name == "channels_last")
                    for autotune in (False, True) if tune else (False,):
                        before = len(_compiled)
                        case = f"{layer.name()} {fmt_name} {str(dtype)[6:]}"
                        if not all(text in case for text in args.only):
                            continue
                        try:
                            compile_layer(layer, dtype, fmt, autotune)
                        except Exception as exc:  # noqa: BLE001 - reported, then fails the run
                            errors.append(f"sm_{cc} {case}: {type(exc).__name__}: {exc}")
                            continue
                        for name, kw, kernel, (st, ld) in _compiled[before:]:
                            blocks = "x".join(str(v) for key, v in kw.items()
                                              if key.startswith("BLOCK_"))
                            rows.append(dict(target=cc, case=case, kernel=name, blocks=blocks,
                                             tuned=autotune, spill_stores=st, spill_loads=ld,
                                             **resources(kernel)))
    args.out.mkdir(parents=True, exist_ok=True)
    commit = _commit()  # before the first table lands: it may be a tracked file
    for cc in args.target:
        mine = [r for r in rows if r["target"] == cc]
        over = [r for r in mine if r["shared"] > SHARED_LIMIT[cc]]
        errors += [f"sm_{cc} {r['case']} {r['kernel']} {r['blocks']}: shared memory "
                   f"{r['shared']} > {SHARED_LIMIT[cc]}" for r in over]
        spills = [r for r in mine if r["spill_stores"]]
        stacks = [r for r in mine if r["stack"]]
        if args.max_spill is not None:
            errors += [f"sm_{cc} {r['case']} {r['kernel']} {r['blocks']}: spill stores "
                       f"{r['spill_stores']} B > {args.max_spill}" for r in spills
                       if r["spill_stores"] > args.max_spill]
        lines = [f"# Triton kernels on sm_{cc}{'a' if cc == 90 else ''}: triton "
                 f"{triton.__version__}{' (--quick)' if args.quick else ''}", "",
                 f"`python -m benchmarks.triton_fit {' '.join(argv or sys.argv[1:])}` at "
                 f"sepconv {commit}", "",
                 f"{len(mine)} kernels compiled; {len(spills)} spill registers (ptxas: spill "
                 f"stores); {len(stacks)} have a stack frame; {len(over)} over the "
                 f"shared-memory limit ({SHARED_LIMIT[cc]} bytes).", "",
                 "Blocks/SM: resident blocks per multiprocessor (registers, shared memory, "
                 "warps), the occupancy the kernel can reach.", "",
                 "| layer, layout, dtype | kernel | blocks | autotune config | warps | "
                 "stages | registers | stack bytes | spill stores | spill loads | "
                 "shared bytes | blocks/SM |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['kernel']} | {r['blocks']} | "
                  f"{'yes' if r['tuned'] else 'fixed'} | {r['warps']} | {r['stages']} | "
                  f"{r['registers']} | {r['stack']} | {r['spill_stores']} | "
                  f"{r['spill_loads']} | {r['shared']} | "
                  f"{blocks_per_sm(r, cc)} |" for r in mine]
        path = args.out / f"sm{cc}_triton{triton.__version__}{'_quick' if args.quick else ''}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"sm_{cc}: {len(mine)} kernels, {len(spills)} spilling (max "
              f"{max((r['spill_stores'] for r in mine), default=0)} B stored), "
              f"{len(stacks)} with a stack frame (max "
              f"{max((r['stack'] for r in mine), default=0)} B), max registers "
              f"{max((r['registers'] for r in mine), default=0)}, max shared "
              f"{max((r['shared'] for r in mine), default=0)} B -> {path}")
    print(f"{len(rows)} kernels in {time.time() - t0:.0f} s")
    for e in errors:
        print("ERROR", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
