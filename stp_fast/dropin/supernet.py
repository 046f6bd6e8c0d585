"""``ConvertedNet``: the user's model as an stp_fast supernet (what ``stp_fast.convert`` returns).

It has the interface of the built-in supernets -- ``net(x)``, ``net(x, arch=a)``,
``net.forward_many(x, archs)`` (also ``net(x, archs=archs)``, so one DDP forward runs them all),
``net.space``, ``net.extract(a)`` -- and holds the user's model as ``net.model``.

The net shares the model's submodules, parameters and buffers (the very same dicts), so
``net.state_dict()`` *is* ``model.state_dict()``: the original keys and shapes, loadable into the
user's class, and ``net.layer1`` reaches the model's ``layer1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from stp_fast.arch.space import Arch, Space
from stp_fast.dropin import context
from stp_fast.dropin.groups import Group
from stp_fast.dropin.multi import merge, select, unpack
from stp_fast.models.base import Supernet


@dataclass
class Stage:
    """Blocks of one container that depth can shorten: ``blocks[0]`` is never dropped."""

    container: str
    blocks: list[str]
    skippable: list[bool]


@dataclass
class Notes:
    """What conversion found, for ``net.report()``."""

    frozen: dict[str, str] = field(default_factory=dict)  # group -> why it stays at full width
    rejected_blocks: dict[str, str] = field(default_factory=dict)
    depth_error: str | None = None
    batched: str | None = None  # why forward_many runs the archs one by one (None: batched)
    sorted_by: str | None = None
    norm_relu: set[str] = field(default_factory=set)  # BatchNorm layers whose only consumer is a ReLU


# ---------------------------------------------------------------------------------------------- skippable blocks
class SkippableBlock(nn.Module):
    """Mixin of a skippable block's dynamic subclass: a dropped block returns its input (its stream)."""

    _stp_block_original: type

    def forward(self, *args, **kwargs):
        b = context.current()
        original = type(self)._stp_block_original.forward
        if b is None:
            return original(self, *args, **kwargs)
        stage, pos = self.__dict__["_stp_block"]
        keep = [i for i, a in enumerate(b.archs) if a.depth[stage] > pos]
        n = len(b)
        if len(keep) == n:
            return original(self, *args, **kwargs)
        stream = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        if not keep:
            return _like(self, stream)
        sub_args, sub_kwargs = tree_map(lambda v: select(v, keep), (args, kwargs))
        with context.running(b.subset(keep)):
            out = original(self, *sub_args, **sub_kwargs)
        skip = [i for i in range(n) if i not in keep]
        if isinstance(out, Tensor):
            return merge([(keep, out), (skip, select(stream, skip))], n)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            # the stream first, then extras (e.g. attention weights) that dropped archs cannot give: None
            return type(out)([merge([(keep, out[0]), (skip, select(stream, skip))], n), *[None] * (len(out) - 1)])
        raise TypeError(f"stp_fast: skippable block {type(self).__name__} returned a {type(out).__name__}; a "
                        "skippable block must return a tensor or a tuple starting with one")  # fmt: skip


def _like(block: nn.Module, stream: Tensor):
    """What a dropped block returns: its input, in the structure the block returns (``_stp_template``:
    None for a tensor, else ``(type, length)`` of a tuple/list whose first element is the stream)."""
    template = block.__dict__.get("_stp_template")
    if template is None:
        return stream
    kind, length = template
    return kind([stream, *[None] * (length - 1)])


def record_templates(model: nn.Module, blocks: Sequence[str], run: Callable[[], object]) -> None:
    """Record each block's output structure during ``run()`` (a full forward) for :func:`_like`."""
    modules = dict(model.named_modules())
    handles = []
    for name in blocks:
        def hook(module, _inputs, out):
            if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
                module.__dict__["_stp_template"] = (type(out), len(out))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()


_BLOCK_CLASSES: dict[type, type] = {}


