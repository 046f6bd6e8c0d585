"""Build plain ``torch.nn`` models (``torch.fx.GraphModule``) for extracted subnets.

A GraphModule holds standard ``nn`` modules and generated Python code, so the extracted model runs,
pickles, scripts (TorchScript) and exports (ONNX) without importing stp_fast.  Submodules keep the
supernet's qualified names, so ``extract(net, net.space.full()).state_dict()`` loads into the net.
"""

from __future__ import annotations

import torch
from torch import fx, nn


class PlainBuilder:
    """Records ``call_module`` / ``call_function`` nodes; :meth:`build` returns the GraphModule."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.modules: dict[str, nn.Module] = {}

    def input(self, name: str = "x") -> fx.Node:
        return self.graph.placeholder(name)

    def module(self, name: str, module: nn.Module, *args: fx.Node) -> fx.Node:
        if name in self.modules:
            raise ValueError(f"PlainBuilder: module name {name!r} used twice")
        self.modules[name] = module
        return self.graph.call_module(name, args)

    def function(self, fn, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def build(self, output: fx.Node, class_name: str = "PrunedModel") -> fx.GraphModule:
        self.graph.output(output)
        self.graph.lint()
        return fx.GraphModule(self.modules, self.graph, class_name=class_name)


def slice_conv(conv: nn.Conv2d, out_ch: int, in_ch: int, *, depthwise: bool = False) -> nn.Conv2d:
    """A new Conv2d holding ``conv.weight[:out_ch, :in_ch]`` (depthwise: the first out_ch filters)."""
    groups = out_ch if depthwise else conv.groups
    new = nn.Conv2d(in_ch, out_ch, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups,
                    conv.bias is not None, conv.padding_mode)  # fmt: skip
    w = conv.weight[:out_ch] if depthwise else conv.weight[:out_ch, :in_ch]
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias[:out_ch])
    return new.to(conv.weight.device)


def slice_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, ch: int) -> nn.Module:
    """A new BatchNorm of the same type over the first ``ch`` channels (parameters and statistics)."""
    new = type(bn)(ch, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[:ch])
            new.bias.copy_(bn.bias[:ch])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[:ch])
            new.running_var.copy_(bn.running_var[:ch])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.to(bn.running_mean.device if bn.track_running_stats else bn.weight.device)


def slice_linear(fc: nn.Linear, out_f: int, in_f: int) -> nn.Linear:
    new = nn.Linear(in_f, out_f, fc.bias is not None)
    with torch.no_grad():
        new.weight.copy_(fc.weight[:out_f, :in_f])
        if fc.bias is not None:
            new.bias.copy_(fc.bias[:out_f])
    return new.to(fc.weight.device)
