"""Triton kernels of stp_fast, installed as ``stp_fast.kernels`` (never import as a top-level ``kernels``)."""
