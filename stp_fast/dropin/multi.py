"""``Multi``: the tensors of several subnets flowing through the user's own ``forward`` together.

``net.forward_many(x, archs)`` runs the user's model code ONCE for all archs.  The input is a plain
tensor shared by every arch; the first elastic layer whose widths differ between the archs returns a
``Multi`` holding one tensor per arch (of different channel counts).  From there on:

* elastic layers (``stp_fast.dropin.elastic``) take the members as a list and run all archs in one
  multi-subnet op (one launch on the GPU, shared work on the CPU);
* every other torch function or tensor method (``F.relu``, ``x + y``, ``torch.cat``, ``view``,
  attention, ...) is applied member by member through ``__torch_function__``;
* archs that share an input object and a width keep sharing one computation (the stem of most archs).

A ``Multi`` is a tensor subclass without storage (``isinstance(x, torch.Tensor)`` holds for user code);
nothing ever reaches a kernel with it.  Reading a size on which the members disagree (e.g. the channel
count after a pruned layer) raises :class:`AmbiguousShapeError`: ``stp_fast.convert`` then falls back
to one pass per arch for that model and says so in ``net.report()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map


class AmbiguousShapeError(RuntimeError):
    """User code read a size that differs between the subnets running together."""


class MultiShape(tuple):
    """The shape of a ``Multi`` whose members disagree in some dims: those dims raise on access."""

    def __new__(cls, shapes: Sequence[torch.Size]):
        self = super().__new__(cls, shapes[0])
        self.bad = frozenset(d for d in range(len(shapes[0])) if len({s[d] for s in shapes}) > 1)
        self.shapes = shapes
        return self

    def _check(self, dims) -> None:
        if self.bad & set(dims):
            sizes = [tuple(s) for s in self.shapes]
            raise AmbiguousShapeError(f"the model reads dimension(s) {sorted(self.bad & set(dims))} of a tensor whose "
                                      f"size differs between the subnets run together ({sizes})")  # fmt: skip

    def __getitem__(self, item):
        n = len(self)
        if isinstance(item, slice):
            dims = range(n)[item]
            self._check(dims)
            return torch.Size(super().__getitem__(item))
        self._check([item % n if n else item])
        return super().__getitem__(item)

    def __iter__(self):
        self._check(range(len(self)))
        return super().__iter__()

    def __eq__(self, other):
        self._check(range(len(self)))
        return super().__eq__(other)

    __hash__ = tuple.__hash__


class Multi(Tensor):
    """One tensor per subnet (``members``), dispatched member by member; see the module docstring."""

    members: list[Tensor]

    @staticmethod
    def __new__(cls, members: Sequence[Tensor]) -> Multi:
        t = members[0]
        self = Tensor._make_wrapper_subclass(cls, t.shape, strides=t.stride(), dtype=t.dtype, device=t.device,
                                             requires_grad=False)  # fmt: skip
        self.members = list(members)
        return self

    def __repr__(self) -> str:  # no torch calls: printing must not dispatch
        return f"Multi({[tuple(m.shape) for m in self.members]}, dtype={self.members[0].dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"stp_fast: a Multi reached the dispatcher ({func}); this is a bug, please report it")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SHAPE_GETTERS:
            return _shape(args[0]) if func is not Tensor.size else _size(args[0], *args[1:], **kwargs)
        if func in _RELUS and getattr(args[0], "relu_done", False):
            return args[0]  # a fused BatchNorm+ReLU already applied it (ReLU is idempotent)
        count = _count((args, kwargs))
        mutating = _mutates(func, args, kwargs)
        done: dict[tuple, object] = {}  # members with the very same arguments compute once and share
        targets: set[int] = set()
        outs = []
        with torch._C.DisableTorchFunctionSubclass():
            for i in range(count):
                a, k = tree_map(lambda v, i=i: v.members[i] if isinstance(v, Multi) else v, (args, kwargs))
                key = tuple(id(v) for v in tree_flatten((a, k))[0])
                if key in done:
                    outs.append(done[key])
                    continue
                if mutating and a and isinstance(a[0], Tensor):
                    if id(a[0]) in targets:  # shared by an arch whose other arguments differ: give it its own copy
                        a = (a[0].clone(), *a[1:])
                    targets.add(id(a[0]))
                out = done[key] = func(*a, **k)
                outs.append(out)
        if mutating and isinstance(args[0], Multi) and all(isinstance(o, Tensor) for o in outs):
            args[0].members = list(outs)  # statement-style in-place ops (x.relu_()) update x itself
        return _pack_result(outs, func)


_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__setitem__"}
# functionals whose ``inplace`` flag may come positionally: (function, position of the flag)
_INPLACE_POSITION = {F.relu: 1, F.relu6: 1, F.selu: 1, F.silu: 1, F.hardswish: 1, F.mish: 1, F.hardsigmoid: 1,
                     F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.dropout: 3, F.threshold: 3,
                     F.alpha_dropout: 3, F.rrelu: 4}  # fmt: skip


def _mutates(func, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``x += y``, ``F.relu(x, inplace=True)``)."""
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS:
        return True
    if kwargs.get("inplace") is True:
        return True
    pos = _INPLACE_POSITION.get(func)
    return pos is not None and len(args) > pos and args[pos] is True


