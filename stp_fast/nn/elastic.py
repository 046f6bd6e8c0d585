"""Elastic layer helpers: run one layer of a supernet for several subnets through the multi-subnet
ops, with the weights of ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` modules (so the
supernet's state dict has the standard keys of the plain model).

Subnets that feed a layer the very same input tensor and keep the same width compute the very same
output (BN's batch statistics included), so the layer runs once for them and they share the result
(autograd sums their gradients): e.g. the stems of all archs whose stem is not pruned, 4 of the 5
stems of a full + 4 subnet resnet20 step, ~5% of it on the CPU.  Subnets of different widths are
not merged: their outputs would agree only up to float rounding, while ``forward_many`` reproduces
the separate passes ``net(x, arch=a)`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from stp_fast.ops import multi_subnet_batch_norm, multi_subnet_conv2d, multi_subnet_linear


def _bn_factor(bn: nn.modules.batchnorm._BatchNorm, updates: bool) -> float:
    """The running-statistics update factor of this call (cumulative when ``bn.momentum`` is None)."""
    if not updates:
        return 0.0
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _shared(xs: Sequence[Tensor], widths: Sequence[int], stats: int | None,
            run: Callable[[list[Tensor], list[int], int | None], list[Tensor]]) -> list[Tensor]:  # fmt: skip
    """``run(xs, widths, stats)`` once per distinct (input object, width) pair; outputs in ``xs``'s order."""
    keys = [(id(x), w) for x, w in zip(xs, widths)]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    if len(first) == len(keys):
        return run(list(xs), list(widths), stats)
    order = sorted(first.values())
    pos = {keys[i]: p for p, i in enumerate(order)}
    ys = run([xs[i] for i in order], [widths[i] for i in order], None if stats is None else pos[keys[stats]])
    return [ys[pos[k]] for k in keys]


def batch_norm(bn: nn.BatchNorm2d | nn.BatchNorm1d, xs: Sequence[Tensor], *, relu: bool,
               stats: int | None) -> list[Tensor]:  # fmt: skip
    """Per-subnet BN (+ ReLU); only subnet ``stats`` (index into ``xs``) updates the running stats."""
    training = bn.training or not bn.track_running_stats
    owner = stats if (bn.training and bn.track_running_stats) else None
    factor = _bn_factor(bn, owner is not None)

    def run(xs_: list[Tensor], _widths: list[int], owner_: int | None) -> list[Tensor]:
        return multi_subnet_batch_norm(
            xs_, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=training, momentum=factor,
            eps=bn.eps, relu=relu, stats_subnet=owner_,
        )  # fmt: skip

    return _shared(xs, [x.shape[1] for x in xs], owner, run)


def conv(conv: nn.Conv2d, xs: Sequence[Tensor], out_widths: Sequence[int], *, depthwise: bool = False) -> list[Tensor]:
    """Convolution of every subnet; each subnet's input channels are its input's width."""

    def run(xs_: list[Tensor], widths: list[int], _stats: int | None) -> list[Tensor]:
        return multi_subnet_conv2d(
            xs_, conv.weight, conv.bias, widths, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            groups=conv.weight.shape[0] if depthwise else 1,
        )  # fmt: skip

    return _shared(xs, out_widths, None, run)


def conv_bn(conv_: nn.Conv2d, bn: nn.BatchNorm2d, xs: Sequence[Tensor], out_widths: Sequence[int], *, relu: bool,
            stats: int | None, depthwise: bool = False) -> list[Tensor]:  # fmt: skip
    """Convolution of every subnet, then BN (+ ReLU)."""
    return batch_norm(bn, conv(conv_, xs, out_widths, depthwise=depthwise), relu=relu, stats=stats)


def linear(fc: nn.Linear, xs: Sequence[Tensor], out_widths: Sequence[int]) -> list[Tensor]:
    return multi_subnet_linear(list(xs), fc.weight, fc.bias, list(out_widths))