def make_skippable(module: nn.Module, stage: int, position: int) -> None:
    cls = type(module)
    if isinstance(module, SkippableBlock):
        module.__dict__["_stp_block"] = (stage, position)
        return
    new = _BLOCK_CLASSES.get(cls)
    if new is None:
        new = _BLOCK_CLASSES[cls] = type(f"Skippable{cls.__name__}", (SkippableBlock, cls),
                                         {"_stp_block_original": cls, "__module__": __name__})  # fmt: skip
    module.__dict__["_stp_block"] = (stage, position)
    module.__class__ = new


def restore_block(module: nn.Module) -> None:
    if isinstance(module, SkippableBlock):
        module.__class__ = module._stp_block_original
        module.__dict__.pop("_stp_block", None)


# ---------------------------------------------------------------------------------------------- outputs
def output_selector(outputs) -> Callable:
    """``outputs=`` of convert: None (a tensor, ``.logits``, ``["logits"]`` or the first of a tuple),
    an attribute/key name, or a callable."""
    if callable(outputs):
        return outputs
    if outputs is not None and not isinstance(outputs, str):
        raise TypeError(f"outputs must be None, an attribute/key name or a callable, got {type(outputs).__name__}")

    def pick(out):
        if outputs is not None:
            if isinstance(out, dict) or hasattr(out, "keys"):
                if outputs in out:
                    return out[outputs]
            if hasattr(out, outputs):
                return getattr(out, outputs)
            raise ValueError(f"outputs={outputs!r}: the model output ({type(out).__name__}) has no such field")
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, dict):
            logits = out.get("logits")
        if logits is not None:
            return logits
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            return out[0]
        raise ValueError(f"the model returns a {type(out).__name__}; pass outputs= (a field name or a function) "
                         "to say which tensor is the prediction")  # fmt: skip

    return pick


