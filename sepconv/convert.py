"""Model surgery: fuse the depthwise separable chains of a model into SeparableConv2d, and
approximate standard convolutions by separable ones.

``fuse`` looks for  dw Conv2d -> [BatchNorm2d] -> [act] -> 1x1 Conv2d -> [BatchNorm2d] -> [act]
(act: ReLU, ReLU6, SiLU, Hardswish, GELU (either form) or Identity) in two places:

1. runs of modules that an ``nn.Sequential`` (and any plain Sequential nested in it, such
   as torchvision's Conv2dNormActivation) calls one after another. The chain becomes one
   SeparableConv2d in the depthwise conv's place and Identity in the others', so the
   model keeps its class, its other attributes and whatever its ``forward`` does around
   them (residual adds, channel shuffles);
2. where chains remain, the ``torch.fx`` graph of the model, which follows calls across
   module boundaries and functional activations (``F.relu(self.bn(self.dw(x)))``). A chain
   fused this way makes the result an ``fx.GraphModule``.

Identities (``nn.Identity``, eval-mode dropout: timm's empty ``aa`` / ``se`` slots) pass
through a chain, and reads of an intermediate's metadata (timm's ``x.ndim`` asserts) are
not uses of it. timm's BatchNormAct2d is read as a norm and its activation, its
Conv2dSame as ``padding="same"`` (TensorFlow's, from the input size), each checked on
random inputs first. A chain whose intermediate result has any other user is left alone,
and so is any other Conv2d or BatchNorm2d subclass that overrides forward (timm's
StdConv2d): its attributes do not say what it computes.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .complexity import complexity
from .functional import resolve_padding
from .modules import NORMS, PLAIN_FORWARDS, Excitation, SeparableConv2d, pointwise_problem
from .reference import _FORWARD as ACTIVATION_FNS

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


# timm's modules that fuse() reads, by class name (timm is not a dependency): a batch norm
# that applies its ``.act`` (after ``.drop``), and convs padded as TensorFlow's SAME from
# the input size. Each is checked on random inputs against that reading before it is
# folded (_probe), so a class of the same name that computes something else is left.
NORM_ACTS = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
SAME_CONVS = ("Conv2dSame", "Conv2dSameExport")
# torchvision's and timm's frozen batch norms (detection backbones): not nn.BatchNorm2d
# subclasses; their statistics and affine parameters are buffers, always used.
FROZEN_NORMS = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
TIMM_GELUS = {"GELU": "gelu", "GELUTanh": "gelu_tanh"}
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


def _is_identity(m) -> bool:
    """Whether ``m`` passes its input through: nn.Identity (timm's empty ``aa`` and ``se``
    slots), or a dropout in eval mode."""
    return type(m) is nn.Identity or (type(m) in DROPOUTS and not m.training)


def _frozen_norm(m) -> bool:
    return type(m).__name__ in FROZEN_NORMS and isinstance(getattr(m, "eps", None), float) \
        and all(isinstance(getattr(m, t, None), torch.Tensor) for t in NORM_TENSORS)


def _is_norm(m) -> bool:
    """A batch norm fuse() can fold: torch's, or a frozen one."""
    return isinstance(m, NORMS) or _frozen_norm(m)


def _norm_act(m) -> bool:
    return _is_norm(m) and type(m).__name__ in NORM_ACTS


def _same_conv(m) -> bool:
    return isinstance(m, nn.Conv2d) and type(m).__name__ in SAME_CONVS


def _probe(m: nn.Module) -> bool:
    """Whether the timm or frozen-norm module ``m`` computes what fuse() reads it as, on
    random inputs (two sizes of each parity for a conv). Not for torch norms in training
    mode (it would update their statistics; fuse() refuses those anyway); on the meta device
    there is nothing to compare, and the reading stands on the class and its attributes."""
    p = next((t for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()), None)
    factory = {"dtype": p.dtype if p is not None else torch.float32,
               "device": p.device if p is not None else None}
    if m.training and isinstance(m, NORMS) or factory["device"] == torch.device("meta"):
        return True
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if _is_norm(m):
            x = torch.randn(2, m.running_mean.numel(), 3, 3, generator=g).to(**factory)
            want = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0,
                                m.eps)
            if _norm_act(m):
                want = ACTIVATION_FNS[_act_name(m.act) or "none"](want)
            tries = [(x, want)]
        else:
            tries = []
            for extra in (1, 2):
                size = [d * (k - 1) + 1 + extra for d, k in zip(m.dilation, m.kernel_size)]
                x = torch.randn(1, m.in_channels, size[0], size[1] + 1,
                                generator=g).to(**factory)
                pads = resolve_padding("same", m.kernel_size, m.stride, m.dilation,
                                       x.shape[-2:])
                xp = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
                tries.append((x, F.conv2d(xp, m.weight, m.bias, m.stride, 0, m.dilation,
                                          m.groups)))
        try:
            return all(torch.allclose(m(x), want, rtol=1e-3, atol=1e-4) for x, want in tries)
        except Exception:  # noqa: BLE001  (anything it raises means: not that reading)
            return False


