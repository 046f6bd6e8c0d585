"""Elastic supernets: ``create(name, num_classes, in_chans=3, **kw)`` and ``names()``."""

from __future__ import annotations

from collections.abc import Callable

from stp_fast.models.base import Supernet
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


def names() -> list[str]:
    """The model names ``create`` accepts."""
    return sorted(_REGISTRY)


def register(name: str, factory: Callable[..., Supernet]) -> None:
    """Add a supernet factory ``factory(num_classes, in_chans=3, **kw)`` under ``name``."""
    _REGISTRY[name] = factory


def create(name: str, num_classes: int, in_chans: int = 3, **kw) -> Supernet:
    """Build the elastic supernet ``name`` (see ``names()``); extra keywords go to the model."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    net = _REGISTRY[name](num_classes, in_chans, **kw)
    net.model_name, net.model_kwargs = name, dict(kw)  # recorded in checkpoints
    net.num_classes, net.in_chans = num_classes, in_chans
    return net


__all__ = ["Supernet", "create", "names", "register"]
