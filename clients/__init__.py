"""Client side of fedpriv: the ClientApp and its training procedures."""

from clients.opacus_training import OpacusTraining, PrivacyBudgetExhausted
from clients.plain import PlainTraining, TrainOutcome

__all__ = ["OpacusTraining", "PlainTraining", "PrivacyBudgetExhausted", "TrainOutcome"]
