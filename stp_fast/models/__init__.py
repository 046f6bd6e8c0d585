"""Supernets by name: ``create(name, num_classes, in_chans=3, **kw)`` and ``names()``.

``name`` is one of the built-in models (plain definitions made elastic by ``stp_fast.convert``), a
user's factory ``"pkg.module:function"``, or a Hugging Face ``transformers`` image classifier
``"hf:<model_type>"`` (e.g. ``hf:vit``, ``hf:resnet``, ``hf:convnext``) built from its config --
all through the same engine.  A factory is called with the keywords it accepts among
``num_classes``, ``in_chans`` and ``input_size`` plus the model arguments; it returns a plain
``nn.Module`` (converted here) or a supernet.  Hugging Face configs get ``num_labels``,
``num_channels`` and ``image_size`` from the data set and the model arguments as config fields.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from stp_fast.models.base import Supernet, make_supernet
from stp_fast.models.mobilenetv3 import mobilenetv3_large
from stp_fast.models.resnet_cifar import resnet20, resnet56
from stp_fast.models.resnet_imagenet import resnet50
from stp_fast.models.vit import vit_tiny
from stp_fast.models.wrn import wrn28_10

_REGISTRY: dict[str, Callable[..., Supernet]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet50": resnet50,
    "wrn28_10": wrn28_10,
    "mobilenetv3_large": mobilenetv3_large,
    "vit_tiny": vit_tiny,
}
# keywords of create() that configure the conversion, not the model
CONVERT_KEYS = ("prune_residual", "width_ratios", "divisor")


def names() -> list[str]:
    """The built-in model names ``create`` accepts (besides ``pkg.module:factory`` and ``hf:<type>``)."""
    return sorted(_REGISTRY)


def register(name: str, factory: Callable[..., Supernet]) -> None:
    """Add a supernet factory ``factory(num_classes, in_chans=3, **kw)`` under ``name``."""
    _REGISTRY[name] = factory


def is_known(name: str) -> bool:
    """Whether ``create`` can try ``name`` (a built-in, or a factory/Hugging Face spec)."""
    return name in _REGISTRY or name.startswith("hf:") or (":" in name and not name.startswith(":"))


def create(name: str, num_classes: int, in_chans: int = 3, **kw) -> Supernet:
    """Build the supernet ``name`` (see the module docstring); extra keywords go to the model (built-ins:
    their keywords; factories: their arguments; ``hf:``: config fields), except ``prune_residual``,
    ``width_ratios`` and ``divisor`` (the conversion's) and ``input_size`` = (C, H, W)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    if name in _REGISTRY:
        net = _REGISTRY[name](num_classes, in_chans, **kw)
    elif name.startswith("hf:"):
        net = _hugging_face(name[3:], num_classes, in_chans, **kw)
    elif is_known(name):
        net = _factory(name, num_classes, in_chans, **kw)
    else:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}, or a factory "
                         "'pkg.module:function', or 'hf:<model_type>' (a Hugging Face image classifier)")  # fmt: skip
    net.model_name, net.model_kwargs = name, dict(kw)  # recorded in checkpoints
    net.num_classes, net.in_chans = num_classes, in_chans
    return net


def _split(kw: dict) -> tuple[dict, dict, tuple]:
    convert_kw = {k: kw.pop(k) for k in CONVERT_KEYS if k in kw}
    size = kw.pop("input_size", None)
    return kw, convert_kw, size


def _factory(spec: str, num_classes: int, in_chans: int, **kw):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"model {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    args, convert_kw, size = _split(dict(kw))
    size = tuple(size or (in_chans, 32, 32))
    offered = {"num_classes": num_classes, "in_chans": in_chans, "input_size": size}
    try:
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        call_kw = {k: v for k, v in offered.items() if takes_all or k in params} | args
        model = fn(**call_kw)
    except TypeError as exc:
        raise ValueError(f"model {spec!r}: calling it with {sorted(call_kw)} failed: {exc}") from exc
    if hasattr(model, "space") and hasattr(model, "forward_many"):
        return model
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return make_supernet(model, size, channels_last=False, **convert_kw)


def _hugging_face(model_type: str, num_classes: int, in_chans: int, **kw):
    try:
        import transformers
    except ImportError as exc:
        raise ValueError(f"model 'hf:{model_type}' needs the transformers package (pip install transformers)") \
            from exc  # fmt: skip
    args, convert_kw, size = _split(dict(kw))
    size = tuple(size or (in_chans, 224, 224))
    try:
        config = transformers.AutoConfig.for_model(model_type, num_labels=num_classes, **args)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"model 'hf:{model_type}': {exc}") from exc
    for field, value in (("num_channels", in_chans), ("image_size", size[-1])):
        if hasattr(config, field) and field not in args:
            setattr(config, field, value)
    model = transformers.AutoModelForImageClassification.from_config(config)
    return make_supernet(model, size, channels_last=False, outputs="logits", **convert_kw)


__all__ = ["Supernet", "create", "is_known", "names", "register"]
