"""Model surgery: fuse the depthwise separable chains of a model into SeparableConv2d, and
approximate standard convolutions by separable ones.

``fuse`` looks for  dw Conv2d -> [BatchNorm2d] -> [act] -> 1x1 Conv2d -> [BatchNorm2d] -> [act]
(act: ReLU, ReLU6, SiLU, Hardswish or Identity) in two places:

1. runs of modules that an ``nn.Sequential`` (and any plain Sequential nested in it, such
   as torchvision's Conv2dNormActivation) calls one after another. The chain becomes one
   SeparableConv2d in the depthwise conv's place and Identity in the others', so the
   model keeps its class, its other attributes and whatever its ``forward`` does around
   them (residual adds, channel shuffles);
2. where chains remain, the ``torch.fx`` graph of the model, which follows calls across
   module boundaries and functional activations (``F.relu(self.bn(self.dw(x)))``). A chain
   fused this way makes the result an ``fx.GraphModule``.

A chain whose intermediate result has any other user is left alone, and so is a Conv2d
or BatchNorm2d subclass that overrides forward (timm's Conv2dSame, BatchNormAct2d).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .complexity import complexity
from .modules import NORMS, SeparableConv2d, pointwise_problem

__all__ = ["fuse", "FuseReport", "from_conv2d", "separate", "SeparateReport"]

ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
               nn.Identity: None}
ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                 F.silu: "silu", F.hardswish: "hardswish"}
ACT_METHODS = {"relu": "relu", "relu_": "relu"}


# --- fuse ----------------------------------------------------------------------------------

@dataclass
class FuseReport:
    """fused: (names of the modules of each chain, in order; "via"); skipped: (name of a
    depthwise conv left as it was, why)."""

    fused: list[tuple[list[str], str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} depthwise separable chain(s), "
                 f"skipped {len(self.skipped)}"]
        lines += [f"  fused   {' -> '.join(names)}  ({via})" for names, via in self.fused]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _is_depthwise(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == m.in_channels
            and m.out_channels % m.in_channels == 0)


def _own_forward(m) -> str:
    """Why fuse() cannot fold ``m`` if it is a Conv2d or norm subclass whose forward is not
    its torch base's, else "". Its attributes do not say what it computes (timm's
    Conv2dSame pads from the input size, StdConv2d standardises its weight,
    BatchNormAct2d applies an activation): folding it by them would be a wrong result."""
    base = next((b for b in (nn.Conv2d, *NORMS) if isinstance(m, b)), None)
    if base is None or type(m).forward is base.forward:
        return ""
    return (f"a {type(m).__name__}, whose forward is its own (fuse() folds only what "
            f"nn.Conv2d and BatchNorm2d compute)")


@dataclass
class _Chain:
    """The modules of one match (names for the report) and how to rebuild it."""

    names: list[str]
    dw: nn.Conv2d
    pw: nn.Conv2d
    dw_norm: nn.Module | None = None
    act1: str | None = None
    pw_norm: nn.Module | None = None
    act2: str | None = None

    def build(self) -> SeparableConv2d:
        return SeparableConv2d.from_conv2d_pair(
            self.dw, self.pw, depthwise_norm=self.dw_norm, mid_activation=self.act1,
            pointwise_norm=self.pw_norm, activation=self.act2)


def _act_name(m) -> str | None | bool:
    """An activation's fused name (None for Identity; a str is fx's name already), or
    False for anything that is not a fusable activation."""
    if isinstance(m, str):
        return m
    if type(m) in ACT_MODULES:
        return ACT_MODULES[type(m)]
    if type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
        return "relu6"
    return False


def _match(names: list[str], mods: list) -> tuple[_Chain | None, str]:
    """The chain that starts at the depthwise conv mods[0] and follows ``mods`` (modules,
    or activation names found by fx), or (None, why there is none)."""
    bad = next((k for k in range(1, len(mods)) if _own_forward(mods[k])), None)
    if bad is not None:  # the chain ends before it, or there is none
        chain, why = _match(names[:bad], mods[:bad])
        return (chain, why) if chain else (None, f"{names[bad]} is {_own_forward(mods[bad])}")
    i = 1

    def optional(fits):
        nonlocal i
        if i < len(mods) and fits(mods[i]):
            i += 1
            return mods[i - 1]
        return None

    dw_norm = optional(lambda m: isinstance(m, NORMS))
    act1 = _act_name(optional(lambda m: _act_name(m) is not False))
    if i == len(mods):
        return None, f"nothing follows {names[-1]} that fuse() can take"
    pw = mods[i]
    if not isinstance(pw, nn.Conv2d):
        kind = pw if isinstance(pw, str) else type(pw).__name__
        return None, f"followed by {kind} ({names[i]}), not a 1x1 Conv2d"
    why = pointwise_problem(pw, mods[0].out_channels)
    if why:
        return None, f"the conv after it ({names[i]}) {why}"
    i += 1
    pw_norm = optional(lambda m: isinstance(m, NORMS))
    act2 = _act_name(optional(lambda m: _act_name(m) is not False))
    chain = _Chain(names[:i], mods[0], pw, dw_norm, act1 or None, pw_norm, act2 or None)
    for norm in (dw_norm, pw_norm):
        if norm is not None and norm.training:
            raise ValueError(f"fuse(): the batch norm in {' -> '.join(chain.names)} is in "
                             "training mode, and batch statistics cannot be folded into "
                             "weights; call model.eval() first")
        if norm is not None and norm.running_mean is None:
            return None, "its batch norm has track_running_stats=False"
    return chain, ""


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _sequential_runs(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """Each outermost plain Sequential's modules in call order, nested plain Sequentials
    flattened: (qualified name, parent, attribute name)."""
    runs = []

    def flatten(seq: nn.Module, prefix: str) -> list:
        out = []
        for name, child in seq.named_children():
            qual = f"{prefix}{name}"
            if _plain_sequential(child):
                out += flatten(child, qual + ".")
            else:
                out.append((qual, seq, name))
                visit(child, qual + ".")
        return out

    def visit(m: nn.Module, prefix: str) -> None:
        if _plain_sequential(m):
            runs.append(flatten(m, prefix))
        else:
            for name, child in m.named_children():
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return runs


def _fuse_sequential(model: nn.Module, held: set[int], report: FuseReport) -> dict:
    """Fuses chains in Sequential runs, none taking a module in ``held``; returns
    {id(dw conv): why not} for the rest."""
    left, plans = {}, []
    for run in _sequential_runs(model):
        i = 0
        while i < len(run):
            name, parent, attr = run[i]
            m = getattr(parent, attr)
            if not _is_depthwise(m) or id(m) in held:
                i += 1
                continue
            window = run[i:i + 6]
            mods = [getattr(p, a) for _, p, a in window]
            cut = next((k for k, mod in enumerate(mods) if id(mod) in held), len(mods))
            chain, why = _match([n for n, _, _ in window[:cut]], mods[:cut])
            if chain is None:
                left[id(m)] = why
                i += 1
                continue
            plans.append((chain, window[:len(chain.names)]))
            i += len(chain.names)
    for chain, window in plans:  # every chain checked before the first change
        fused = chain.build()
        for k, (_, parent, attr) in enumerate(window):
            setattr(parent, attr, fused if k == 0 else nn.Identity())
        report.fused.append((chain.names, "nn.Sequential"))
    return left


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SeparableConv2d) or super().is_leaf_module(m, qualname)


def _graph_step(node: fx.Node, modules: dict):
    """What the graph does at ``node``: its module, an activation name, or None."""
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_function" and node.target in ACT_FUNCTIONS:
        return ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in ACT_METHODS:
        return ACT_METHODS[node.target]
    if node.op == "call_function" and node.target is F.hardtanh and \
            tuple(node.args[1:3]) == (0.0, 6.0):
        return "relu6"
    return None


def _fuse_graph(model: nn.Module, left: dict, report: FuseReport) -> nn.Module:
    """Fuses the chains the fx graph shows among the depthwise convs in ``left``."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # any failure to trace means: no graph to fuse on
        for name, m in model.named_modules():
            if id(m) in left:
                report.skipped.append((name, f"{left[id(m)]}; and the model is not "
                                             f"fx-traceable ({type(exc).__name__}: {exc})"))
        return model
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    plans = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or id(modules[node.target]) not in left:
            continue
        if calls[node.target] > 1:
            report.skipped.append((node.target, "the module is called more than once"))
            continue
        path, mods, stop = [node], [modules[node.target]], ""
        while len(path) < 6:
            users = list(path[-1].users)
            if len(users) != 1:
                stop = f"the output of {path[-1].name} has {len(users)} users"
                break
            step = _graph_step(users[0], modules)
            if step is None or users[0].args[:1] != (path[-1],) or \
                    (users[0].op == "call_module" and calls[users[0].target] > 1):
                break
            path.append(users[0])
            mods.append(step)
        names = [str(n.target) if n.op == "call_module" else n.name for n in path]
        chain, why = _match(names, mods)
        if chain is None:
            report.skipped.append((node.target, stop if stop and len(path) < 4 else why))
            continue
        plans.append((chain, path[:len(chain.names)]))
    if not plans:
        return model
    for chain, path in plans:
        head, last = path[0], path[-1]
        *parent, attr = head.target.split(".")
        setattr(gm.get_submodule(".".join(parent)), attr, chain.build())
        last.replace_all_uses_with(head)
        for n in reversed(path[1:]):
            gm.graph.erase_node(n)
        report.fused.append((chain.names, "torch.fx"))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fuse(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FuseReport]:
    """Every dw conv -> [BN] -> [act] -> 1x1 conv -> [BN] -> [act] chain of ``model`` as one
    SeparableConv2d, batch norms folded. Returns (the model, a FuseReport).

    Batch norms must be in eval mode (``model.eval()``): in training mode they use batch
    statistics and fuse() raises a ValueError; chains without norms are fused either way.
    The result computes what ``model`` does, within fp32 rounding. ``inplace=False`` works
    on a deep copy; with ``inplace=True`` the model itself is changed (and, if a chain was
    fused through torch.fx, the returned GraphModule shares its submodules).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() takes an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    seen = Counter(id(m) for m in model.modules(remove_duplicate=False))
    # Modules no chain may take: shared ones, and depthwise convs with their own forward.
    held = {k for k, n in seen.items() if n > 1}
    report = FuseReport()
    for name, m in model.named_modules():
        if not _is_depthwise(m):
            continue
        why = "the module is shared (it appears more than once)" if id(m) in held \
            else _own_forward(m)
        if why:
            held.add(id(m))
            report.skipped.append((name, why))
    why_not = _fuse_sequential(model, held, report)
    left = {id(m): why_not.get(id(m), "not called by an nn.Sequential")
            for m in model.modules() if _is_depthwise(m) and id(m) not in held}
    if left:
        model = _fuse_graph(model, left, report)
    return model, report


# --- separable approximation of standard convolutions -------------------------------------

def from_conv2d(conv: nn.Conv2d, depth_multiplier: int = 1) -> tuple[SeparableConv2d, float]:
    """The best separable approximation of ``conv`` (groups=1) and its relative error.

    For each input channel c, the (C_out x kh*kw) slice W[:, c] is replaced by its rank-m
    truncated SVD U S V^T (m = depth_multiplier): the m rows of V^T are c's depthwise
    filters, U S the pointwise weights of those m channels. By Eckart-Young this minimises
    ||W - W_separable||_F, and it is exact when m >= min(C_out, kh*kw). Stride, padding,
    dilation, padding_mode and the bias carry over. Returns (module, ||W - W_sep|| / ||W||).
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"from_conv2d() takes an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"from_conv2d() needs groups=1, got groups={conv.groups}")
    if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
        raise ValueError(f"depth_multiplier must be a positive int, got {depth_multiplier!r}")
    W = conv.weight.detach().double()
    Co, C, kh, kw = W.shape
    m = depth_multiplier
    U, S, Vh = torch.linalg.svd(W.permute(1, 0, 2, 3).reshape(C, Co, kh * kw),
                                full_matrices=False)  # per input channel
    r = min(m, S.shape[1])
    dw = torch.zeros(C, m, kh * kw, dtype=W.dtype, device=W.device)
    pw = torch.zeros(Co, C, m, dtype=W.dtype, device=W.device)
    dw[:, :r] = Vh[:, :r]
    pw[:, :, :r] = (U[:, :, :r] * S[:, None, :r]).permute(1, 0, 2)
    sep = SeparableConv2d(C, Co, (kh, kw), conv.stride, conv.padding, conv.dilation,
                          bias=conv.bias is not None, padding_mode=conv.padding_mode,
                          device=conv.weight.device, dtype=conv.weight.dtype,
                          depth_multiplier=m)
    with torch.no_grad():
        sep.depthwise_weight.copy_(dw.reshape(C * m, 1, kh, kw))
        sep.pointwise_weight.copy_(pw.reshape(Co, C * m, 1, 1))
        if conv.bias is not None:
            sep.bias.copy_(conv.bias)
    approx = torch.einsum("ocm,cmk->ock", pw, dw).reshape(Co, C, kh, kw)
    error = (torch.linalg.norm(W - approx) / torch.linalg.norm(W).clamp_min(1e-300)).item()
    return sep, error


