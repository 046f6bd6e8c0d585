"""``stp_fast.convert``: turn a plain model into an STP supernet, in place.

Pipeline (each step's findings go to ``net.report()``):

1. refuse wrapped models (DDP, DataParallel, FSDP, ``torch.compile``) and run the model once on the
   example inputs (the reference output);
2. channel groups from Torch-Pruning's dependency graph (:mod:`stp_fast.dropin.groups`); a group stays
   at full width when it touches something no elastic layer serves, a module in ``ignore``, or -- unless
   ``prune_residual`` -- a residual stream shared by several blocks;
3. skippable blocks from the ``torch.export`` graph (:mod:`stp_fast.dropin.blocks`), grouped into
   stages (a leading block that is never dropped, then the skippable ones);
4. elastic layers swapped in place (:mod:`stp_fast.dropin.elastic`), skippable blocks wrapped;
5. probes: every group at its smallest width and every stage at depth 1 must run and keep the output
   shape, else that group/stage is frozen and reported (the model's output layer ends here);
6. the one-time importance sort (:mod:`stp_fast.dropin.importance`);
7. the cost model (:mod:`stp_fast.dropin.cost`) and the architecture space;
8. checks: the full arch computes the original function (eval, within 1e-5 relative) -- a wrong plan
   fails here, not in epoch 30 -- and the smallest arch runs; ``forward_many`` is compared with one
   pass per arch, and falls back to that when the model reads sizes that differ between subnets.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS, Arch, Space
from stp_fast.dropin import blocks as blocks_mod
from stp_fast.dropin import context, cost, elastic, importance
from stp_fast.dropin.elastic import DimPlan
from stp_fast.dropin.groups import Group, trace
from stp_fast.dropin.supernet import ConvertedNet, Notes, Stage, make_skippable, output_selector, record_templates


class ConversionError(ValueError):
    """The model cannot be converted; the message names the module or node and the reason."""


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "OptimizedModule")


def convert(model: nn.Module, example_inputs, *, outputs: str | Callable | None = None,
            width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 1, depth: bool = True,
            prune_residual: bool = False, ignore: Iterable[str] = (), blocks: Sequence[str] | None = None,
            groups: Sequence[Sequence[str]] | None = None, importance_sort: str | Callable | None = "l1",
            channels_last: bool = False, check: bool = True) -> ConvertedNet:  # fmt: skip
    """Turn ``model`` into a supernet (in place: ``net.model`` is ``model``, state-dict keys unchanged).

    Args:
        model: a plain ``nn.Module`` (torchvision-layout, Hugging Face ``transformers``, custom), not
            wrapped in DDP/DataParallel/FSDP/``torch.compile`` (convert first, wrap the result).
        example_inputs: one batch: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (e.g. ``{"pixel_values": x}``), on the model's device.
        outputs: which tensor of the model's output is the prediction: None (a tensor, ``.logits``,
            ``["logits"]`` or the first element of a tuple), a field name, or a function.
        width_ratios, divisor: width choices per group as fractions of its channels, rounded to
            multiples of ``divisor`` (attention groups: whole heads).
        depth: find skippable blocks (identity-shortcut residual blocks) with ``torch.export``.
        prune_residual: also make residual streams (channels shared by several blocks) elastic.
        ignore: module names (or prefixes) whose channels and blocks stay fixed.
        blocks: the skippable blocks, by name, instead of finding them (children of Sequential/ModuleList).
        groups: channel groups declared by hand, each a list of ``"module:out"`` / ``"module:in"`` dimensions
            of equal size that shrink together (channel i of each is the same channel); they replace the
            traced groups that touch those dimensions (for couplings the dependency graph cannot see).
        importance_sort: ``"l1"`` (default), ``"l2"``, a function ``f(modules, group) -> scores``, or None:
            order each group's channels so that prefixes keep the strongest (pretrained weights).
        channels_last: run 4-D inputs channels-last on the CPU (faster oneDNN convolutions; only for
            models whose code accepts channels-last tensors).
        check: run the self-checks of step 8 (leave on).
    Returns:
        a :class:`~stp_fast.dropin.supernet.ConvertedNet`; ``net.report()`` tells what was found.
    Raises:
        ConversionError (a ValueError) naming the module, node or input that prevents conversion.
    """
    _check_model(model)
    args, kwargs = _split_inputs(example_inputs)
    select = output_selector(outputs)
    ignore = tuple(ignore)
    modules = dict(model.named_modules())
    for name in ignore:
        if name not in modules:
            raise ConversionError(f"ignore={name!r}: the model has no module of that name")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = _reference(model, args, kwargs, select)
        traced = _groups(model, args, kwargs, select)
        groups = _declared(traced, groups, modules) if groups is not None else traced
        notes = Notes()
        _names, stages = _stages(model, args, kwargs, depth, blocks, ignore, notes)
        _freeze(groups, modules, ignore, stages, prune_residual, width_ratios, divisor, notes)
        net = _build(model, groups, stages, select, notes, (args, kwargs), width_ratios, divisor)
        _probe_groups(net, reference, notes)
        _probe_depth(net, reference, notes)
        if importance_sort is not None:
            importance.sort_groups(model, [g for g in groups if g.frozen is None], importance_sort)
            notes.sorted_by = importance_sort if isinstance(importance_sort, str) else "custom"
        _finish_space(net, width_ratios, divisor)
        net.cpu_channels_last = channels_last
        if check:
            _check_function(net, reference)
            _check_batched(net)
    finally:
        model.train(was_training)
    net.train(was_training)
    return net


# ---------------------------------------------------------------------------------------------- inputs
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if name in _WRAPPERS or hasattr(model, "_orig_mod"):
        raise ConversionError(f"convert: the model is wrapped in {name}; convert the plain model first, then wrap "
                              f"the converted net (e.g. DDP(stp_fast.convert(model, x)))")  # fmt: skip
    if any(isinstance(m, (elastic.ElasticModule,)) for m in model.modules()):
        raise ConversionError("convert: the model is already converted (it holds stp_fast elastic layers)")


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs), {}
    raise ConversionError("convert: example_inputs must be a tensor, a non-empty tuple of inputs or a dict of "
                          f"keyword inputs, got {type(example_inputs).__name__}")  # fmt: skip


def _reference(model, args, kwargs, select) -> Tensor:
    try:
        out = model(*args, **kwargs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        raise ConversionError(f"convert: the model fails on example_inputs of shapes {shapes}: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc  # fmt: skip
    try:
        y = select(out)
    except ValueError as exc:
        raise ConversionError(f"convert: {exc}") from exc
    if not isinstance(y, Tensor):
        raise ConversionError(f"convert: outputs= selected a {type(y).__name__}, not a tensor")
    return y.detach().clone()


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def _groups(model, args, kwargs, select) -> list[Group]:
    try:
        return trace(model, args, kwargs, select)
    except Exception as exc:
        raise ConversionError(f"convert: Torch-Pruning's dependency graph could not trace the model: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc  # fmt: skip


def _declared(traced: list[Group], declared: Sequence[Sequence[str]], modules: dict) -> list[Group]:
    """The user's ``groups=``: validated, replacing every traced group that touches one of their dimensions."""
    from stp_fast.dropin.groups import Member

    own, taken = [], set()
    for spec in declared:
        members = []
        for item in spec:
            name, _, dim = str(item).rpartition(":")
            if name not in modules or dim not in ("out", "in"):
                raise ConversionError(f"groups: {item!r} must be 'module:out' or 'module:in' with a module of the model")
            why = elastic.supported(modules[name])
            if why is not None:
                raise ConversionError(f"groups: {name} cannot be elastic: {why}")
            dim = "out" if not isinstance(modules[name], (nn.Conv2d, nn.Conv1d, nn.Linear)) else dim
            members.append((name, dim, elastic._full_size(modules[name], dim)))
        sizes = {size for _, _, size in members}
        if not members or len(sizes) != 1:
            raise ConversionError(f"groups: {list(spec)} must name dimensions of one size, got sizes {sorted(sizes)}")
        size = sizes.pop()
        own.append(Group(members[0][0], size, [Member(n, d, list(range(size))) for n, d, _ in members]))
        taken |= {(n, d) for n, d, _ in members}
    kept = [g for g in traced if not any((m.module, m.dim) in taken for m in g.members)]
    return kept + own


