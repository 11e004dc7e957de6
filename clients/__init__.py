"""Client side of fedpriv: the ClientApp and its training procedures."""

from clients.local_dp import LocalDPTraining
from clients.opacus_training import OpacusTraining
from clients.plain import PlainTraining, TrainOutcome
from clients.privacy_state import PrivacyBudgetExhausted

__all__ = ["LocalDPTraining", "OpacusTraining", "PlainTraining", "PrivacyBudgetExhausted", "TrainOutcome"]
