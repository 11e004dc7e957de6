"""Loggers for fedpriv's own messages.

Flower prints, and in deployment streams to ``flwr log``, the records of its
own ``flwr`` logger in every runtime; fedpriv's loggers are its children, so
round progress and rejected replies reach the user wherever the app runs.
"""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name``, a child of Flower's ``flwr`` logger."""
    return logging.getLogger("flwr").getChild(name)