# ---------------------------------------------------------------------------------------------- depth
def _stages(model, args, kwargs, depth: bool, blocks: Sequence[str] | None, ignore, notes: Notes
            ) -> tuple[list[str], list[Stage]]:  # fmt: skip
    """Skippable blocks and the stages they form."""
    if not depth:
        return [], []
    if blocks is not None:
        known = set(blocks_mod.candidates(model))
        bad = [b for b in blocks if b not in known]
        if bad:
            raise ConversionError(f"blocks={bad}: not children of an nn.Sequential/nn.ModuleList of the model")
        names = list(blocks)
    else:
        try:
            analysis = blocks_mod.find_blocks(model, args, kwargs, ignore=ignore)
        except blocks_mod.DataDependentError as exc:
            raise ConversionError(f"convert: {exc}; stp_fast needs one static graph for every input. Remove the "
                                  f"data-dependent branch, or pass depth=False and blocks=None") from exc  # fmt: skip
        notes.rejected_blocks = analysis.rejected
        notes.depth_error = analysis.error
        notes.norm_relu = blocks_mod.norm_relu_pairs(analysis.program) if analysis.program is not None else set()
        names = analysis.skippable
    return names, _group_stages(model, set(names))


def _group_stages(model: nn.Module, skippable: set[str]) -> list[Stage]:
    stages = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        children = [f"{name}.{c}" if name else c for c in module._modules]
        i = 0
        while i < len(children):
            if children[i] not in skippable:
                i += 1
                continue
            j = i
            while j < len(children) and children[j] in skippable:
                j += 1
            run = children[i:j]
            lead = [children[i - 1]] if i > 0 else []
            members = lead + run
            if len(members) >= 2:
                stages.append(Stage(name, members, [bool(not lead or k > 0) for k in range(len(members))]))
            i = j
    return stages


