"""Public ops of stp_fast: ``torch.library`` custom ops in the ``stp_fast`` namespace.

Each op has autograd and a fake (meta) kernel, dispatches to the fastest available backend
(C++ on CPU tensors; Triton or CUDA on GPU tensors; pure PyTorch everywhere) and has its
pure-PyTorch reference beside it (``<op>_ref``).  See ``stp_fast.ops._backend`` for selection.
"""

from stp_fast.ops import _ext_schemas  # noqa: F401  (defines the extension's private op schemas)
from stp_fast.ops._backend import BackendUnavailableError, force_backend
from stp_fast.ops.masked_conv2d import masked_conv2d, masked_conv2d_ref
from stp_fast.ops.masked_linear import masked_linear, masked_linear_ref
from stp_fast.ops.multi_subnet_batch_norm import multi_subnet_batch_norm, multi_subnet_batch_norm_ref
from stp_fast.ops.multi_subnet_conv2d import multi_subnet_conv2d, multi_subnet_conv2d_ref
from stp_fast.ops.multi_subnet_linear import multi_subnet_linear, multi_subnet_linear_ref

__all__ = [
    "BackendUnavailableError",
    "force_backend",
    "masked_conv2d",
    "masked_conv2d_ref",
    "masked_linear",
    "masked_linear_ref",
    "multi_subnet_batch_norm",
    "multi_subnet_batch_norm_ref",
    "multi_subnet_conv2d",
    "multi_subnet_conv2d_ref",
    "multi_subnet_linear",
    "multi_subnet_linear_ref",
]