# Squeeze-and-excitation blocks fuse() reads, by their parts' names: torchvision's
# SqueezeExcitation (and sepconv.models'), timm's SqueezeExcite. Each computes
# x * gate(fc2(act(fc1(mean_hw(x))))); checked on random inputs before it is taken.
SE_PARTS = (("fc1", "activation", "fc2", "scale_activation"),
            ("conv_reduce", "act1", "conv_expand", "gate"))


def _excitation_of(m) -> Excitation | None:
    """The excitation of the squeeze-and-excitation block ``m``, sharing its modules, or
    None where ``m`` is not one (or does not compute what one does)."""
    if not isinstance(m, nn.Module):
        return None
    for names in SE_PARTS:
        fc1, act, fc2, gate = (getattr(m, n, None) for n in names)
        if not (isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d)
                and isinstance(act, nn.Module) and isinstance(gate, nn.Module)
                and fc1.kernel_size == fc2.kernel_size == (1, 1) and fc1.groups == fc2.groups == 1
                and fc2.in_channels == fc1.out_channels and fc2.out_channels == fc1.in_channels):
            continue
        excitation = Excitation(fc1, act, fc2, gate)
        if fc1.weight.device.type == "meta":  # nothing to compare: the structure stands
            return excitation
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, fc1.in_channels, 3, 2, generator=g).to(fc1.weight)
        try:
            with torch.no_grad():
                want = x * excitation(x.mean((2, 3)))[:, :, None, None]
                return excitation if torch.allclose(m(x), want, rtol=1e-3, atol=1e-5) else None
        except Exception:  # noqa: BLE001  (anything it raises means: not that block)
            return None
    return None


def _own_forward(m) -> str:
    """Why fuse() cannot fold ``m`` if it is a Conv2d or norm subclass whose forward is not
    its torch base's and not one fuse() reads, else "". Its attributes do not say what it
    computes (timm's StdConv2d standardises its weight; another BatchNormAct2d may apply
    an activation fuse() has not): folding it by them would be a wrong result."""
    base = next((b for b in (nn.Conv2d, *NORMS) if isinstance(m, b)), None)
    if not _frozen_norm(m) and (base is None or type(m).forward is base.forward):
        return ""
    name = type(m).__name__
    if _norm_act(m):
        act = getattr(m, "act", None)
        if _act_name(act) is False or not _is_identity(getattr(m, "drop", None)):
            drop = type(getattr(m, "drop", None)).__name__
            return (f"a {name} whose act ({type(act).__name__}) or drop ({drop}) fuse() "
                    f"cannot fold")
    elif not (_frozen_norm(m) or _same_conv(m) and m.padding == (0, 0)
              and m.padding_mode == "zeros"):
        return (f"a {name}, whose forward is its own (fuse() folds only what nn.Conv2d, "
                f"BatchNorm2d and timm's {'/'.join(NORM_ACTS + SAME_CONVS)} compute)")
    if not _probe(m):
        return (f"a {name} that does not compute what fuse() reads it as (checked on random "
                f"inputs)")
    return ""


