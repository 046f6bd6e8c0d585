"""stp_fast: structured pruning by stimulative training, with fused masked and multi-subnet kernels.

Importing the package is cheap: it neither imports Triton, nor initialises CUDA, nor loads the compiled
extension ``stp_fast._C``; those happen on first use (see ``stp_fast._ext`` and ``stp_fast.ops``).
"""

from stp_fast import ops
from stp_fast._version import __version__
from stp_fast.arch import Arch, count_macs
from stp_fast.nn import recalibrate_bn


def extract(net, arch):
    """The plain ``torch.nn`` model of subnet ``arch`` of supernet ``net``: for a converted net (every built-in
    model) the model's own class with physically smaller layers and the dropped blocks removed.

    It holds copies of the sliced weights and BatchNorm statistics, runs without stp_fast, scripts
    with TorchScript (where the model's code does) and exports to ONNX; in eval mode its output equals
    ``net(x, arch=arch)``."""
    return net.extract(arch)


_LAZY = {"convert": "stp_fast.dropin", "ConvertedNet": "stp_fast.dropin", "ConversionError": "stp_fast.dropin",
         "apply_layout": "stp_fast.dropin", "STPStep": "stp_fast.train.step", "STPConfig": "stp_fast.train.config"}


def __getattr__(name: str):
    """The drop-in API (``convert``, ``STPStep``, ...) is imported on first use: ``import stp_fast`` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stp_fast' has no attribute {name!r}")


__all__ = ["Arch", "ConversionError", "ConvertedNet", "STPConfig", "STPStep", "__version__", "apply_layout",
           "convert", "count_macs", "extract", "ops", "recalibrate_bn"]
