"""Elastic layer helpers, plain-model builders and BatchNorm recalibration."""

from stp_fast.nn.bn import recalibrate_bn

__all__ = ["recalibrate_bn"]