def _plain(m):
    """A recognised timm module as its torch base class, sharing its tensors (None stays
    None): what from_conv2d_pair folds; fuse() handles the activation and padding."""
    if m is None or type(m).forward in PLAIN_FORWARDS:
        return m
    if isinstance(m, nn.Conv2d):
        plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0,
                          m.dilation, m.groups, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        return plain
    plain = nn.BatchNorm2d(m.running_mean.numel(), m.eps, device="meta")
    for name in NORM_TENSORS:  # a frozen norm's weight and bias are buffers
        t = getattr(m, name)
        setattr(plain, name, t if name.startswith("running") or isinstance(t, nn.Parameter)
                else nn.Parameter(t, requires_grad=False))
    return plain.train(m.training and not _frozen_norm(m))


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
    excitation: Excitation | None = None
    shuffle: int = 1  # a channel shuffle before the depthwise conv, folded (its groups)

    def build(self) -> SeparableConv2d:
        fused = SeparableConv2d.from_conv2d_pair(
            _plain(self.dw), _plain(self.pw), depthwise_norm=_plain(self.dw_norm),
            mid_activation=self.act1, pointwise_norm=_plain(self.pw_norm),
            activation=self.act2, padding="same" if _same_conv(self.dw) else None,
            excitation=self.excitation, channel_shuffle=self.shuffle)
        for conv, norm, weight, bias in ((self.dw, self.dw_norm, fused.depthwise_weight,
                                          fused.depthwise_bias),
                                         (self.pw, self.pw_norm, fused.pointwise_weight,
                                          fused.bias)):
            # A frozen tensor stays frozen: each fused one is trainable if what it was
            # computed from is (a folded norm's scale enters both, its shift the bias).
            scale = [norm.weight] if norm is not None else []
            shift = [norm.bias] if norm is not None else []
            for p, sources in ((weight, [conv.weight, *scale]),
                               (bias, [conv.bias, *scale, *shift])):
                if p is not None:
                    p.requires_grad_(any(t is not None and t.requires_grad for t in sources))
        return fused


def _act_name(m) -> str | None | bool:
    """An activation's fused name (None for Identity; a str is fx's name already), or
    False for anything that is not a fusable activation."""
    if isinstance(m, str):
        return m
    if type(m) in ACT_MODULES:
        return ACT_MODULES[type(m)]
    if type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
        return "relu6"
    if type(m) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate, False)
    if type(m).__module__.startswith("timm.") and type(m).__name__ in TIMM_GELUS:
        return TIMM_GELUS[type(m).__name__]  # (its F.gelu, as its forward is read: _probe_block)
    return False


def _match(names: list[str], mods: list, fold_bn: bool) -> tuple[_Chain | None, str]:
    """The chain that starts at the depthwise conv mods[0] and follows ``mods`` (modules,
    or activation names found by fx; identities pass through), or (None, why there is
    none). Batch norms are taken (folded) only with ``fold_bn``."""
    # (each reading of a timm module runs it on random inputs: once per module here)
    bad, reason = next(((k, r) for k in range(1, len(mods)) if (r := _own_forward(mods[k]))),
                       (None, ""))
    if bad is not None:  # the chain ends before it, or there is none
        chain, why = _match(names[:bad], mods[:bad], fold_bn)
        return (chain, why) if chain else (None, f"{names[bad]} is {reason}")
    steps = [0] + [k for k in range(1, len(mods)) if not _is_identity(mods[k])]
    i = 1

    def optional(fits):
        nonlocal i
        if i < len(steps) and fits(mods[steps[i]]):
            i += 1
            return mods[steps[i - 1]]
        return None

    def norm_and_act():  # [norm] [act]; a timm norm that carries an activation is both
        norm = optional(lambda m: fold_bn and _is_norm(m))
        act = _act_name(norm.act) if _norm_act(norm) else None
        if act is None:
            act = _act_name(optional(lambda m: _act_name(m) is not False))
        return norm, act or None

    dw_norm, act1 = norm_and_act()
    excitation = _excitation_of(mods[steps[i]]) if i < len(steps) else None
    i += excitation is not None
    if i == len(steps):
        return None, f"nothing follows {names[-1]} that fuse() can take"
    pw, at = mods[steps[i]], names[steps[i]]
    if not isinstance(pw, nn.Conv2d):
        kind = pw if isinstance(pw, str) else type(pw).__name__
        kept = " (fold_bn=False keeps batch norms)" if _is_norm(pw) else ""
        return None, f"followed by {kind} ({at}), not a 1x1 Conv2d{kept}"
    why = pointwise_problem(pw, mods[0].out_channels)
    if not why and excitation is not None and pw.groups != 1:
        why = f"has groups={pw.groups} after a squeeze-and-excitation, which fuse() cannot take"
    if why:
        return None, f"the conv after it ({at}) {why}"
    i += 1
    pw_norm, act2 = norm_and_act()
    chain = _Chain(names[:steps[i - 1] + 1], mods[0], pw, dw_norm, act1, pw_norm, act2,
                   excitation)
    for norm in (dw_norm, pw_norm):
        if norm is not None and norm.training and not _frozen_norm(norm):
            raise ValueError(f"fuse(): the batch norm in {' -> '.join(chain.names)} is in "
                             "training mode, and batch statistics cannot be folded into "
                             "weights; call model.eval() first, or fuse(..., fold_bn=False) "
                             "to keep the norms as modules")
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


