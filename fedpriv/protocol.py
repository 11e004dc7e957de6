"""Keys of the messages that the ServerApp and the ClientApp exchange."""

# The FedAvg weight of a training reply (Flower's convention).
WEIGHT_KEY = "num-examples"
# A client over its record-level privacy budget replies with metrics only and
# this key set to 1: a decline, counted apart from rejected replies.
DECLINED_KEY = "declined"
# The round number the server puts in every ConfigRecord it sends.
ROUND_KEY = "server-round"
# Names the run's privacy ledgers: the server puts it in every training
# ConfigRecord, and a resumed run keeps it, so clients find the accountant
# history they wrote before (see clients/node_state.py).
LEDGER_KEY = "privacy-ledger-id"
# The rounds a resumed run goes on after (0 in a fresh run): a private client
# that finds no ledger in a resumed run declines rather than restart its epsilon.
RESUMED_KEY = "resumed-after-round"
# Why a client declined: a short reason in its decline reply's ConfigRecord.
DECLINE_REASON_KEY = "decline-reason"
# The privacy a private client reports in its reply metrics (and in a decline):
# its cumulative epsilon and that epsilon's delta, for each kind of client-side DP.
PRIVACY_REPLY_KEYS = {"record": ("epsilon", "delta"), "local": ("epsilon_local", "delta_local")}
# A local-DP client also reports its epsilon by basic composition (delta 0).
LOCAL_BASIC_EPSILON_KEY = "epsilon_local_basic"
