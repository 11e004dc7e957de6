"""Loggers for fedpriv's own messages, and a console that shows them above Flower's detail.

Flower prints, and in deployment streams to ``flwr log``, the records of its
own ``flwr`` logger in every runtime; fedpriv's loggers are its children, so
round progress and rejected replies reach the user wherever the app runs.

By default ``scripts/run.py`` keeps the console to fedpriv's own lines
(per-round summary, warnings, errors, the final summary) and writes everything
to ``fedpriv.log`` in the run's folder; ``verbose=true`` shows Flower's detail too.
"""

from __future__ import annotations

import logging
from pathlib import Path

FLOWER = "flwr"
LOG_FILE = "fedpriv.log"
"""The run folder's full log (Flower's and fedpriv's records): an operator file."""
# Libraries that log set-up chatter at INFO through the root logger.
_CHATTY = ("alembic",)


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name``, a child of Flower's ``flwr`` logger."""
    return logging.getLogger(FLOWER).getChild(name)


class FedprivConsole(logging.Filter):
    """Passes fedpriv's records and every warning; drops Flower's own INFO and DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` reaches the console."""
        return record.levelno >= logging.WARNING or record.name != FLOWER


def quiet_console(*, verbose: bool) -> None:
    """Show only fedpriv's lines and warnings on the console, unless ``verbose``."""
    from flwr.common.logger import console_handler

    for existing in [f for f in console_handler.filters if isinstance(f, FedprivConsole)]:
        console_handler.removeFilter(existing)
    if not verbose:
        console_handler.addFilter(FedprivConsole())
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)


def log_to_file(path: Path) -> logging.Handler:
    """Append every ``flwr`` record of INFO and above (Flower's and fedpriv's) to ``path``.

    Returns
    -------
    logging.Handler
        The handler, to remove when the run is over.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger(FLOWER).addHandler(handler)
    return handler