def _shuffle_groups(m) -> int:
    """The groups of a channel shuffle module (sepconv.models.ChannelShuffle, torch's
    nn.ChannelShuffle; not subclasses with a forward of their own), else 0."""
    from .models import ChannelShuffle
    return m.groups if type(m) in (ChannelShuffle, nn.ChannelShuffle) else 0


def _fuse_sequential(model: nn.Module, held: set[int], report: FuseReport,
                     fold_bn: bool) -> dict:
    """Fuses chains in Sequential runs, none taking a module in ``held``; returns
    {id(dw conv): why not} for the rest. A channel shuffle right before a chain
    (ShuffleNetV1) is folded into it (``channel_shuffle``)."""
    left, plans = {}, []
    for run in _sequential_runs(model):
        i = 0
        while i < len(run):
            name, parent, attr = run[i]
            m = getattr(parent, attr)
            if not _is_depthwise(m) or id(m) in held:
                i += 1
                continue
            window = run[i:i + 10]  # room for identities between
            mods = [getattr(p, a) for _, p, a in window]
            cut = next((k for k, mod in enumerate(mods) if id(mod) in held), len(mods))
            chain, why = _match([n for n, _, _ in window[:cut]], mods[:cut], fold_bn)
            if chain is None:
                left[id(m)] = why
                i += 1
                continue
            taken = window[:len(chain.names)]
            if i > 0:  # (a module a chain took is never a shuffle)
                before = getattr(run[i - 1][1], run[i - 1][2])
                groups = _shuffle_groups(before)
                if (groups and id(before) not in held and chain.excitation is None
                        and m.in_channels % groups == 0):
                    chain.shuffle, chain.names = groups, [run[i - 1][0], *chain.names]
                    taken = [run[i - 1], *taken]
            plans.append((chain, taken))
            i += len(taken) - (chain.shuffle > 1)
    for chain, window in plans:  # every chain checked before the first change
        fused = chain.build()
        for k, (_, parent, attr) in enumerate(window):
            setattr(parent, attr, fused if k == 0 else nn.Identity())
        report.fused.append((chain.names, "nn.Sequential"))
    return left


class _Tracer(fx.Tracer):
    """Convs and norms, subclasses included (timm's BatchNormAct2d, Conv2dSame), and the
    squeeze-and-excitation blocks in ``excitations`` (ids; found before tracing, as
    finding one runs it) stay one node: fuse() reads them as modules, and their insides
    (timm's ndim asserts, padding from the input size) are not traced."""

    def __init__(self, excitations: set[int]) -> None:
        super().__init__()
        self.excitations = excitations

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (SeparableConv2d, nn.Conv2d, *NORMS)) or _frozen_norm(m) or \
            id(m) in self.excitations or super().is_leaf_module(m, qualname)


META_ATTRIBUTES = ("ndim", "dtype", "device", "is_cuda")
SPATIAL = (2, 3, -2, -1)  # dims whose size the fused output shares with its intermediates