# ---------------------------------------------------------------------------------------------- the supernet
class ConvertedNet(Supernet):
    """A converted model (see the module docstring and ``stp_fast.convert``)."""

    def __init__(self, model: nn.Module, space: Space, groups: list[Group], stages: list[Stage],
                 outputs: Callable, notes: Notes, example: tuple[tuple, dict], cost) -> None:  # fmt: skip
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the net IS the model's module tree
        for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
                     "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
            if hasattr(model, name):
                object.__setattr__(self, name, getattr(model, name))
        self.space = space
        self.channel_groups = groups
        self.depth_stages = stages
        self.outputs = outputs
        self.notes = notes
        self.example = example
        self.cost = cost
        self.batched = True
        self.model_name = type(model).__name__
        self.model_kwargs: dict = {}
        self.num_classes = None
        self.in_chans = None

    # ------------------------------------------------------------------ forward
    def forward(self, x=None, arch: Arch | None = None, archs: Sequence[Arch] | None = None, **kwargs):
        """The full network (``arch`` None), one subnet, or -- with ``archs`` -- a list of outputs of every arch
        in one pass (so a DDP wrapper around the net runs them in one forward)."""
        if archs is not None:
            if arch is not None:
                raise ValueError("pass arch= (one subnet) or archs= (several), not both")
            return self.forward_many(x, archs, **kwargs)
        self._check_input(x)
        if arch is None or arch == self.space.full():
            return self._plain(self._layout(x) if isinstance(x, Tensor) else x, kwargs)
        return self.forward_many(x, [arch], **kwargs)[0]

    def _plain(self, x, kwargs) -> Tensor:
        return self.outputs(self.model(*(() if x is None else (x,)), **kwargs))

    def _check_input(self, x) -> None:
        """A clear error for an image batch the model was not converted for (channels, rank)."""
        args = self.example[0]
        if not (isinstance(x, Tensor) and args and isinstance(args[0], Tensor)):
            return
        ref = args[0]
        if x.dim() != ref.dim() or (ref.dim() == 4 and x.shape[1] != ref.shape[1]):
            want = f"[B, {ref.shape[1]}, H, W]" if ref.dim() == 4 else f"{ref.dim()}-D"
            raise ValueError(f"forward: x has shape {tuple(x.shape)} but the model was converted for inputs {want} "
                             f"(x has {x.shape[1] if x.dim() > 1 else '?'} channels but the network takes "
                             f"{ref.shape[1]})")  # fmt: skip

    def forward_many(self, x, archs: Sequence[Arch], **kwargs) -> list[Tensor]:
        """Outputs of every arch on the same input; one pass of the model for all of them."""
        if not isinstance(archs, (list, tuple)) or not archs:
            raise ValueError("forward_many: archs must be a non-empty list of Arch")
        archs = [self.space.validate(a) for a in archs]
        self._check_input(x)
        x = self._layout(x) if isinstance(x, Tensor) else x
        full = self.space.full()
        owner = next((i for i, a in enumerate(archs) if a == full), None)
        if len(archs) == 1 and owner == 0:
            return [self._plain(x, kwargs)]
        if not self.batched:  # one pass per arch (the model reads sizes that differ between archs)
            return [self._plain(x, kwargs) if a == full else self._run([a], None, x, kwargs)[0] for a in archs]
        return self._run(archs, owner, x, kwargs)

    def _run(self, archs: list[Arch], owner: int | None, x, kwargs) -> list[Tensor]:
        with context.running(context.Batch(archs, owner)):
            out = self._plain(x, kwargs)
        return unpack(out, len(archs))

    def train(self, mode: bool = True) -> ConvertedNet:
        super().train(mode)
        object.__setattr__(self.model, "training", mode)  # the model's own flag (its children share ours)
        return self

    def sort_channels(self, criterion="l1") -> None:
        """The one-time importance sort of every elastic group (see ``stp_fast.dropin.importance``): after
        loading pretrained weights, so that prefixes keep the strongest channels.  The function is unchanged."""
        from stp_fast.dropin.importance import sort_groups

        sort_groups(self.model, [g for g in self.channel_groups if g.frozen is None], criterion)
        self.notes.sorted_by = criterion if isinstance(criterion, str) else "custom"

    # ------------------------------------------------------------------ depth
    def dropped_blocks(self, arch: Arch) -> list[str]:
        """Names of the blocks ``arch`` drops."""
        return [blk for s, stage in enumerate(self.depth_stages) for j, blk in enumerate(stage.blocks) if j >= arch.depth[s]]

    # ------------------------------------------------------------------ extraction
    def extract(self, arch: Arch) -> nn.Module:
        """The user's model at ``arch`` with physically smaller layers (BN statistics copied, not
        recalibrated; see :meth:`export`)."""
        from stp_fast.dropin.export import extract_model

        return extract_model(self, arch)

    def export(self, arch: Arch, calib=None, *, num_images: int = 2000, check: bool = True) -> nn.Module:
        """The chosen subnet for deployment: :meth:`extract`, BatchNorm recalibrated on ``calib`` (a
        loader of training images or (images, labels) batches; None keeps the statistics), eval mode.
        With ``check`` its output on the example inputs is compared with ``net(x, arch=arch)``."""
        from stp_fast.nn.bn import recalibrate_bn

        small = self.extract(arch)
        if calib is not None:
            recalibrate_bn(small, calib, num_images)
        small.eval()
        if check and calib is None:
            self.check_extracted(arch, small)
        return small

    @torch.no_grad()
    def check_extracted(self, arch: Arch, small: nn.Module, rtol: float = 1e-4) -> None:
        """Raise if ``small`` (eval mode, same statistics) does not compute ``net(x, arch=arch)``."""
        args, kwargs = self.example
        was = self.training
        self.eval()
        try:
            want = self.forward(args[0], arch=arch, **kwargs) if args else None
            got = self.outputs(small(*args, **kwargs))
        finally:
            self.train(was)
        err = (got.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        if not err <= rtol * max(scale, 1e-6) + 1e-6:
            raise RuntimeError(f"stp_fast: the extracted model differs from the subnet by {err:.3g} (scale {scale:.3g})")

    def layout(self, arch: Arch) -> dict:
        from stp_fast.dropin.export import layout

        return layout(self, arch)

    # ------------------------------------------------------------------ report
    def report(self) -> str:
        """Groups (elastic and frozen, with reasons), skippable blocks, and the MACs range."""
        from stp_fast.dropin.report import render

        return render(self)

    def summary(self) -> dict:
        from stp_fast.dropin.report import summary

        return summary(self)