_SHAPE_GETTERS = {Tensor.shape.__get__, Tensor.size}
_RELUS = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}


def _shape(x: Multi):
    shapes = [m.shape for m in x.members]
    return shapes[0] if all(s == shapes[0] for s in shapes) else MultiShape(shapes)


def _size(x: Multi, dim: int | None = None):
    shape = _shape(x)
    return shape if dim is None else shape[dim]


def _count(tree) -> int:
    counts = {len(v.members) for v in tree_flatten(tree)[0] if isinstance(v, Multi)}
    if len(counts) != 1:
        raise RuntimeError(f"stp_fast: tensors of different subnet batches met ({sorted(counts)} members)")
    return counts.pop()


def _pack_result(outs: list, func):
    first = outs[0]
    if isinstance(first, Tensor):
        return pack(outs)
    if isinstance(first, (tuple, list)) and any(isinstance(o, Tensor) for o in first):
        packed = [pack([o[j] for o in outs]) if isinstance(first[j], Tensor) else _agree([o[j] for o in outs], func)
                  for j in range(len(first))]  # fmt: skip
        return type(first)(packed) if not hasattr(first, "_fields") else type(first)(*packed)
    return _agree(outs, func)


def _agree(values: list, func):
    first = values[0]
    if all(v is first or v == first for v in values[1:]):
        return first
    name = getattr(func, "__name__", str(func))
    raise AmbiguousShapeError(f"{name} gives different results for the subnets run together: {values}")


def pack(members: Sequence[Tensor]) -> Tensor:
    """A ``Multi`` of ``members``, or the plain tensor when every member is the same object."""
    first = members[0]
    if all(m is first for m in members[1:]):
        return first
    return Multi(members)


def unpack(x, count: int) -> list:
    """The ``count`` per-subnet values of ``x`` (a plain value is shared by every subnet)."""
    if isinstance(x, Multi):
        if len(x.members) != count:
            raise RuntimeError(f"stp_fast: expected {count} subnets, got a Multi of {len(x.members)}")
        return list(x.members)
    return [x] * count


def select(x, index: Sequence[int]):
    """The subset ``index`` of a Multi's members (plain values pass through)."""
    return pack([x.members[i] for i in index]) if isinstance(x, Multi) else x


def merge(parts: Sequence[tuple[Sequence[int], object]], count: int):
    """Reassemble values computed for disjoint subsets of ``count`` subnets: ``[(indices, value), ...]``."""
    slots: list = [None] * count
    for index, value in parts:
        for i, v in zip(index, unpack(value, len(index))):
            slots[i] = v
    return pack(slots)
