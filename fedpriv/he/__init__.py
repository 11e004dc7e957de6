"""Homomorphic encryption (CKKS, TenSEAL): the ``secure=ckks`` option, its keys and its packing."""

from .config import CKKS

__all__ = ["CKKS"]
