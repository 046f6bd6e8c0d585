"""Elastic layers made from the user's own modules, in place.

``make_elastic(module, dims)`` changes ``module.__class__`` to a subclass of its own class (the
technique of NVIDIA ModelOpt's dynamic modules): parameters, buffers and state-dict keys stay as
they are, and when no arch is active the module runs its original ``forward`` untouched.

With an arch active (see :mod:`stp_fast.dropin.context`):

* ``weight``, ``bias``, running statistics and size attributes (``in_channels``, ``out_features``,
  ``normalized_shape``, ...) read as the arch's slice, so any ``forward`` -- the user's subclass of
  ``nn.LayerNorm`` included -- computes the arch's layer.  Slices are views for prefixes, so
  gradients flow into the shared full-size parameters;
* plain ``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm1d/2d`` and ``nn.LayerNorm`` run all active archs
  in one op instead (``stp_fast.ops.multi_subnet_*``: one launch for all subnets on the GPU), and
  archs that share an input tensor and a width share one computation;
* in train mode only the full network (the batch's ``owner``) updates BatchNorm running statistics.

Each module dimension that can shrink has a :class:`DimPlan`: the channel groups that cover it, in
the order of their importance-sorted channels, and the channels no group covers (always kept).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stp_fast.dropin import context
from stp_fast.dropin.multi import Multi, pack, unpack
from stp_fast.ops import multi_subnet_batch_norm, multi_subnet_conv2d, multi_subnet_linear


class Kept:
    """The channels one arch keeps of one dimension: ``count`` and either a prefix (``index`` None)
    or sorted indices (moved to each device once)."""

    __slots__ = ("_on", "count", "index")

    def __init__(self, count: int, index: np.ndarray | None) -> None:
        self.count = count
        self.index = None if index is None else torch.as_tensor(index, dtype=torch.int64)
        self._on: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor:
        """The kept indices as an int64 tensor on ``device`` (a prefix as ``arange``)."""
        t = self._on.get(device)
        if t is None:
            t = self.index if self.index is not None else torch.arange(self.count)
            t = self._on[device] = t.to(device)
        return t

    def take(self, t: Tensor, dim: int = 0) -> Tensor:
        """``t`` restricted to the kept channels along ``dim`` (a view for prefixes)."""
        if self.index is None:
            return t if self.count == t.shape[dim] else t.narrow(dim, 0, self.count)
        return t.index_select(dim, self.on(t.device))


class DimPlan:
    """Which channels of one module dimension of ``size`` channels an arch keeps.

    ``parts`` are ``(group, positions)``: the positions in this dimension of the group's channels in
    importance order (a group of width w keeps its first w); positions no group covers are always kept."""

    def __init__(self, size: int, parts: Sequence[tuple[str, Sequence[int]]]) -> None:
        self.size = size
        self.parts = [(g, np.asarray(p, dtype=np.int64)) for g, p in parts]
        covered = np.concatenate([p for _, p in self.parts]) if self.parts else np.zeros(0, np.int64)
        if len(np.unique(covered)) != len(covered) or (len(covered) and (covered.min() < 0 or covered.max() >= size)):
            raise ValueError(f"DimPlan: group positions overlap or leave [0, {size})")
        self.fixed = np.setdiff1d(np.arange(size), covered)
        self.groups = tuple(g for g, _ in self.parts)
        self._cache: dict[tuple[int, ...], Kept] = {}
        self.full = Kept(size, None)

    def kept(self, widths: Mapping[str, int] | None) -> Kept:
        if widths is None:
            return self.full
        key = tuple(widths[g] for g in self.groups)
        hit = self._cache.get(key)
        if hit is None:
            idx = np.sort(np.concatenate([self.fixed] + [p[:w] for (_, p), w in zip(self.parts, key)]))
            prefix = len(idx) == 0 or idx[-1] == len(idx) - 1
            hit = self._cache[key] = self.full if len(idx) == self.size else Kept(len(idx), None if prefix else idx)
        return hit


# ---------------------------------------------------------------------------------------------- shared helpers
def _dims(module: nn.Module) -> dict[str, DimPlan]:
    return module.__dict__.get("_stp_dims", {})


def _kept(module: nn.Module, which: str, widths: Mapping[str, int] | None) -> Kept:
    plan = _dims(module).get(which)
    if plan is None or widths is None:
        return _FULL.get(module, which)
    return plan.kept(widths)


class _FullKept:
    """Kept(full) per (module, dim), without a DimPlan (a dimension no elastic group covers)."""

    def get(self, module: nn.Module, which: str) -> Kept:
        cache = module.__dict__.setdefault("_stp_full", {})
        if which not in cache:
            cache[which] = Kept(_full_size(module, which), None)
        return cache[which]


_FULL = _FullKept()


def _full_size(module: nn.Module, which: str) -> int:
    w = module._parameters.get("weight")
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.__dict__["out_channels"] if which == "out" else module.__dict__["in_channels"]
    if isinstance(module, nn.Linear):
        return module.__dict__["out_features"] if which == "out" else module.__dict__["in_features"]
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.__dict__["num_features"]
    if isinstance(module, nn.GroupNorm):
        return module.__dict__["num_channels"]
    if isinstance(module, nn.LayerNorm):
        return module.__dict__["normalized_shape"][-1]
    return int(w.shape[0]) if w is not None else 0


def _shared(xs: Sequence[Tensor], keys: Sequence[tuple], owner: int | None,
            run: Callable[[list[Tensor], list[int], int | None], list[Tensor]]) -> list[Tensor]:  # fmt: skip
    """``run(xs, positions, owner)`` once per distinct (input object, key); outputs in ``xs``'s order.

    Archs feeding a layer the very same tensor at the same widths compute the very same output
    (BatchNorm's batch statistics included), so they share it; autograd sums their gradients."""
    full_keys = [(id(x), k) for x, k in zip(xs, keys)]
    first: dict = {}
    for i, k in enumerate(full_keys):
        first.setdefault(k, i)
    if len(first) == len(full_keys):
        return run(list(xs), list(range(len(xs))), owner)
    order = sorted(first.values())
    pos = {full_keys[i]: p for p, i in enumerate(order)}
    ys = run([xs[i] for i in order], order, None if owner is None else pos[full_keys[owner]])
    return [ys[pos[k]] for k in full_keys]


def _index_lists(kepts: Sequence[Kept], device: torch.device) -> list[Tensor] | None:
    """None when every arch keeps a prefix (the ops' fast path), else one index tensor per arch."""
    if all(k.index is None for k in kepts):
        return None
    return [k.on(device) for k in kepts]


def _owner(batch: context.Batch, module: nn.Module) -> int | None:
    return batch.owner if (module.training and module.track_running_stats) else None


# ---------------------------------------------------------------------------------------------- mixins
class ElasticModule(nn.Module):
    """Base of the dynamic subclasses; ``_stp_original`` is the user's class."""

    _stp_original: type

    def _stp_widths(self) -> Mapping[str, int] | None:
        return context.single_widths()


def _sliced_param(name: str, which: str, dim: int = 0) -> property:
    def get(self):
        p = self._parameters[name] if name in self._parameters else self._buffers.get(name)
        widths = context.single_widths()
        if p is None or widths is None:
            return p
        return _kept(self, which, widths).take(p, dim)

    def set_(self, value):  # Module.__setattr__ registers Parameters itself; this is for other values
        (self._parameters if name in self._parameters else self._buffers)[name] = value

    return property(get, set_)


def _sliced_attr(name: str, value_of: Callable) -> property:
    def get(self):
        widths = context.single_widths()
        return self.__dict__[name] if widths is None else value_of(self, widths)

    def set_(self, value):
        self.__dict__[name] = value

    return property(get, set_)


def _conv_weight(self):
    w = self._parameters["weight"]
    widths = context.single_widths()
    if widths is None:
        return w
    out = _kept(self, "out", widths)
    if _depthwise(self):
        return out.take(w, 0)
    return _kept(self, "in", widths).take(out.take(w, 0), 1)


def _depthwise(m: nn.Module) -> bool:
    d = m.__dict__
    return isinstance(m, nn.modules.conv._ConvNd) and d["groups"] > 1 and d["groups"] == d["in_channels"] == d["out_channels"]


class ElasticConv(ElasticModule):
    weight = property(_conv_weight, lambda self, v: self._parameters.__setitem__("weight", v))
    bias = _sliced_param("bias", "out")
    out_channels = _sliced_attr("out_channels", lambda self, w: _kept(self, "out", w).count)
    in_channels = _sliced_attr("in_channels", lambda self, w: (_kept(self, "out", w) if _depthwise(self) else
                                                               _kept(self, "in", w)).count)  # fmt: skip
    groups = _sliced_attr("groups", lambda self, w: _kept(self, "out", w).count if _depthwise(self)
                          else self.__dict__["groups"])  # fmt: skip


class ElasticLinear(ElasticModule):
    weight = property(lambda self: _linear_weight(self), lambda self, v: self._parameters.__setitem__("weight", v))
    bias = _sliced_param("bias", "out")
    out_features = _sliced_attr("out_features", lambda self, w: _kept(self, "out", w).count)
    in_features = _sliced_attr("in_features", lambda self, w: _kept(self, "in", w).count)


def _linear_weight(self):
    w = self._parameters["weight"]
    widths = context.single_widths()
    if widths is None:
        return w
    return _kept(self, "in", widths).take(_kept(self, "out", widths).take(w, 0), 1)


def _subnet_stat(name: str) -> property:
    """A running statistic: the arch's slice; ``None`` for a subnet in train mode, so that only the
    full network's batch statistics update the shared running statistics (subnets use their own)."""

    def get(self):
        t = self._buffers.get(name)
        widths = context.single_widths()
        if t is None or widths is None:
            return t
        b = context.current()
        if self.training and b.owner is None:
            return None
        return t if name == "num_batches_tracked" else _kept(self, "out", widths).take(t, 0)

    def set_(self, value):
        self._buffers[name] = value

    return property(get, set_)


class ElasticBatchNorm(ElasticModule):
    weight = _sliced_param("weight", "out")
    bias = _sliced_param("bias", "out")
    running_mean = _subnet_stat("running_mean")
    running_var = _subnet_stat("running_var")
    num_batches_tracked = _subnet_stat("num_batches_tracked")
    num_features = _sliced_attr("num_features", lambda self, w: _kept(self, "out", w).count)


class ElasticLayerNorm(ElasticModule):
    weight = _sliced_param("weight", "out")
    bias = _sliced_param("bias", "out")
    normalized_shape = _sliced_attr("normalized_shape", lambda self, w: (*self.__dict__["normalized_shape"][:-1],
                                                                         _kept(self, "out", w).count))  # fmt: skip


class ElasticGroupNorm(ElasticModule):
    weight = _sliced_param("weight", "out")
    bias = _sliced_param("bias", "out")
    num_channels = _sliced_attr("num_channels", lambda self, w: _kept(self, "out", w).count)


# ---------------------------------------------------------------------------------------------- fast forwards
def _per_member(module: nn.Module, x, original: Callable):
    """The generic batched path: the module's own forward once per arch (dynamic attributes)."""
    b = context.current()
    xs = unpack(x, len(b))
    outs = []
    for i, xi in enumerate(xs):
        with context.running(b.subset([i])):
            outs.append(original(module, xi))
    return pack(outs)


def _conv_forward(self, x):
    b = context.current()
    cls = type(self)._stp_original
    if b is None or (len(b) == 1 and not isinstance(x, Multi)):
        return cls.forward(self, x)
    if self.padding_mode != "zeros" or not isinstance(self, nn.Conv2d):
        return _per_member(self, x, cls.forward)
    n, dw = len(b), _depthwise(self)
    outs = [_kept(self, "out", w) for w in b.widths]
    ins = outs if dw else [_kept(self, "in", w) for w in b.widths]
    xs = unpack(x, n)
    weight, bias = self._parameters["weight"], self._parameters["bias"]
    d = self.__dict__

    def run(xs_, pos, _owner):
        o, i = [outs[p] for p in pos], [ins[p] for p in pos]
        return multi_subnet_conv2d(xs_, weight, bias, [k.count for k in o], in_indices=_index_lists(i, weight.device),
                                   out_indices=_index_lists(o, weight.device), stride=d["stride"],
                                   padding=d["padding"], dilation=d["dilation"],
                                   groups=weight.shape[0] if dw else 1)  # fmt: skip

    return pack(_shared(xs, [(id(o), id(i)) for o, i in zip(outs, ins)], None, run))


def _linear_forward(self, x):
    b = context.current()
    cls = type(self)._stp_original
    if b is None or (len(b) == 1 and not isinstance(x, Multi)):
        return cls.forward(self, x)
    n = len(b)
    outs = [_kept(self, "out", w) for w in b.widths]
    ins = [_kept(self, "in", w) for w in b.widths]
    weight, bias = self._parameters["weight"], self._parameters["bias"]

    def run(xs_, pos, _owner):
        o, i = [outs[p] for p in pos], [ins[p] for p in pos]
        return multi_subnet_linear(xs_, weight, bias, [k.count for k in o], in_indices=_index_lists(i, weight.device),
                                   out_indices=_index_lists(o, weight.device))  # fmt: skip

    return pack(_shared(unpack(x, n), [(id(o), id(i)) for o, i in zip(outs, ins)], None, run))


def _bn_forward(self, x):
    b = context.current()
    cls = type(self)._stp_original
    if b is None or (len(b) == 1 and not isinstance(x, Multi)):
        return cls.forward(self, x)
    n = len(b)
    kepts = [_kept(self, "out", w) for w in b.widths]
    owner = _owner(b, self)
    factor = _bn_factor(self, owner is not None)
    training = self.training or not self.track_running_stats
    buf = self._buffers

    xs = unpack(x, n)
    # The BN's only consumer is a ReLU (blocks.norm_relu_pairs): apply it here -- unless every arch shares one
    # plain output, which the model's own (maybe in-place) ReLU then processes as usual.
    shared = len({(id(xi), id(k)) for xi, k in zip(xs, kepts)}) == 1
    relu = bool(self.__dict__.get("_stp_fuse_relu")) and not shared

    def run(xs_, pos, owner_):
        k = [kepts[p] for p in pos]
        dev = xs_[0].device
        return multi_subnet_batch_norm(xs_, self._parameters["weight"], self._parameters["bias"],
                                       buf.get("running_mean"), buf.get("running_var"), training=training,
                                       momentum=factor, eps=self.eps, relu=relu, stats_subnet=owner_,
                                       indices=_index_lists(k, dev))  # fmt: skip

    def run_native(xs_, pos, owner_):
        """Every arch at full width (a BN of a frozen group): PyTorch's own BatchNorm per arch, the owner's pass
        alone updating the running statistics (measured faster than the multi-subnet op here: resnet50, 21
        such BNs, CPU forward_many fwd+bwd 389 -> 342 ms)."""
        w, bias, rm, rv = self._parameters["weight"], self._parameters["bias"], buf.get("running_mean"), \
            buf.get("running_var")  # fmt: skip
        outs = []
        for j, xi in enumerate(xs_):
            own = not training or j == owner_
            y = F.batch_norm(xi, rm if own else None, rv if own else None, w, bias, training,
                             factor if j == owner_ else 0.0, self.eps)  # fmt: skip
            outs.append(F.relu(y) if relu else y)
        return outs

    native = not _dims(self)
    out = pack(_shared(xs, [id(k) for k in kepts], owner, run_native if native else run))
    if relu and isinstance(out, Multi):
        out.relu_done = True  # the model's ReLU right after is then skipped (it would change nothing)
    return out


def _bn_factor(bn: nn.Module, updates: bool) -> float:
    """The running-statistics update factor of this call (cumulative when ``bn.momentum`` is None)."""
    if not updates:
        return 0.0
    nbt = bn._buffers["num_batches_tracked"]
    nbt.add_(1)
    return 1.0 / float(nbt) if bn.momentum is None else bn.momentum


def _layer_norm_forward(self, x):
    b = context.current()
    cls = type(self)._stp_original
    if b is None or (len(b) == 1 and not isinstance(x, Multi)):
        return cls.forward(self, x)
    shape = self.__dict__["normalized_shape"]
    w, bias = self._parameters.get("weight"), self._parameters.get("bias")
    outs = []
    for xi, widths in zip(unpack(x, len(b)), b.widths):
        k = _kept(self, "out", widths)
        outs.append(F.layer_norm(xi, (*shape[:-1], k.count), None if w is None else k.take(w, w.dim() - 1),
                                 None if bias is None else k.take(bias, bias.dim() - 1), self.eps))  # fmt: skip
    return pack(outs)


def _generic_forward(self, *args, **kwargs):
    b = context.current()
    cls = type(self)._stp_original
    if b is None or len(b) == 1 or not args:
        return cls.forward(self, *args, **kwargs)
    return _per_member(self, args[0], lambda m, xi: cls.forward(m, xi, *args[1:], **kwargs))


# ---------------------------------------------------------------------------------------------- the registry
# (torch type, mixin, fast forward for the exact torch type).  Subclasses of these types with their own
# forward keep it and run per arch through the dynamic attributes.
KINDS: list[tuple[type, type, Callable | None]] = [
    (nn.Conv2d, ElasticConv, _conv_forward),
    (nn.modules.conv._ConvNd, ElasticConv, None),
    (nn.Linear, ElasticLinear, _linear_forward),
    (nn.BatchNorm2d, ElasticBatchNorm, _bn_forward),
    (nn.BatchNorm1d, ElasticBatchNorm, _bn_forward),
    (nn.modules.batchnorm._BatchNorm, ElasticBatchNorm, None),
    (nn.LayerNorm, ElasticLayerNorm, _layer_norm_forward),
    (nn.GroupNorm, ElasticGroupNorm, None),
]
_CLASSES: dict[type, type] = {}


def supported(module: nn.Module) -> str | None:
    """None if ``module`` can become elastic, else why not."""
    kind = next((k for k in KINDS if isinstance(module, k[0])), None)
    if kind is None:
        return f"{type(module).__name__} has no elastic version (supported: Conv, Linear, BatchNorm, LayerNorm, GroupNorm)"
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and not _depthwise(module):
            return f"grouped convolution (groups={module.groups}) that is not depthwise"
        if module.transposed:
            return "transposed convolution"
    if isinstance(module, nn.LayerNorm) and module.weight is not None and module.weight.dim() != 1:
        return "LayerNorm over more than the channel dimension"
    return None


def make_elastic(module: nn.Module, dims: Mapping[str, DimPlan]) -> None:
    """Turn ``module`` into its elastic version in place (see the module docstring)."""
    if isinstance(module, ElasticModule):
        module.__dict__["_stp_dims"] = dict(dims)
        return
    cls = type(module)
    new = _CLASSES.get(cls)
    if new is None:
        torch_type, mixin, fast = next(k for k in KINDS if isinstance(module, k[0]))
        forward = fast if (fast is not None and cls is torch_type) else _generic_forward
        if isinstance(module, nn.GroupNorm) or torch_type is nn.modules.conv._ConvNd:
            forward = _generic_forward
        new = _CLASSES[cls] = type(f"Elastic{cls.__name__}", (mixin, cls),
                                   {"forward": forward, "_stp_original": cls, "__module__": __name__})  # fmt: skip
    module.__dict__["_stp_dims"] = dict(dims)
    module.__class__ = new


def restore(module: nn.Module) -> None:
    """Undo :func:`make_elastic` (the module keeps its full-size parameters)."""
    if isinstance(module, ElasticModule):
        module.__class__ = module._stp_original
        for key in ("_stp_dims", "_stp_full"):
            module.__dict__.pop(key, None)
