"""In-memory SecAgg+ clients behind a fake Grid, for tests without Flower's runtime.

Each client answers every stage with the real client functions of
:mod:`fedpriv.secagg.client`; a client listed in ``drop`` for a stage sends
no reply from that stage on, as a crashed node would.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedpriv.secagg import client as secagg_client
from fedpriv.secagg import messages as m


class SecAggGrid:
    """A Grid whose nodes are in-memory SecAgg+ clients.

    Parameters
    ----------
    inputs : dict[int, numpy.ndarray]
        Node id to the integer input it masks (protocol tests), or to the
        float update it encodes at setup (strategy tests).
    num_examples : dict[int, float], optional
        Node id to its example count (strategy tests).
    drop : dict[str, set[int]], optional
        Stage name to the nodes that vanish at that stage.
    """

    def __init__(self, inputs, *, num_examples=None, drop=None, seed=0):
        self.inputs = dict(inputs)
        self.num_examples = num_examples or {}
        self.drop = drop or {}
        self.states = {}
        self.encoded = {}
        self.gone: set[int] = set()
        self.rng = np.random.default_rng(seed)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return sorted(self.inputs)

    def send_and_receive(self, messages, *, timeout=None):
        return self.exchange(list(messages), timeout)

    def exchange(self, messages, timeout):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            record = msg.content.config_records[m.RECORD]
            stage = record[m.STAGE]
            if node in self.gone or node in self.drop.get(stage, set()):
                self.gone.add(node)
                continue
            replies.append(Message(content=self.answer(node, stage, record), reply_to=msg))
        return replies

    def answer(self, node, stage, record):
        if stage == m.SETUP:
            if node in self.num_examples:
                encoding = m.encoding_from_record(record)
                self.encoded[node] = encoding.encode(self.inputs[node], num_examples=self.num_examples[node], rng=self.rng)
            else:
                self.encoded[node] = self.inputs[node]
            self.states[node], answer = secagg_client.setup(node_id=node, config=record)
            return RecordDict({m.RECORD: ConfigRecord(answer)})
        if stage == m.SHARE_KEYS:
            self.states[node], answer = secagg_client.share_keys(self.states[node], record)
            return RecordDict({m.RECORD: ConfigRecord(answer)})
        if stage == m.COLLECT_MASKED:
            self.states[node], masked = secagg_client.collect_masked(self.states[node], record, encoded=self.encoded[node])
            return RecordDict({m.MASKED: ArrayRecord({m.MASKED: Array(masked)})})
        return RecordDict({m.RECORD: ConfigRecord(secagg_client.unmask(self.states[node], record))})
