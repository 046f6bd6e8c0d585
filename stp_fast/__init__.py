"""stp_fast: structured pruning by stimulative training, with fused masked and multi-subnet kernels.

Importing the package is cheap: it neither imports Triton, nor initialises CUDA, nor loads the compiled
extension ``stp_fast._C``; those happen on first use (see ``stp_fast._ext`` and ``stp_fast.ops``).
"""

from stp_fast import ops
from stp_fast._version import __version__

__all__ = ["__version__", "ops"]
