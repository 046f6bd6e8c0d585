"""Drop-in STP: the user's own model (``convert``) in the user's own training loop (``stp_fast.STPStep``)."""

from stp_fast.dropin.convert import ConversionError, convert
from stp_fast.dropin.export import apply_layout
from stp_fast.dropin.supernet import ConvertedNet

__all__ = ["ConversionError", "ConvertedNet", "apply_layout", "convert"]
