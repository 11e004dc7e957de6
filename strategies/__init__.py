"""Server side of fedpriv: strategies and the ServerApp."""

from strategies.weighted_fedavg import StopRun, WeightedFedAvg

__all__ = ["StopRun", "WeightedFedAvg"]
