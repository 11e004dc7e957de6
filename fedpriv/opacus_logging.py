"""Keep Opacus from reconfiguring logging when it is imported.

Importing Opacus calls ``logging.basicConfig``, which gives the root logger a
handler where it had none (a ``flwr-serverapp`` or ``flwr-clientapp``
process): Flower's records then print twice, DEBUG ones included.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def opacus_logging_contained() -> Iterator[None]:
    """Remove root handlers added inside the block and restore the flwr level."""
    root = logging.getLogger()
    flwr_logger = logging.getLogger("flwr")
    root_handlers, flwr_level = list(root.handlers), flwr_logger.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in root_handlers]:
            root.removeHandler(handler)
        flwr_logger.setLevel(flwr_level)
