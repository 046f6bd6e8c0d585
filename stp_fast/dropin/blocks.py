"""Depth: which blocks of a model can be skipped, found in its ``torch.export`` graph.

A block is *skippable* when dropping it leaves a valid network that computes ``x -> x`` in its place:
an identity-shortcut residual block.  Candidates are the direct children of ``nn.Sequential`` /
``nn.ModuleList`` containers (so a dropped block can be deleted from its container in the exported
model).  A candidate qualifies when, in the exported aten graph (nodes carry their module path in
``meta["nn_module_stack"]``):

* it is called once, and exactly one of its values is used outside it (its output);
* that output has the shape of one of the tensors flowing into it (the stream ``x``);
* walking back from the output through unary ops (activations, dropout, copies) reaches an addition
  whose operand is ``x`` itself, or another such addition (pre-norm chains ``x + f(x) + g(x + f(x))``).

Blocks with a projection shortcut (``downsample(x) + f(x)``) or that change the shape fail the test.
Only the innermost qualifying candidates are kept.  This is ModelOpt's residual-path rule and NNCF's
one-input/one-output/same-shape rule, on the export graph because ``torch.fx`` cannot trace
Hugging Face models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

_UNARY = {"relu", "relu_", "gelu", "silu", "silu_", "hardtanh", "hardtanh_", "dropout", "dropout_", "clone",
          "contiguous", "alias", "detach", "_to_copy", "to", "identity", "hardswish", "hardswish_", "leaky_relu",
          "leaky_relu_", "elu", "elu_", "mish", "sigmoid", "tanh", "feature_dropout", "alpha_dropout"}  # fmt: skip
_ADD = {"add", "add_"}


class DataDependentError(RuntimeError):
    """The model's control flow depends on the input data: no static graph exists to convert."""


@dataclass
class BlockAnalysis:
    """Skippable blocks (innermost, in model order), rejected candidates with the reason, and the
    reason the graph could not be built (then ``skippable`` is empty and depth stays fixed)."""

    skippable: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    program: torch.export.ExportedProgram | None = field(default=None, repr=False)


def candidates(model: nn.Module, ignore: Iterable[str] = ()) -> list[str]:
    """Qualified names of the direct children of Sequential/ModuleList containers, in model order."""
    ignore = tuple(ignore)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            for child, _ in module.named_children():
                full = f"{name}.{child}" if name else child
                if not any(full == i or full.startswith(i + ".") for i in ignore):
                    out.append(full)
    return out


def export_graph(model: nn.Module, args: tuple, kwargs: Mapping | None = None) -> torch.export.ExportedProgram:
    """The model's aten graph (``torch.export``, non-strict, eval mode; the model's mode is restored).

    Raises :class:`DataDependentError` when the control flow depends on the data, RuntimeError for
    any other export failure."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(args), dict(kwargs or {}), strict=False)
    except Exception as exc:
        text = str(exc)
        first = next((ln for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        if "data-dependent" in text.lower() or "GuardOnDataDependent" in type(exc).__name__:
            where = next((ln.strip() for ln in text.splitlines() if 'File "' in ln or ".py" in ln), "")
            raise DataDependentError(f"the model's control flow depends on the input data ({first.strip()}"
                                     f"{'; at ' + where if where else ''})") from exc  # fmt: skip
        raise RuntimeError(f"torch.export failed: {type(exc).__name__}: {first.strip()}") from exc
    finally:
        model.train(was_training)
    return ep


def _paths(node: torch.fx.Node) -> list[str]:
    return [v[0] for v in node.meta.get("nn_module_stack", {}).values()]


def _keys(node: torch.fx.Node, path: str) -> set[str]:
    return {k for k, v in node.meta.get("nn_module_stack", {}).items() if v[0] == path}


def _name(node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)).split(".")[0] if node.op == "call_function" else node.op


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _reaches_stream(node, stream, inside: set, seen: set | None = None) -> bool:
    """Whether ``node`` is an addition of ``stream`` and something (seen through unary ops), or of
    another such addition."""
    seen = set() if seen is None else seen
    while node.op == "call_function" and _name(node) in _UNARY and node.args and node in inside:
        node = node.args[0]
    if node in seen or node.op != "call_function" or _name(node) not in _ADD or node not in inside:
        return False
    seen.add(node)
    operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    return any(a is stream for a in operands) or any(_reaches_stream(a, stream, inside, seen) for a in operands)


def check_block(ep: torch.export.ExportedProgram, path: str) -> str | None:
    """None if the block at module path ``path`` is skippable, else why not."""
    graph = ep.graph
    user = set(ep.graph_signature.user_inputs)
    params = {n for n in graph.nodes if n.op == "placeholder" and n.name not in user}
    inside = [n for n in graph.nodes if path in _paths(n)]
    if not inside:
        return "not called in the forward"
    if len(set().union(*(_keys(n, path) for n in inside))) > 1:
        return "called more than once"
    members = set(inside)
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    if len(outputs) != 1:
        return f"{len(outputs)} values leave the block (needs exactly one output)"
    out = outputs[0]
    inputs = []
    for n in inside:
        for a in n.all_input_nodes:
            if a not in members and a not in params and a not in inputs:
                inputs.append(a)
    streams = [a for a in inputs if _shape(a) is not None and _shape(a) == _shape(out)]
    if not streams:
        return f"output shape {_shape(out)} differs from every input's (the block changes the shape)"
    if not any(_reaches_stream(out, s, members) for s in streams):
        return "no identity shortcut (the output is not input + f(input))"
    return None


def norm_relu_pairs(ep: torch.export.ExportedProgram) -> set[str]:
    """Module paths of the BatchNorm layers whose only consumer is a ReLU (their ReLU can be fused into the
    multi-subnet BatchNorm op: ReLU is idempotent, so the model's own ReLU applied after it changes nothing)."""
    out = set()
    for node in ep.graph.nodes:
        if node.op != "call_function" or _name(node) not in ("batch_norm", "_native_batch_norm_legit_no_training",
                                                              "_native_batch_norm_legit", "native_batch_norm"):
            continue
        users = list(node.users)
        if _name(node) != "batch_norm":  # tuple-returning variants: the normalised output is item 0
            items = [u for u in users if u.op == "call_function" and u.args[1:2] == (0,)]
            users = [w for it in items for w in it.users] if len(items) == 1 else []
        if len(users) == 1 and users[0].op == "call_function" and _name(users[0]) in ("relu", "relu_"):
            paths = _paths(node)
            if paths:
                out.add(paths[-1])
    return out


def find_blocks(model: nn.Module, args: tuple, kwargs: Mapping | None = None, *,
                ignore: Iterable[str] = ()) -> BlockAnalysis:  # fmt: skip
    """Skippable blocks of ``model`` for the example inputs (see the module docstring)."""
    names = candidates(model, ignore)
    result = BlockAnalysis()
    try:  # exported even without candidates: a data-dependent branch must be caught (raises)
        ep = export_graph(model, args, kwargs)
    except DataDependentError:
        raise
    except RuntimeError as exc:
        result.error = str(exc)
        return result
    result.program = ep
    ok = []
    for name in names:
        why = check_block(ep, name)
        if why is None:
            ok.append(name)
        else:
            result.rejected[name] = why
    for name in ok:  # innermost only
        if any(other != name and other.startswith(name + ".") for other in ok):
            result.rejected[name] = "contains smaller skippable blocks"
        else:
            result.skippable.append(name)
    return result