@dataclass
class SeparateReport:
    """One row per replaced conv: name, relative weight error, parameters and FLOPs
    (seed 000 convention; None without ``input_size``, or for a conv the forward does not
    call) before and after."""

    rows: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'layer':<28}{'error':>9}{'params':>18}{'FLOPs':>26}"]
        for r in self.rows:
            flops = "" if r["flops_before"] is None else \
                f"{r['flops_before']:>12,} -> {r['flops_after']:<11,}"
            lines.append(f"{r['name']:<28}{r['error']:>9.4f}"
                         f"{r['params_before']:>8,} -> {r['params_after']:<7,}{flops:>26}")
        return "\n".join(lines)


def separate(model: nn.Module, depth_multiplier: int = 1, inplace: bool = False,
             input_size: tuple[int, ...] | None = None) -> tuple[nn.Module, SeparateReport]:
    """Every standard ``nn.Conv2d`` of ``model`` (groups=1, kernel larger than 1x1) replaced
    by ``from_conv2d(conv, depth_multiplier)``: a starting point for fine-tuning. Returns
    (the model, a SeparateReport); FLOPs are reported when ``input_size`` (with the batch)
    is given."""
    if not inplace:
        model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size != (1, 1)]
    def flops(model) -> dict[str, int]:
        rows = complexity(model, input_size).by_name() if input_size else {}
        return {name: row["flops"] for name, row in rows.items()}

    before = flops(model)
    report = SeparateReport()
    for name, conv in targets:
        sep, error = from_conv2d(conv, depth_multiplier)
        *parent, attr = name.split(".")
        setattr(model.get_submodule(".".join(parent)), attr, sep)
        report.rows.append(dict(name=name, error=error,
                                params_before=sum(p.numel() for p in conv.parameters()),
                                params_after=sum(p.numel() for p in sep.parameters()),
                                flops_before=before.get(name)))
    after = flops(model)
    for row in report.rows:
        row["flops_after"] = after.get(row["name"])
    return model, report
