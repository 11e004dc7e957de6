"""Server side of fedpriv: strategies and the ServerApp."""

from strategies.dp_fedavg import AdaptiveDPFedAvg, DPFedAvg
from strategies.weighted_fedavg import StopRun, WeightedFedAvg

__all__ = ["AdaptiveDPFedAvg", "DPFedAvg", "StopRun", "WeightedFedAvg"]