def _spatial_index(node: fx.Node) -> bool:
    """Whether ``node`` takes a spatial size, or sizes, out of a shape."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    index = node.args[1]
    if isinstance(index, slice):
        return index.start in SPATIAL and index.stop is None and index.step is None
    return index in SPATIAL


def _reads_metadata(user: fx.Node) -> bool:
    """Whether ``user`` reads only what a chain's intermediate results share with its
    output: the number of dims, dtype, device, or the sizes of the spatial dims
    (``size(-1)``, ``shape[-2:]``). Such a read is not a use of the data (timm's
    ``_assert(x.ndim == 4)``); a read of the channel count is."""
    if user.op == "call_function" and user.target is getattr:
        if user.args[1] == "shape":
            return all(_spatial_index(u) for u in user.users)
        return user.args[1] in META_ATTRIBUTES
    if user.op == "call_method" and user.target == "dim":
        return len(user.args) == 1 and not user.kwargs
    if user.op == "call_method" and user.target == "size" and not user.kwargs:
        if len(user.args) == 1:
            return all(_spatial_index(u) for u in user.users)
        return len(user.args) == 2 and user.args[1] in SPATIAL
    return False


def _graph_step(node: fx.Node, modules: dict):
    """What the graph does at ``node``: its module, an activation name, or None."""
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_function" and node.target in ACT_FUNCTIONS:
        return ACT_FUNCTIONS[node.target]
    if node.op == "call_function" and node.target is F.gelu and len(node.args) == 1:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(node.kwargs.get("approximate", "none"))
    if node.op == "call_method" and node.target in ACT_METHODS:
        return ACT_METHODS[node.target]
    if node.op == "call_function" and node.target is F.hardtanh and \
            tuple(node.args[1:3]) == (0.0, 6.0):
        return "relu6"
    return None


SHUFFLE_METHODS = ("view", "reshape", "transpose", "contiguous", "flatten")


def _graph_shuffle(node: fx.Node, modules: dict, channels: int):
    """The channel shuffle whose output is the depthwise conv ``node``'s input, read only
    by it: (groups, the shuffle's input, its name, its nodes), or None. A shuffle
    module, or view / reshape / transpose / contiguous steps (the functional
    channel_shuffle), which are run on random inputs of ``channels`` channels and taken
    only where they give F.channel_shuffle's result for some groups."""
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(src, fx.Node) or len(src.users) != 1:
        return None
    if src.op == "call_module":
        groups = _shuffle_groups(modules[src.target])
        ok = groups and len(src.args) == 1 and isinstance(src.args[0], fx.Node)
        return (groups, src.args[0], str(src.target), {src}) if ok else None
    steps, x = [], src
    while x.op == "call_method" and x.target in SHUFFLE_METHODS and len(steps) < 6:
        steps.append(x)
        if not isinstance(x.args[0], fx.Node):
            return None
        x = x.args[0]
    if len(steps) < 2:
        return None
    # the steps and what their arguments are computed from (x's sizes), x their only input
    needed, stack = set(), [src]
    while stack:
        n = stack.pop()
        if n is x or n in needed:
            continue
        if n.op not in ("call_method", "call_function"):
            return None
        needed.add(n)
        stack += n.all_input_nodes
    graph, env = fx.Graph(), {}
    env[x] = graph.placeholder("x")
    for n in x.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[src])
    run = fx.GraphModule(nn.Module(), graph)
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(2, channels, 3, 4, generator=gen),
              torch.randn(1, channels, 5, 2, generator=gen)]
    try:
        outs = [run(p) for p in probes]
    except Exception:  # noqa: BLE001  (anything it raises means: not a shuffle)
        return None
    for groups in range(2, channels):
        if channels % groups == 0 and all(
                o.shape == p.shape and torch.equal(o, F.channel_shuffle(p, groups))
                for o, p in zip(outs, probes)):
            return groups, x, steps[-1].name, needed
    return None


