"""Architecture space, MACs/params counting."""

from stp_fast.arch.counting import count_macs
from stp_fast.arch.space import Arch, Space

__all__ = ["Arch", "Space", "count_macs"]