# ---------------------------------------------------------------------------------------------- width
def _region(name: str, blocks: Sequence[str]) -> str:
    inside = [b for b in blocks if name == b or name.startswith(b + ".")]
    return max(inside, key=len) if inside else ""


def _freeze(groups: list[Group], modules: dict, ignore: tuple, stages: list[Stage], prune_residual: bool,
            width_ratios, divisor: int, notes: Notes) -> None:  # fmt: skip
    """Mark the groups that stay at full width (see the module docstring), with the reason."""
    blocks = [b for s in stages for b in s.blocks]
    for g in groups:
        if g.frozen is None:
            hit = next((m.module for m in g.members for i in ignore if m.module == i or m.module.startswith(i + ".")),
                       None)  # fmt: skip
            if hit is not None:
                g.frozen = f"{hit} is in ignore="
        if g.frozen is None and not prune_residual and _is_stream(g, modules, blocks):
            g.frozen = "residual stream shared by several blocks (prune_residual=True makes it elastic)"
        if g.frozen is None and _choices(g, width_ratios, divisor)[0] >= g.size:
            g.frozen = f"{g.size} channel(s): no smaller width among the choices"
        if g.frozen is not None:
            notes.frozen[g.name] = g.frozen


def _is_stream(g: Group, modules: dict, blocks: Sequence[str]) -> bool:
    regions = {_region(m.module, blocks) for m in g.members}
    if len(regions) > 1:
        return True
    if not g.summed:  # several producers only multiplied together (a squeeze-excitation gate): not a stream
        return False
    producers = [m.module for m in g.members if m.dim == "out" and isinstance(modules[m.module], (nn.Conv2d, nn.Conv1d,
                 nn.Linear)) and not elastic._depthwise(modules[m.module])]  # fmt: skip
    return len({p.rpartition(".")[0] for p in producers}) > 1


def _choices(g: Group, width_ratios, divisor: int) -> list[int]:
    step = g.unit * divisor // math.gcd(g.unit, divisor)
    counts = {min(g.size, max(step, step * round(r * g.size / step))) for r in width_ratios} | {g.size}
    return sorted(c for c in counts if c % g.unit == 0)


