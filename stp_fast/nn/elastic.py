"""Elastic layer helpers: run one layer of a supernet for several subnets through the multi-subnet
ops, with the weights of ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` modules (so the
supernet's state dict has the standard keys of the plain model)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from stp_fast.ops import multi_subnet_batch_norm, multi_subnet_conv2d, multi_subnet_linear


def _bn_factor(bn: nn.modules.batchnorm._BatchNorm, updates: bool) -> float:
    """The running-statistics update factor of this call (cumulative when ``bn.momentum`` is None)."""
    if not updates:
        return 0.0
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def batch_norm(bn: nn.BatchNorm2d | nn.BatchNorm1d, xs: Sequence[Tensor], *, relu: bool,
               stats: int | None) -> list[Tensor]:  # fmt: skip
    """Per-subnet BN (+ ReLU); only subnet ``stats`` (index into ``xs``) updates the running stats."""
    training = bn.training or not bn.track_running_stats
    owner = stats if (bn.training and bn.track_running_stats) else None
    factor = _bn_factor(bn, owner is not None)
    return multi_subnet_batch_norm(
        list(xs), bn.weight, bn.bias, bn.running_mean, bn.running_var, training=training, momentum=factor,
        eps=bn.eps, relu=relu, stats_subnet=owner,
    )  # fmt: skip


def conv(conv: nn.Conv2d, xs: Sequence[Tensor], out_widths: Sequence[int], *, depthwise: bool = False) -> list[Tensor]:
    """Convolution of every subnet; each subnet's input channels are its input's width."""
    return multi_subnet_conv2d(
        list(xs), conv.weight, conv.bias, list(out_widths), stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.weight.shape[0] if depthwise else 1,
    )  # fmt: skip


def conv_bn(conv_: nn.Conv2d, bn: nn.BatchNorm2d, xs: Sequence[Tensor], out_widths: Sequence[int], *, relu: bool,
            stats: int | None, depthwise: bool = False) -> list[Tensor]:  # fmt: skip
    """Convolution of every subnet, then BN (+ ReLU)."""
    return batch_norm(bn, conv(conv_, xs, out_widths, depthwise=depthwise), relu=relu, stats=stats)


def linear(fc: nn.Linear, xs: Sequence[Tensor], out_widths: Sequence[int]) -> list[Tensor]:
    return multi_subnet_linear(list(xs), fc.weight, fc.bias, list(out_widths))
