"""Flower's floor for a deployment round: Flower's ``FedAvg`` and a ClientApp that returns what it got.

Only ``scripts/bench.py`` runs it (section ``deployment``), staged as a Flower
app of its own and submitted to the same SuperLink and SuperNodes as fedpriv.
Its ClientApp imports Flower and nothing else, so one of its rounds costs what
Flower's own processes cost: the SuperLink, the SuperNodes' polls and one
fresh ``flwr-clientapp`` process per message.

Run config keys:

- ``shapes``: JSON list of the shapes of the arrays to send (fedpriv's model's);
- ``num-rounds``: rounds to run;
- ``timings-file``: where the ServerApp writes ``{"round_seconds": [...]}``,
  timed like fedpriv's rounds (from the end of one round's server step to the
  end of the next);
- ``fast-polling``: pull replies with fedpriv's :class:`strategies.polling.PollingGrid`
  instead of Flower's grid (the floor under fedpriv's own setting).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

server_app = ServerApp()
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Reply with the arrays received and the example count ``FedAvg`` weights by."""
    content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds of ``FedAvg`` (no client evaluation) and write the round times."""
    config = context.run_config
    if config["fast-polling"]:
        # Imported here: the ClientApp loads this module too and must import Flower only.
        from strategies.polling import PollingGrid

        grid = PollingGrid(grid)
    arrays = ArrayRecord([np.zeros(shape, dtype=np.float32) for shape in json.loads(str(config["shapes"]))])
    marks: list[float] = []

    def mark(server_round: int, arrays: ArrayRecord) -> None:
        marks.append(time.perf_counter())

    FedAvg(fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=arrays, num_rounds=int(config["num-rounds"]), evaluate_fn=mark
    )
    Path(str(config["timings-file"])).write_text(json.dumps({"round_seconds": np.diff(marks).tolist()}))
