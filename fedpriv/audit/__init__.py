"""Privacy audits: membership inference and the one-run canary audit.

The config group ``audit`` builds :class:`NoAudit` or :class:`CanaryAudit`.
The math lives in small pure modules that are imported where needed:
:mod:`.lower_bound` (epsilon from correct guesses), :mod:`.one_run` (the
guessing game), :mod:`.canaries` (canary clients and records),
:mod:`.membership` (attack scores and ROC metrics), :mod:`.model_outputs` and
:mod:`.shadow` (what the attacks measure). Only these two classes are
imported here, so building the config stays cheap in every client process.
"""

from .config import CanaryAudit, NoAudit

__all__ = ["CanaryAudit", "NoAudit"]