def _dim_plans(model: nn.Module, groups: list[Group]) -> dict[str, dict[str, DimPlan]]:
    parts: dict[tuple[str, str], list] = {}
    for g in groups:
        if g.frozen is None:
            for m in g.members:
                parts.setdefault((m.module, m.dim), []).append((g.name, m.positions))
    modules = dict(model.named_modules())
    plans: dict[str, dict[str, DimPlan]] = {}
    for (name, dim), ps in parts.items():
        plans.setdefault(name, {})[dim] = DimPlan(elastic._full_size(modules[name], dim), ps)
    return plans


def _apply_plans(model: nn.Module, groups: list[Group], fuse: Iterable[str] = ()) -> None:
    """Make the members of elastic groups elastic (and the others plain again); ``fuse``: BatchNorm layers
    whose ReLU the multi-subnet BatchNorm op applies itself."""
    plans = _dim_plans(model, groups)
    for name, module in model.named_modules():
        if name in plans:
            elastic.make_elastic(module, plans[name])
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and elastic.supported(module) is None:
            # a BatchNorm at full width (frozen group, residual stream): elastic without dims, so that
            # subnet passes use their own batch statistics and only the full arch updates the running ones
            elastic.make_elastic(module, {})
        else:
            elastic.restore(module)
    for name in fuse:
        module = dict(model.named_modules()).get(name)
        if isinstance(module, elastic.ElasticModule):
            module.__dict__["_stp_fuse_relu"] = True


def _build(model, groups, stages, select, notes, example, width_ratios, divisor) -> ConvertedNet:
    _apply_plans(model, groups, notes.norm_relu)
    modules = dict(model.named_modules())
    for s, stage in enumerate(stages):
        for j, name in enumerate(stage.blocks):
            if j > 0:
                make_skippable(modules[name], s, j)
    space = _space(groups, stages, width_ratios, divisor, example, None)
    return ConvertedNet(model, space, groups, stages, select, notes, example, None)


def _space(groups, stages, width_ratios, divisor, example, cost_model) -> Space:
    elastic_groups = [g for g in groups if g.frozen is None]
    where = {}
    for g in elastic_groups:
        regions = {_region(m.module, [b for st in stages for b in st.blocks[1:]]) for m in g.members}
        if len(regions) == 1 and "" not in regions:
            blk = regions.pop()
            where[g.name] = next((s, st.blocks.index(blk)) for s, st in enumerate(stages) if blk in st.blocks)
    size = _input_size(example)
    return Space(max_depth=tuple(len(st.blocks) for st in stages), groups={g.name: g.size for g in elastic_groups},
                 group_block=where, macs_fn=(lambda a, s: 0) if cost_model is None else cost_model[0],
                 params_fn=(lambda a: 0) if cost_model is None else cost_model[1], input_size=size,
                 width_ratios=tuple(width_ratios), divisor=divisor,
                 group_choices={g.name: tuple(_choices(g, width_ratios, divisor)) for g in elastic_groups})  # fmt: skip


def _input_size(example) -> tuple[int, ...]:
    args, kwargs = example
    first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)), None)
    return tuple(first.shape[1:]) if first is not None else ()


# ---------------------------------------------------------------------------------------------- probes
def _run_arch(net: ConvertedNet, arch: Arch, args=None, kwargs=None) -> Tensor:
    args, kwargs = net.example if args is None else (args, kwargs)
    with torch.no_grad(), context.running(context.Batch([arch], None)):
        return net.outputs(net.model(*args, **kwargs))


def _probe_groups(net: ConvertedNet, reference: Tensor, notes: Notes) -> None:
    """Freeze groups whose smallest width fails to run or changes the output shape."""
    changed = False
    for g in [g for g in net.channel_groups if g.frozen is None]:
        widths = {h.name: h.size for h in net.channel_groups if h.frozen is None}
        widths[g.name] = net.space.choices(g.name)[0]
        arch = Arch.make([len(st.blocks) for st in net.depth_stages], widths)
        why = None
        try:
            y = _run_arch(net, arch)
            if tuple(y.shape) != tuple(reference.shape):
                why = f"shrinking it changes the model's output shape {tuple(reference.shape)} -> {tuple(y.shape)}"
        except Exception as exc:  # the model's code cannot run this group narrower
            why = f"the model fails when it shrinks: {type(exc).__name__}: {_first_line(exc)}"
        if why is not None:
            g.frozen = notes.frozen[g.name] = why
            changed = True
            _apply_plans(net.model, net.channel_groups, notes.norm_relu)
            net.space = _space(net.channel_groups, net.depth_stages, net.space.width_ratios, net.space.divisor, net.example, None)
    if changed:
        _apply_plans(net.model, net.channel_groups, notes.norm_relu)


