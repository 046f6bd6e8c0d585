"""``multi_subnet_batch_norm``: BatchNorm (+ optional ReLU) for S width-subnets in one op.

In training mode every subnet normalises with the batch statistics of its own input over its own
active channels (the first ``c_s``, or ``indices[s]``); in eval mode all use the running statistics.
The shared running statistics are updated only from the subnet named by ``stats_subnet`` (the full
network in STP), so subnet passes never pollute them.  Affine gradients sum over the subnets.
On the GPU one launch normalises all subnets (and one computes all their gradients).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stp_fast.ops import _backend, _multi
from stp_fast.ops._checks import check_device, check_float_tensor
from stp_fast.ops._family import add_block, register_family, take_block, triton_dtype_reasons

OP = "multi_subnet_batch_norm"


def _channels(x: Tensor, indices: Sequence[Tensor] | None, s: int) -> Tensor | int:
    return indices[s] if indices is not None else x.shape[1]


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _param(p: Tensor | None, ch) -> Tensor | None:
    return None if p is None else take_block(p, ch, None)


def multi_subnet_batch_norm_ref(
    xs: Sequence[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    indices: Sequence[Tensor] | None = None,
    training: bool = True,
    eps: float = 1e-5,
    relu: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Reference: per subnet ``F.batch_norm`` on sliced parameters (+ ReLU); differentiable.

    Returns (ys, means, invstds); the statistics are float32 (float64 for float64 inputs) [c_s].
    """
    ys, means, invstds = [], [], []
    for s, x in enumerate(xs):
        ch = _channels(x, indices, s)
        xf = x.to(_stat_dtype(x))
        if training:
            mean = xf.mean(_reduce_dims(x)) if x.numel() else xf.new_zeros(x.shape[1])
            var = xf.var(_reduce_dims(x), unbiased=False) if x.numel() else xf.new_zeros(x.shape[1])
        else:
            mean = take_block(running_mean, ch, None).to(xf.dtype, copy=True)
            var = take_block(running_var, ch, None).to(xf.dtype)
        invstd = torch.rsqrt(var + eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * invstd.view(shape)
        w, b = _param(weight, ch), _param(bias, ch)
        if w is not None:
            y = y * w.view(shape)
        if b is not None:
            y = y + b.view(shape)
        y = (F.relu(y) if relu else y).to(x.dtype)
        ys.append(y)
        means.append(mean.detach())
        invstds.append(invstd.detach())
    return ys, means, invstds


def _ref_forward(xs, weight, bias, running_mean, running_var, indices, training, eps, relu):
    return multi_subnet_batch_norm_ref(xs, weight, bias, running_mean, running_var, indices, training, eps, relu)


def _ref_backward(grads, xs, weight, bias, means, invstds, indices, training, relu, need_x, need_w, need_b):
    gxs = [] if need_x else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = torch.zeros_like(bias) if need_b else None
    for s, (g, x) in enumerate(zip(grads, xs)):
        ch = _channels(x, indices, s)
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = _reduce_dims(x)
        xhat = (x.to(means[s].dtype) - means[s].view(shape)) * invstds[s].view(shape)
        w = _param(weight, ch)
        w = torch.ones_like(means[s]) if w is None else w.to(means[s].dtype)
        dy = g.to(means[s].dtype)
        if relu:
            b = _param(bias, ch)
            y = xhat * w.view(shape) + (0 if b is None else b.to(means[s].dtype).view(shape))
            dy = dy * (y > 0)
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        if need_x:
            count = max(1, x.numel() // max(1, x.shape[1]))
            if training:
                dx = dy - (sum_dy / count).view(shape) - xhat * (sum_dy_xhat / count).view(shape)
                dx = dx * (w * invstds[s]).view(shape)
            else:
                dx = dy * (w * invstds[s]).view(shape)
            gxs.append(dx.to(x.dtype))
        if need_w:
            add_block(gw, sum_dy_xhat, ch, None)
        if need_b:
            add_block(gb, sum_dy, ch, None)
    return gxs, gw, gb


register_family(OP, ref_forward=_ref_forward, ref_backward=_ref_backward, triton_reasons=triton_dtype_reasons)


def _check_affine_dtype(t: Tensor, name: str, x_dtype: torch.dtype) -> None:
    """weight/bias: x's dtype, or float32 for float16/bfloat16 inputs (mixed precision: PyTorch's BatchNorm
    under ``torch.autocast`` keeps the input's dtype and fp32 parameters)."""
    check_float_tensor(t, op=OP, arg=name)
    if t.dtype != x_dtype and not (t.dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"{OP}: {name} has dtype {t.dtype} but xs[0] has {x_dtype}; it must have xs[0]'s dtype, "
                        "or float32 for float16/bfloat16 inputs")  # fmt: skip


def _check_static(xs, weight, bias, running_mean, running_var, indices, training) -> int:
    _multi.check_subnet_list(xs, op=OP, ndim=None, what="[B_s, c_s] or [B_s, c_s, *spatial]")
    device = xs[0].device
    params = [(weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")]
    given = [(t, name) for t, name in params if t is not None]
    if not given:
        raise ValueError(f"{OP}: give weight/bias or the running statistics (the layer's channel count)")
    full = given[0][0].shape[0] if given[0][0].dim() == 1 else -1
    for t, name in given:
        if t.dim() != 1 or t.shape[0] != full:
            raise ValueError(f"{OP}: {name} must be 1-D with {full} channels, got shape {tuple(t.shape)}")
        check_device(t, device, op=OP, arg=name)
        if name in ("weight", "bias"):
            _check_affine_dtype(t, name, xs[0].dtype)
        elif not t.is_floating_point():
            raise TypeError(f"{OP}: {name} must be a float tensor, got {t.dtype}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{OP}: eval mode (training=False) needs running_mean and running_var")
    for s, x in enumerate(xs):
        if x.dim() < 2:
            raise ValueError(f"{OP}: xs[{s}] must be [B, C] or [B, C, *spatial], got shape {tuple(x.shape)}")
        if x.shape[1] > full:
            raise ValueError(f"{OP}: xs[{s}] has {x.shape[1]} channels but the layer has only {full}")
    _multi.check_index_list(indices, len(xs), full, device, op=OP, arg="indices", lengths=[x.shape[1] for x in xs])
    return full


_SCHEMA = (
    "(Tensor[] xs, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor[]? indices, "
    "bool training, float eps, bool relu) -> (Tensor[], Tensor[], Tensor[])"
)


def _run_forward(xs, weight, bias, running_mean, running_var, indices, training, eps, relu):
    """The op's body: checks, then the chosen backend's forward -> (ys, means, invstds)."""
    full = _check_static(xs, weight, bias, running_mean, running_var, indices, training)
    _multi.check_index_list_values(indices, full, op=OP, arg="indices")
    args = (xs, weight, bias, running_mean, running_var, indices, training, eps, relu)
    ys, means, invstds = _backend.pick(OP, xs[0].device.type, *args).fns["forward"](*args)
    return list(ys), list(means), list(invstds)


def _run_backward(grads, xs, weight, bias, means, invstds, indices, training, relu, need_x, need_weight, need_bias):
    """The backward op's body: (grad_xs, grad_weight, grad_bias), None where not asked for."""
    impl = _backend.pick(OP, xs[0].device.type, xs, weight, bias, None, None, indices, training, 0.0, relu)
    return impl.fns["backward"](grads, xs, weight, bias, means, invstds, indices, training, relu, need_x, need_weight,
                                need_bias)  # fmt: skip


def _masks_from_outputs(relu: bool, xs) -> bool:
    """CPU: the ReLU's gradient mask comes from the saved outputs (one threshold_backward pass) rather
    than from recomputing them out of x in the kernel (an extra addcmul pass per subnet, ~2% of a
    resnet20 STP step on 2 cores).  The GPU kernels recompute it in-register and save the memory."""
    return relu and xs[0].device.type == "cpu"


def _output_grads(grads, xs, ys, relu: bool) -> tuple[list[Tensor], bool]:
    """Zeros for outputs that got no gradient; with saved outputs ``ys``, the ReLU mask applied (then the
    kernel runs without ReLU).  Returns (grads, relu for the kernel)."""
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, xs)]
    if ys is None:
        return grads, relu
    return [torch.ops.aten.threshold_backward(g, y, 0) for g, y in zip(grads, ys)], False


@torch.library.custom_op("stp_fast::multi_subnet_batch_norm", mutates_args=(), schema=_SCHEMA)
def _multi_subnet_batch_norm_op(xs, weight, bias, running_mean, running_var, indices, training, eps, relu):
    return _run_forward(xs, weight, bias, running_mean, running_var, indices, training, eps, relu)


@_multi_subnet_batch_norm_op.register_fake
def _(xs, weight, bias, running_mean, running_var, indices, training, eps, relu):
    _check_static(xs, weight, bias, running_mean, running_var, indices, training)
    stats = [x.new_empty(x.shape[1], dtype=_stat_dtype(x)) for x in xs]
    return [torch.empty_like(x) for x in xs], stats, [torch.empty_like(t) for t in stats]


@torch.library.custom_op(
    "stp_fast::multi_subnet_batch_norm_backward",
    mutates_args=(),
    schema="(Tensor[] grads, Tensor[] xs, Tensor? weight, Tensor? bias, Tensor[] means, Tensor[] invstds, "
    "Tensor[]? indices, bool training, bool relu, bool need_x, bool need_weight, bool need_bias) "
    "-> (Tensor[], Tensor, Tensor)",
)
def _multi_subnet_batch_norm_backward_op(grads, xs, weight, bias, means, invstds, indices, training, relu, need_x,
                                         need_weight, need_bias):  # fmt: skip
    gxs, gw, gb = _run_backward(grads, xs, weight, bias, means, invstds, indices, training, relu, need_x, need_weight,
                                need_bias)  # fmt: skip
    empty = xs[0].new_empty(0)
    return (list(gxs) if need_x else [], gw if gw is not None else empty, gb if gb is not None else empty.clone())


@_multi_subnet_batch_norm_backward_op.register_fake
def _(grads, xs, weight, bias, means, invstds, indices, training, relu, need_x, need_weight, need_bias):
    return (
        [torch.empty_like(x) for x in xs] if need_x else [],
        weight.new_empty(weight.shape) if need_weight else xs[0].new_empty(0),
        bias.new_empty(bias.shape) if need_bias else xs[0].new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    xs, weight, bias, _rm, _rv, indices, training, _eps, relu = inputs
    ys, means, invstds = output
    ctx.mark_non_differentiable(*means, *invstds)
    from_outputs = _masks_from_outputs(relu, xs)
    ctx.save_for_backward(*xs, *means, *invstds, weight, bias, *(indices or ()), *(ys if from_outputs else ()))
    ctx.meta = (len(xs), indices is not None, training, relu, from_outputs)


def _backward(ctx, grads, _gmeans, _ginvstds):
    count, has_idx, training, relu, from_outputs = ctx.meta
    t = ctx.saved_tensors
    xs, means, invstds = list(t[:count]), list(t[count : 2 * count]), list(t[2 * count : 3 * count])
    weight, bias = t[3 * count], t[3 * count + 1]
    rest = t[3 * count + 2 :]
    indices = list(rest[:count]) if has_idx else None
    need_xs, need_w, need_b = ctx.needs_input_grad[:3]
    need_x = any(need_xs) if isinstance(need_xs, (list, tuple)) else bool(need_xs)
    grads, relu = _output_grads(grads, xs, rest[count if has_idx else 0 :] if from_outputs else None, relu)
    gxs, gw, gb = _multi_subnet_batch_norm_backward_op(
        grads, xs, weight, bias, means, invstds, indices, training, relu, need_x, need_w, need_b
    )
    idx_grads = [None] * count if has_idx else None
    return (gxs if need_x else [None] * count, gw if need_w else None, gb if need_b else None, None, None, idx_grads,
            None, None, None)  # fmt: skip


_multi_subnet_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


class MultiSubnetBatchNormFunction(torch.autograd.Function):
    """The op's eager twin (``_backend.eager_ok``): the same checks, backend and kernels in forward and
    backward, without the custom-op dispatch.  ``apply(weight, bias, params, *xs)`` with ``params`` =
    (running_mean, running_var, indices, training, eps, relu); returns (*ys, *means, *invstds)."""

    @staticmethod
    def forward(ctx, weight, bias, params, *xs):
        _rm, _rv, indices, training, _eps, relu = params
        ys, means, invstds = _run_forward(list(xs), weight, bias, *params)
        ctx.mark_non_differentiable(*means, *invstds)
        from_outputs = _masks_from_outputs(relu, xs)
        ctx.save_for_backward(weight, bias, *xs, *means, *invstds, *(ys if from_outputs else ()))
        ctx.meta = (len(xs), indices, training, relu, from_outputs)
        return (*ys, *means, *invstds)

    @staticmethod
    def backward(ctx, *grads):
        count, indices, training, relu, from_outputs = ctx.meta
        weight, bias, *rest = ctx.saved_tensors
        xs, means, invstds = rest[:count], rest[count : 2 * count], rest[2 * count : 3 * count]
        need_w, need_b = ctx.needs_input_grad[:2]
        need_x = any(ctx.needs_input_grad[3:])
        grads, relu = _output_grads(grads[:count], xs, rest[3 * count :] if from_outputs else None, relu)
        gxs, gw, gb = _run_backward(grads, list(xs), weight, bias, list(means), list(invstds), indices, training, relu,
                                    need_x, need_w, need_b)  # fmt: skip
        return (gw if need_w else None, gb if need_b else None, None, *(gxs if need_x else [None] * count))


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mean, invstd, ch, count, momentum, eps) -> None:
    var = invstd.double().pow(-2).sub_(eps)
    unbiased = var * (count / (count - 1)) if count > 1 else var
    for stat, new in ((running_mean, mean), (running_var, unbiased)):
        block = take_block(stat, ch, None)
        block = block + momentum * (new.to(stat.dtype) - block)
        if isinstance(ch, Tensor):
            stat.index_copy_(0, ch, block)
        else:
            stat[:ch] = block


def multi_subnet_batch_norm(
    xs: Sequence[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = False,
    stats_subnet: int | None = None,
    indices: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """BatchNorm (+ ReLU) of S width-subnets of one layer.

    Args:
        xs: S tensors (B_s, c_s) or (B_s, c_s, *spatial): subnet s's active channels (the first c_s,
            or ``indices[s]``).
        weight, bias: (C,) affine parameters or None; running_mean, running_var: (C,) or None.
        training: batch statistics per subnet (True) or running statistics (False).
        momentum: running-statistics update factor, as in ``nn.BatchNorm2d``.
        relu: apply ReLU to the output (fused on the GPU).
        stats_subnet: the subnet whose batch statistics update the running statistics (the full
            network); None: no update.  Other subnets never touch them.
    Returns:
        S normalised tensors shaped like ``xs``.  One autograd node; affine gradients sum over subnets.
        In plain eager mode (CPU and CUDA) the node is ``MultiSubnetBatchNormFunction`` (the same checks
        and kernels without the custom-op dispatch), otherwise the custom op.  Saved for backward: the
        inputs, the statistics, and on the CPU with ``relu`` the outputs (the ReLU's mask).
        float16/bfloat16 inputs may come with float32 weight/bias (PyTorch's BatchNorm under
        ``torch.autocast``): outputs keep the input's dtype, statistics and parameter gradients are fp32.
    """
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{OP}: xs must be a list of tensors, got {type(xs).__name__}")
    if stats_subnet is not None and not (0 <= stats_subnet < len(xs)):
        raise ValueError(f"{OP}: stats_subnet={stats_subnet} must name one of the {len(xs)} subnets or be None")
    xs = list(xs)
    idx = None if indices is None else list(indices)
    params = (running_mean, running_var, idx, training, float(eps), relu)
    device = xs[0].device.type if xs and isinstance(xs[0], Tensor) else ""
    if _backend.eager_ok(device, (*xs, weight, bias, running_mean, running_var)):
        out = MultiSubnetBatchNormFunction.apply(weight, bias, params, *xs)
        n = len(xs)
        ys, means, invstds = list(out[:n]), out[n : 2 * n], out[2 * n :]
    else:
        ys, means, invstds = _multi_subnet_batch_norm_op(xs, weight, bias, *params)
    x = xs[stats_subnet] if stats_subnet is not None else None
    count = 0 if x is None else math.prod(x.shape) // max(1, x.shape[1])
    if training and count > 0 and running_mean is not None and running_var is not None:
        ch = _channels(x, idx, stats_subnet)
        _update_running_stats(running_mean, running_var, means[stats_subnet], invstds[stats_subnet], ch, count,
                              momentum, eps)  # fmt: skip
    return ys
