"""Secure aggregation (SecAgg+) with distributed DP: config, masks, encodings and the client's stages."""

from .config import NoSecureAggregation, SecAggPlus

__all__ = ["NoSecureAggregation", "SecAggPlus"]
