"""Client side of fedpriv: the ClientApp and its training procedures."""

from clients.plain import PlainTraining, TrainOutcome

__all__ = ["PlainTraining", "TrainOutcome"]