def _probe_depth(net: ConvertedNet, reference: Tensor, notes: Notes) -> None:
    """Drop every stage to its first block once; a stage that cannot is removed (reported)."""
    args, kwargs = net.example
    with torch.no_grad():
        record_templates(net.model, [b for st in net.depth_stages for b in st.blocks[1:]], lambda: net.model(*args, **kwargs))
    keep = []
    for s, stage in enumerate(net.depth_stages):
        depth = [len(st.blocks) for st in net.depth_stages]
        depth[s] = 1
        arch = Arch.make(depth, net.space.full().widths)
        try:
            y = _run_arch(net, arch)
            ok = tuple(y.shape) == tuple(reference.shape)
            why = None if ok else f"dropping its blocks changes the output shape to {tuple(y.shape)}"
        except Exception as exc:
            why = f"{type(exc).__name__}: {_first_line(exc)}"
        if why is None:
            keep.append(stage)
        else:
            for blk in stage.blocks[1:]:
                notes.rejected_blocks[blk] = f"dropping it fails: {why}"
    if len(keep) != len(net.depth_stages):
        from stp_fast.dropin.supernet import restore_block

        modules = dict(net.model.named_modules())
        for stage in net.depth_stages:
            for blk in stage.blocks[1:]:
                restore_block(modules[blk])
        net.depth_stages = keep
        for s, stage in enumerate(keep):
            for j, blk in enumerate(stage.blocks[1:], start=1):
                make_skippable(modules[blk], s, j)
    net.space = _space(net.channel_groups, net.depth_stages, net.space.width_ratios, net.space.divisor, net.example, None)


# ---------------------------------------------------------------------------------------------- cost + space
def _finish_space(net: ConvertedNet, width_ratios, divisor: int) -> None:
    costs: dict[tuple, cost.CostModel] = {}

    def model_at(size: tuple) -> cost.CostModel:
        if size not in costs:
            costs[size] = _cost_model(net, size)
        return costs[size]

    def macs(arch: Arch, size: tuple) -> int:
        return model_at(tuple(size)).macs(arch.widths, net.dropped_blocks(arch))

    def params(arch: Arch) -> int:
        return model_at(tuple(net.space.input_size)).count_params(arch.widths, net.dropped_blocks(arch))

    net.space = _space(net.channel_groups, net.depth_stages, width_ratios, divisor, net.example, (macs, params))
    net.cost = model_at(tuple(net.space.input_size))


def _first_rows(tree, size: tuple | None = None):
    """The example with batch size 1 (or a zero image of ``size`` for a single-tensor input)."""
    def one(t):
        return t[:1] if isinstance(t, Tensor) and t.dim() > 0 else t

    return tree_map(one, tree)