def _fuse_graph(model: nn.Module, left: dict, report: FuseReport,
                fold_bn: bool) -> nn.Module:
    """Fuses the chains the fx graph shows among the depthwise convs in ``left``."""
    try:
        excitations = {id(m) for m in model.modules() if _excitation_of(m) is not None}
        gm = fx.GraphModule(model, _Tracer(excitations).trace(model))
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
        while len(path) < 10:
            users = [u for u in path[-1].users if not _reads_metadata(u)]
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
        chain, why = _match(names, mods, fold_bn)
        if chain is None:
            report.skipped.append((node.target, stop if stop and len(path) < 4 else why))
            continue
        shuffle = None if chain.excitation else \
            _graph_shuffle(node, modules, modules[node.target].in_channels)
        if shuffle:
            chain.shuffle = shuffle[0]
            chain.names = [shuffle[2], *chain.names]
        plans.append((chain, path[:len(chain.names) - bool(shuffle)], shuffle))
    if not plans:
        return model
    for chain, path, shuffle in plans:
        head, last = path[0], path[-1]
        if shuffle:  # the conv reads the shuffle's input; its steps (and sizes) go
            head.replace_input_with(head.args[0], shuffle[1])
            for n in reversed([n for n in gm.graph.nodes if n in shuffle[3]]):
                if not n.users:
                    gm.graph.erase_node(n)
        *parent, attr = head.target.split(".")
        setattr(gm.get_submodule(".".join(parent)), attr, chain.build())
        for n in path[1:-1]:  # what reads only metadata now reads the fused output's
            for user in [u for u in n.users if u not in path]:
                user.replace_input_with(n, head)
        last.replace_all_uses_with(head)
        for n in reversed(path[1:]):
            gm.graph.erase_node(n)
        report.fused.append((chain.names, "torch.fx"))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fuse(model: nn.Module, inplace: bool = False,
         fold_bn: bool = True) -> tuple[nn.Module, FuseReport]:
    """Every dw conv -> [BN] -> [act] -> 1x1 conv -> [BN] -> [act] chain of ``model`` as one
    SeparableConv2d, batch norms folded (the 1x1 conv may be grouped, and a channel
    shuffle right before the dw conv is folded too). Returns (the model, a FuseReport).

    Batch norms must be in eval mode (``model.eval()``): in training mode they use batch
    statistics and fuse() raises a ValueError. With ``fold_bn=False`` no norm is taken:
    only chains without one between the convs are fused, the norms stay modules, and the
    result trains as ``model`` does (a fused module's parameters start as copies of its
    convs' and keep their ``requires_grad``). The result computes what ``model`` does,
    within fp32 rounding. ``inplace=False`` works on a deep copy; with ``inplace=True`` the
    model itself is changed (and, if a chain was fused through torch.fx, the returned
    GraphModule shares its submodules).
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
    _fuse_convnext(model, held, report)
    why_not = _fuse_sequential(model, held, report, fold_bn)
    left = {id(m): why_not.get(id(m), "not called by an nn.Sequential")
            for m in model.modules() if _is_depthwise(m) and id(m) not in held}
    if left:
        model = _fuse_graph(model, left, report, fold_bn)
    return model, report


# --- ConvNeXt's block: dw conv -> LayerNorm -> Linear -> act ------------------------------
#
# torchvision's CNBlock runs Sequential(dw, Permute([0, 2, 3, 1]), LayerNorm, Linear, GELU,
# Linear, Permute([0, 3, 1, 2])); timm's ConvNeXtBlock calls conv_dw, (permute,) norm,
# mlp.fc1, mlp.act, ... in its own forward (conv_mlp: a channels-first LayerNorm2d and 1x1
# convs). Either's dw conv -> LayerNorm -> first Linear -> act becomes one
# SeparableConv2d(norm="layernorm") in the dw conv's place, the others Identity; in the
# torchvision Sequential the first Permute moves to after them, where the second Linear
# reads channels-last. The second Linear, the layer scale, drop path and the residual stay
# as they are. Each replacement is checked on a random input (_probe_block) and undone if
# the block then computes anything else.

def _is_layer_norm(m, channels: int) -> bool:
    """torch's LayerNorm, or timm's (channels-last LayerNorm, channels-first LayerNorm2d:
    the same F.layer_norm, checked by _probe_block), over ``channels``."""
    return isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (channels,) and (
        type(m) is nn.LayerNorm
        or (type(m).__module__.startswith("timm.") and type(m).__name__ in ("LayerNorm",
                                                                              "LayerNorm2d")))


def _is_permute(m, dims: list[int]) -> bool:
    return type(m).__name__ == "Permute" and list(getattr(m, "dims", ())) == dims


def _as_pointwise(fc, channels: int) -> nn.Conv2d | None:
    """A Linear(channels, k) as the equal 1x1 Conv2d, or a 1x1 Conv2d from channels as it
    is; None for anything else."""
    if type(fc) is nn.Linear and fc.in_features == channels:
        conv = nn.Conv2d(channels, fc.out_features, 1, bias=fc.bias is not None,
                         device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(fc.weight[:, :, None, None])
            if fc.bias is not None:
                conv.bias.copy_(fc.bias)
        return conv
    if type(fc) is nn.Conv2d and pointwise_problem(fc, channels) is None and fc.groups == 1:
        return fc
    return None


def _probe_block(block: nn.Module, run, channels: int, replace, undo) -> bool:
    """Whether ``run`` (``block``'s forward, or a part of it) computes the same on a random
    input after ``replace()`` as before (in eval mode: drop path off); ``undo()`` restores
    it where not. On the meta device there is nothing to run: the reading stands on the
    classes and attributes."""
    p = next((t for t in block.parameters() if t.is_floating_point()), None)
    if p is None or p.device == torch.device("meta"):
        replace()
        return True
    modes = {m: m.training for m in block.modules()}
    x = torch.randn(1, channels, 9, 8, generator=torch.Generator().manual_seed(0)).to(p)
    try:
        block.eval()
        with torch.no_grad():
            want = run(x)
            replace()
            got = run(x)
        same = got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    except Exception:  # noqa: BLE001  (anything it raises means: not that reading)
        same = False
    finally:
        for m in list(modes):
            m.training = modes[m]
    if not same:
        undo()
    return same


def _fuse_convnext(model: nn.Module, held: set[int], report: FuseReport) -> None:
    """ConvNeXt's blocks (above) as SeparableConv2d(norm="layernorm")."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Sequential:
            for i in range(len(m) - 4):
                dw, perm, ln, fc, act = (m[i + k] for k in range(5))
                if not (_is_depthwise(dw) and id(dw) not in held and _is_permute(perm, [0, 2, 3, 1])
                        and _is_layer_norm(ln, dw.out_channels) and _act_name(act) is not False
                        and _as_pointwise(fc, dw.out_channels) is not None):
                    continue
                sep = SeparableConv2d.from_conv2d_pair(
                    dw, _as_pointwise(fc, dw.out_channels), activation=_act_name(act),
                    layer_norm=ln)
                old = [m[i + k] for k in range(5)]

                def replace(m=m, i=i, sep=sep, perm=perm):
                    for k, new in enumerate((sep, nn.Identity(), nn.Identity(), nn.Identity(),
                                             perm)):
                        m[i + k] = new

                def undo(m=m, i=i, old=old):
                    for k, mod in enumerate(old):
                        m[i + k] = mod
                names = [f"{name}.{i + k}" if name else str(i + k) for k in range(5)]
                def run(x, m=m, i=i):  # the Sequential from the dw conv on
                    for mod in list(m)[i:]:
                        x = mod(x)
                    return x
                _take_block(m, run, dw.in_channels, sep, names, replace, undo, held, report)
        elif type(m).__name__ == "ConvNeXtBlock" and type(m).__module__.startswith("timm."):
            _fuse_timm_convnext(name, m, held, report)


def _fuse_timm_convnext(name: str, block: nn.Module, held: set[int], report: FuseReport) -> None:
    dw, ln, mlp = (getattr(block, a, None) for a in ("conv_dw", "norm", "mlp"))
    fc, act = getattr(mlp, "fc1", None), getattr(mlp, "act", None)
    if not (_is_depthwise(dw) and id(dw) not in held and type(dw) is nn.Conv2d
            and type(mlp).__name__ in ("Mlp", "GlobalResponseNormMlp")
            and _is_layer_norm(ln, dw.out_channels) and _act_name(act) is not False
            and _as_pointwise(fc, dw.out_channels) is not None):
        return  # (its dw conv is left to the passes after, which say why)
    sep = SeparableConv2d.from_conv2d_pair(dw, _as_pointwise(fc, dw.out_channels),
                                           activation=_act_name(act), layer_norm=ln)

    def replace():
        block.conv_dw, block.norm, mlp.fc1, mlp.act = sep, nn.Identity(), nn.Identity(), \
            nn.Identity()

    def undo():
        block.conv_dw, block.norm, mlp.fc1, mlp.act = dw, ln, fc, act
    prefix = f"{name}." if name else ""
    names = [prefix + n for n in ("conv_dw", "norm", "mlp.fc1", "mlp.act")]
    _take_block(block, block, dw.in_channels, sep, names, replace, undo, held, report)


def _take_block(block, run, channels, sep, names, replace, undo, held, report) -> None:
    """A ConvNeXt block's replacement, kept and reported where _probe_block finds the block
    unchanged."""
    if _probe_block(block, run, channels, replace, undo):
        report.fused.append((names, "ConvNeXt block"))
        held.add(id(sep))
    else:
        report.skipped.append((names[0], "a ConvNeXt block that computes something else "
                                         "than its parts say"))


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
