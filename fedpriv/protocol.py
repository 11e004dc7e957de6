"""Keys of the messages that the ServerApp and the ClientApp exchange."""

# The FedAvg weight of a training reply (Flower's convention).
WEIGHT_KEY = "num-examples"
# A client over its record-level privacy budget replies with metrics only and
# this key set to 1: a decline, counted apart from rejected replies.
DECLINED_KEY = "declined"
# The round number the server puts in every ConfigRecord it sends.
ROUND_KEY = "server-round"