def _cost_model(net: ConvertedNet, size: tuple) -> cost.CostModel:
    args, kwargs = net.example
    if tuple(size) != _input_size(net.example):
        if len(args) != 1 or kwargs:
            raise ValueError(f"macs at input size {size}: only models with one tensor input can be counted at "
                             "another size than the example's")  # fmt: skip
        args = (args[0].new_zeros((1, *size)),)
    args, kwargs = _first_rows((args, kwargs))
    model = net.model
    droppable = [b for st in net.depth_stages for b in st.blocks[1:]]
    modules = dict(model.named_modules())
    leaves = [(n, m) for n, m in modules.items() if not list(m.children())]
    owners = {n: tuple(b for b in droppable if n == b or n.startswith(b + ".")) for n, _ in modules.items()}
    full_widths = {g.name: g.size for g in net.channel_groups if g.frozen is None}
    full_depth = [len(st.blocks) for st in net.depth_stages]

    def probe(partial: Mapping[str, int]):
        arch = Arch.make(full_depth, full_widths | dict(partial))
        calls: list[cost.Record] = []
        stack: list[str] = []
        seen: dict[str, int] = {}

        def hook(name):
            def fn(module, inputs, output):
                rec = cost.call_record(module, inputs, output)
                if rec is not None:
                    seen[name] = seen.get(name, 0) + 1
                    calls.append(cost.Record(f"{name}#{seen[name]}", tuple(stack), *rec))

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
        for b in droppable:
            handles.append(modules[b].register_forward_pre_hook(lambda _m, _i, b=b: stack.append(b)))
            handles.append(modules[b].register_forward_hook(lambda _m, _i, _o: stack.pop() and None))
        try:
            with torch.no_grad(), context.running(context.Batch([arch], None)):
                model(*args, **kwargs)
                params = [cost.Record(n, owners[n], *cost.param_record(m)) for n, m in modules.items()
                          if any(True for _ in m.parameters(recurse=False))]  # fmt: skip
        finally:
            for h in handles:
                h.remove()
        return calls, params

    shrunk = {g.name: net.space.choices(g.name)[0] for g in net.channel_groups if g.frozen is None}
    return cost.CostModel(probe, full_widths, shrunk, droppable)


# ---------------------------------------------------------------------------------------------- checks
def _close(a: Tensor, b: Tensor, rtol: float) -> float | None:
    """None if ``a`` equals ``b`` within ``rtol`` of b's scale, else the error."""
    if a.shape != b.shape:
        return math.inf
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    scale = b.float().abs().max().item() if b.numel() else 0.0
    return None if err <= rtol * max(scale, 1e-6) else err


def _check_function(net: ConvertedNet, reference: Tensor) -> None:
    args, kwargs = net.example
    with torch.no_grad():
        y = net.outputs(net.model(*args, **kwargs))
    err = _close(y, reference, 1e-5)
    if err is not None:
        raise ConversionError(f"convert: after conversion the full model's output differs from the original by {err:.3g}"
                              " (eval mode); the channel plan is wrong for this model -- please report it, and use "
                              "ignore= for the modules involved")  # fmt: skip
    try:
        _run_arch(net, net.space.smallest())
    except Exception as exc:
        raise ConversionError(f"convert: the smallest arch does not run: {type(exc).__name__}: {_first_line(exc)}") \
            from exc  # fmt: skip


@contextlib.contextmanager
def _saved_state(net: ConvertedNet):
    """Restore parameters and buffers (BN statistics) after the train-mode self-check."""
    saved = {k: v.detach().clone() for k, v in net.model.state_dict().items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in net.model.state_dict().items():
                v.copy_(saved[k])


def _check_batched(net: ConvertedNet, count: int = 4) -> None:
    """``forward_many`` (one pass for all archs) against one pass per arch, in eval and train mode (train
    mode only when the model is deterministic there: random ops -- dropout, drop-path -- draw their
    numbers in another order in the two ways)."""
    rng = random.Random(0)
    archs = [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 2)]
    args, kwargs = net.example
    x = args[0] if args else None
    reason = None
    with _saved_state(net), torch.no_grad(), torch.random.fork_rng(devices=[]):
        for mode in ("eval", "train"):
            net.train(mode == "train")
            if mode == "train" and _stochastic(net, x, archs, kwargs):
                break
            try:
                net.batched = True
                together = net.forward_many(x, archs, **kwargs)
                net.batched = False
                alone = net.forward_many(x, archs, **kwargs)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
                break
            bad = [i for i, (a, b) in enumerate(zip(together, alone)) if _close(a, b, 1e-4) is not None]
            if bad:
                reason = f"one pass for all archs differs from one pass per arch ({mode} mode, archs {bad})"
                break
    net.eval()
    net.batched = reason is None
    net.notes.batched = reason


def _stochastic(net: ConvertedNet, x, archs: list[Arch], kwargs) -> bool:
    """Whether two train-mode passes with different seeds differ (dropout, drop-path, ...)."""
    net.batched = False
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outs.append(net.forward_many(x, archs[:2], **kwargs))
    return any(_close(a, b, 1e-6) is not None for a, b in zip(*outs))
