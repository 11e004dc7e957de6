"""What a fresh ClientApp process pays: in a deployment every message starts one.

The plain client trains with fedpriv's own SGD (``torch.optim`` imports
``torch._dynamo``), and loading the app and training on digits import nothing
that the message does not need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedpriv.compose import compose_config
from fedpriv.run_config import flatten
from fedpriv.training import SGD, make_optimizer

REPO = Path(__file__).resolve().parents[1]
# Heavy modules the plain digits client must not import: 1.4 s, 0.5 s, 0.5 s, Opacus, flwr-datasets.
NOT_NEEDED = ("torch._dynamo", "scipy.stats", "sklearn", "opacus", "flwr_datasets")


def _train(optimizer_factory, *, steps: int, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    optimizer = optimizer_factory(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@settings(max_examples=20, deadline=None)
@given(
    lr=st.floats(1e-3, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_sgd_equals_torch_sgd_bit_for_bit(lr, momentum, weight_decay, seed):
    # Prepare
    settings_ = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}

    # Execute
    ours = _train(lambda params: SGD(params, **settings_), steps=6, seed=seed)
    torchs = _train(lambda params: torch.optim.SGD(params, **settings_), steps=6, seed=seed)

    # Assert
    for a, b in zip(ours, torchs):
        assert torch.equal(a, b)


def test_sgd_leaves_parameters_without_gradient_and_zeroes_gradients_in_place():
    # Prepare
    trained, frozen = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    optimizer = make_optimizer("sgd", [trained, frozen], lr=0.5, momentum=0.9)
    trained.grad = torch.full((3,), 2.0)

    # Execute
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)

    # Assert
    assert torch.equal(trained.detach(), torch.zeros(3))
    assert torch.equal(frozen.detach(), torch.ones(2))
    assert torch.equal(trained.grad, torch.zeros(3)) and frozen.grad is None


def test_adam_stays_torch_and_an_empty_parameter_list_is_refused():
    # Execute / Assert
    assert isinstance(make_optimizer("adam", [nn.Parameter(torch.ones(1))], lr=0.1), torch.optim.Adam)
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)


def test_a_fresh_process_loads_and_trains_the_plain_digits_client_without_unneeded_imports(tmp_path):
    # Prepare: the run config a deployment's ClientApp process receives; a script
    # that answers one training message and lists the heavy modules it imported.
    script = f"""
import json, sys
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from clients import client_app
from fedpriv.experiment import experiment_from_run_config
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
run_config = json.loads(sys.stdin.read())
model = experiment_from_run_config(run_config).build_model()
content = RecordDict({{"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({{"server-round": 1}})}})
message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
context = Context(run_id=1, node_id=1, node_config={{"partition-id": 0, "num-partitions": 2}},
                  state=RecordDict(), run_config=run_config)
reply = client_app.train(message, context)
assert not reply.has_error(), reply.error
print(json.dumps([name for name in {list(NOT_NEEDED)!r} if name in sys.modules]))
"""
    run_config = flatten(compose_config(["num_clients=2", "client.local_epochs=1"]))

    def fresh_process() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(run_config),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), "FEDPRIV_CACHE": str(tmp_path / "cache")},
        )

    # Execute: the node's first message partitions the data (flwr-datasets) and caches it.
    first = fresh_process()
    later = fresh_process()

    # Assert
    assert first.returncode == 0, first.stderr[-3000:]
    assert later.returncode == 0, later.stderr[-3000:]
    assert json.loads(later.stdout.strip().splitlines()[-1]) == []
