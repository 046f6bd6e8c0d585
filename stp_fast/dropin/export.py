"""The chosen subnet as the user's own model class with physically smaller layers.

``extract_model(net, arch)`` deep-copies the converted model, gives every elastic module back its
original class with parameters, buffers and size attributes sliced to the arch's channels, and
deletes dropped blocks from their containers (``nn.Sequential``/``nn.ModuleList`` renumber, so
``layer3.4`` may become ``layer3.2``).  Nothing of stp_fast stays in it: it pickles, exports
(``torch.export``), compiles and runs without stp_fast.

``layout(net, arch)`` is the JSON-able recipe of that shape change; ``apply_layout(model, layout)``
repeats it on a fresh instance of the user's class, so a saved ``state_dict`` of the small model loads
into ``apply_layout(MyModel(cfg), layout)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from stp_fast.dropin import elastic
from stp_fast.dropin.elastic import ElasticModule, Kept
from stp_fast.dropin.supernet import restore_block

LAYOUT_FORMAT = "stp_fast.layout"


def _set_param(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    old = module._parameters.get(name)
    if old is not None:
        module._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value.detach().clone()


def _shrink(module: nn.Module, out: Kept | None, inp: Kept | None) -> None:
    """Slice ``module`` (an original-class module) to ``out``/``inp`` channels in place."""
    p, b = module._parameters, module._buffers
    if isinstance(module, nn.modules.conv._ConvNd):
        dw = elastic._depthwise(module)
        w = p["weight"]
        if out is not None:
            w = out.take(w, 0)
        if inp is not None and not dw:
            w = inp.take(w, 1)
        _set_param(module, "weight", w)
        if out is not None and p.get("bias") is not None:
            _set_param(module, "bias", out.take(p["bias"], 0))
        if out is not None:
            module.out_channels = out.count
            if dw:
                module.in_channels = module.groups = out.count
        if inp is not None and not dw:
            module.in_channels = inp.count
    elif isinstance(module, nn.Linear):
        w = p["weight"]
        w = out.take(w, 0) if out is not None else w
        w = inp.take(w, 1) if inp is not None else w
        _set_param(module, "weight", w)
        if out is not None:
            if p.get("bias") is not None:
                _set_param(module, "bias", out.take(p["bias"], 0))
            module.out_features = out.count
        if inp is not None:
            module.in_features = inp.count
    elif out is not None:
        for name in ("weight", "bias"):
            t = p.get(name)
            if t is not None:
                _set_param(module, name, out.take(t, t.dim() - 1))
        for name in ("running_mean", "running_var"):
            if b.get(name) is not None:
                _set_param(module, name, out.take(b[name], 0))
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = out.count
        elif isinstance(module, nn.GroupNorm):
            module.num_channels = out.count
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = (*module.normalized_shape[:-1], out.count)


def _remove_blocks(model: nn.Module, names: list[str]) -> None:
    """Delete blocks from their containers (last first, so indices stay valid)."""
    modules = dict(model.named_modules())
    by_parent: dict[str, list[int]] = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, []).append(child)
    for parent, children in by_parent.items():
        container = modules[parent]
        keys = list(container._modules)
        numeric = keys == [str(i) for i in range(len(keys))]
        for child in sorted(children, key=keys.index, reverse=True):
            if numeric:
                del container[keys.index(child)]
            else:
                container._modules[child] = nn.Identity()


def extract_model(net, arch) -> nn.Module:
    """The user's model at ``arch``: a deep copy with physically smaller layers (see module docstring)."""
    arch = net.space.validate(arch)
    widths = arch.widths
    model = copy.deepcopy(net.model)
    for _name, module in model.named_modules():
        if isinstance(module, ElasticModule):
            dims = module.__dict__["_stp_dims"]
            out = dims["out"].kept(widths) if "out" in dims else None
            inp = dims["in"].kept(widths) if "in" in dims else None
            elastic.restore(module)
            _shrink(module, out, inp)
    for module in model.modules():
        restore_block(module)
    _remove_blocks(model, net.dropped_blocks(arch))
    return model


def layout(net, arch) -> dict:
    """JSON-able shapes of ``extract_model(net, arch)``: per module the kept channel counts of its
    output and input dimensions, and the blocks removed."""
    arch = net.space.validate(arch)
    widths = arch.widths
    modules = {}
    for name, module in net.model.named_modules():
        if isinstance(module, ElasticModule):
            dims = module.__dict__["_stp_dims"]
            entry = {k: dims[k].kept(widths).count for k in ("out", "in") if k in dims}
            if any(entry[k] != dims[k].size for k in entry):
                modules[name] = entry
    return {"format": LAYOUT_FORMAT, "version": 1, "arch": arch.to_dict(), "modules": modules,
            "removed": net.dropped_blocks(arch)}  # fmt: skip


def apply_layout(model: nn.Module, spec: Mapping) -> nn.Module:
    """Shrink a fresh ``model`` (the user's class, full size) to ``spec`` (from :func:`layout`) in place:
    the first channels of every listed module, the listed blocks removed.  Load the small model's
    ``state_dict`` into the result."""
    if not isinstance(spec, Mapping) or spec.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"apply_layout: expected a layout dict with format={LAYOUT_FORMAT!r} "
                         "(stp_fast.dropin.layout / the export's layout.json)")  # fmt: skip
    modules = dict(model.named_modules())
    for name, entry in spec["modules"].items():
        if name not in modules:
            raise ValueError(f"apply_layout: the model has no module {name!r}; is it the class that was converted?")
        m = modules[name]
        _shrink(m, Kept(int(entry["out"]), None) if "out" in entry else None,
                Kept(int(entry["in"]), None) if "in" in entry else None)  # fmt: skip
    missing = [b for b in spec["removed"] if b not in modules]
    if missing:
        raise ValueError(f"apply_layout: the model has no blocks {missing}")
    _remove_blocks(model, list(spec["removed"]))
    return model
