"""Device selection (fedpriv.devices) and training and evaluation on a device.

The CPU path runs everywhere; the GPU tests need a CUDA GPU and skip without one.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from flwr.app import RecordDict

from clients.opacus_training import OpacusTraining
from clients.plain import PlainTraining
from conftest import REPO, run_project_script
from fedpriv import devices
from fedpriv.compose import compose_config
from fedpriv.devices import (
    ASSIGNED_GPUS_ENV,
    assigned_gpus,
    client_device,
    ray_assigned_gpus,
    resolve_device,
    server_device,
)
from fedpriv.experiment import check_runnable, load_experiment
from fedpriv.metrics import evaluation_metrics
from fedpriv.models import MLP
from fedpriv.run_config import ConfigError
from fedpriv.simulation import SimulationMode
from fedpriv.training import make_optimizer, train_epochs

NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is false)"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
SHAPE = (1, 8, 8)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _data(n: int = 120, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(input_shape=SHAPE, num_classes=10, hidden_sizes=(16,))


@pytest.mark.parametrize(
    ("setting", "cuda_available", "assigned", "expected"),
    [
        ("cpu", True, (0,), CPU),
        ("auto", False, (), CPU),
        ("auto", False, (0,), CPU),
        ("auto", True, (), CPU),
        ("auto", True, (3,), CUDA),
        ("cuda", True, (), CUDA),
        ("cuda", True, (0,), CUDA),
    ],
)
def test_resolve_device_follows_the_setting_and_the_assigned_gpus(setting, cuda_available, assigned, expected):
    # Execute
    device = resolve_device(setting, key="client.device", cuda_available=cuda_available, assigned_gpus=assigned)

    # Assert
    assert device == expected


def test_cuda_without_a_gpu_is_refused_naming_the_key_and_value():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"^server_device='cuda': no CUDA GPU is available here"):
        resolve_device("cuda", key="server_device", cuda_available=False, assigned_gpus=(0,))


def test_ray_assigned_gpus_are_read_from_a_running_ray_worker_only(monkeypatch):
    # Prepare: a Ray that has assigned GPU 1 to this process, then one not initialised
    assigned = types.SimpleNamespace(is_initialized=lambda: True, get_gpu_ids=lambda: [1])
    idle = types.SimpleNamespace(is_initialized=lambda: False, get_gpu_ids=lambda: pytest.fail("not a worker"))

    # Execute
    monkeypatch.setitem(sys.modules, "ray", assigned)
    in_worker = ray_assigned_gpus()
    monkeypatch.setitem(sys.modules, "ray", idle)
    outside = ray_assigned_gpus()
    monkeypatch.delitem(sys.modules, "ray")
    without_ray = ray_assigned_gpus()

    # Assert
    assert (in_worker, outside, without_ray) == ((1,), (), ())


def test_a_process_backend_worker_finds_its_gpus_in_the_environment_and_auto_uses_them(monkeypatch):
    # Prepare: no Ray here, a machine with a GPU
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: True)

    # Execute
    monkeypatch.setenv(ASSIGNED_GPUS_ENV, "2,3")
    given, on_gpu = assigned_gpus(), client_device("auto")
    monkeypatch.setenv(ASSIGNED_GPUS_ENV, "")
    none, on_cpu = assigned_gpus(), client_device("auto")

    # Assert
    assert (given, none) == ((2, 3), ())
    assert (on_gpu, on_cpu) == (CUDA, CPU)


def test_auto_uses_the_gpu_ray_assigned_to_the_client(monkeypatch):
    # Prepare: a machine with a GPU, once assigned to this client and once not
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: True)

    # Execute
    monkeypatch.setattr(devices, "ray_assigned_gpus", lambda: (0,))
    assigned = client_device("auto")
    monkeypatch.setattr(devices, "ray_assigned_gpus", lambda: ())
    unassigned = client_device("auto")

    # Assert
    assert (assigned, unassigned) == (CUDA, CPU)


def test_auto_and_cpu_stay_on_the_cpu_without_a_gpu(monkeypatch):
    # Prepare
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)

    # Execute / Assert
    assert client_device("auto") == client_device("cpu") == server_device("auto") == CPU


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_plain_training_on_the_cpu_is_bit_identical_to_training_without_a_device(device, monkeypatch):
    # Prepare: what plain training did before devices existed, step for step
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    x, y = _data()
    training = PlainTraining(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9, device=device)
    reference = _mlp()
    expected_loss = train_epochs(
        reference,
        x,
        y,
        optimizer=make_optimizer("sgd", reference.parameters(), lr=0.1, momentum=0.9),
        epochs=2,
        batch_size=16,
        generator=torch.Generator().manual_seed(7),
    )
    model = _mlp()

    # Execute
    outcome = training.fit(model, x, y, seed=7)

    # Assert
    assert outcome.loss == expected_loss
    for name, value in model.state_dict().items():
        assert value.device == CPU
        assert torch.equal(value, reference.state_dict()[name])


def test_opacus_training_on_cpu_and_auto_without_a_gpu_is_bit_identical(monkeypatch):
    # Prepare
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    x, y = _data()
    models = {device: _mlp() for device in ("cpu", "auto")}

    # Execute
    outcomes = {
        device: OpacusTraining(batch_size=20, noise_multiplier=1.0, lr=0.1, device=device).fit(
            model, x, y, seed=3, state=RecordDict()
        )
        for device, model in models.items()
    }

    # Assert
    assert outcomes["cpu"] == outcomes["auto"]
    for name, value in models["cpu"].state_dict().items():
        assert torch.equal(value, models["auto"].state_dict()[name])


def test_a_node_asked_for_cuda_without_a_gpu_fails_before_touching_its_ledger(monkeypatch):
    # Prepare
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    state = RecordDict()

    # Execute / Assert
    with pytest.raises(ValueError, match=r"^client.device='cuda'"):
        OpacusTraining(noise_multiplier=1.0, device="cuda").fit(_mlp(), *_data(), seed=0, state=state)
    assert len(state) == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["client.device=tpu"], "client.device='tpu': must be one of ['auto', 'cpu', 'cuda']"),
        (["client=opacus", "client.device=gpu"], "client.device='gpu'"),
        (["client=local_dp", "client.device=0"], "client.device=0"),
        (["server_device=gpu"], "server_device='gpu'"),
    ],
)
def test_bad_device_settings_are_refused_naming_key_and_value(overrides, message):
    # Execute / Assert
    with pytest.raises(ConfigError) as refused:
        load_experiment(compose_config(overrides))
    assert message in str(refused.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_cuda_on_a_machine_without_a_gpu_is_refused_before_a_simulation_starts():
    # Prepare
    clients_on_cuda = load_experiment(compose_config(["client.device=cuda"]))
    server_on_cuda = load_experiment(compose_config(["server_device=cuda"]))

    # Execute
    result = run_project_script("run.py", "client.device=cuda", cwd=REPO, timeout=120)

    # Assert: one line, exit 2; on a Ray cluster the clients' GPUs are the cluster's
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "config error: client.device='cuda': no CUDA GPU is available here (torch.cuda.is_available() is false)"
    ], result.stderr
    with pytest.raises(ConfigError, match=r"^server_device='cuda'"):
        check_runnable(server_on_cuda, mode=SimulationMode())
    check_runnable(clients_on_cuda, mode=SimulationMode(backend="ray", ray_address="127.0.0.1:6379"))


@needs_gpu
def test_plain_training_on_cuda_matches_the_cpu_and_returns_a_cpu_model():
    # Prepare: the same batches on both devices (the shuffling stays on the CPU)
    x, y = _data()
    models = {"cpu": _mlp(), "cuda": _mlp()}

    # Execute
    losses = {
        device: PlainTraining(local_epochs=2, batch_size=16, lr=0.1, device=device).fit(model, x, y, seed=7).loss
        for device, model in models.items()
    }

    # Assert
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)
    for name, value in models["cuda"].state_dict().items():
        assert value.device == CPU
        torch.testing.assert_close(value, models["cpu"].state_dict()[name], rtol=1e-4, atol=1e-5)


@needs_gpu
def test_opacus_noise_on_cuda_has_the_cpu_noise_distribution():
    # Prepare: one batch (K = 1) holding every example, and noise so large next to
    # the clipped gradients (norm at most 200 C against 50 C sqrt(1,210)) that the
    # update is the Gaussian noise: std lr * z * C / n~ per coordinate.
    x, y = _data(200)
    settings = {"batch_size": 10_000, "lr": 1.0, "momentum": 0.0, "noise_multiplier": 50.0, "max_grad_norm": 1e-3}
    updates = {}
    for device in ("cpu", "cuda"):
        model, start = _mlp(), _mlp()
        outcome = OpacusTraining(**settings, device=device).fit(model, x, y, seed=None, state=RecordDict())
        update = torch.cat([(model.state_dict()[k] - v).flatten() for k, v in start.state_dict().items()])
        updates[device] = (update, 50.0 * 1e-3 / outcome.num_examples)

    # Assert: 1,210 coordinates put each empirical std within 10% of its expected value
    for device, (update, std) in updates.items():
        assert update.device == CPU
        assert abs(update.mean().item()) < 0.1 * std, device
        assert update.std().item() == pytest.approx(std, rel=0.1), device


@needs_gpu
def test_bookkeeping_on_cuda_trains_a_noiseless_round_like_the_cpu():
    # Prepare: the Poisson batches stay on the CPU, so both devices see the same ones
    x, y = _data()
    settings = {"batch_size": 16, "lr": 0.1, "noise_multiplier": 0.0, "max_grad_norm": 0.1, "grad_sample_mode": "bookkeeping"}
    models = {"cpu": _mlp(), "cuda": _mlp()}
    models["cuda"].load_state_dict(models["cpu"].state_dict())

    # Execute
    for device, model in models.items():
        OpacusTraining(**settings, device=device).fit(model, x, y, seed=5, state=RecordDict())

    # Assert
    for name, value in models["cuda"].state_dict().items():
        assert value.device == CPU
        torch.testing.assert_close(value, models["cpu"].state_dict()[name], rtol=1e-4, atol=1e-5)


@needs_gpu
def test_evaluation_on_cuda_matches_the_cpu():
    # Prepare
    model, (x, y) = _mlp(), _data()

    # Execute
    on_cpu = evaluation_metrics(model, x, y, num_classes=10)
    on_cuda = evaluation_metrics(model.to(CUDA), x.to(CUDA), y.to(CUDA), num_classes=10)

    # Assert
    assert on_cuda["test_accuracy"] == on_cpu["test_accuracy"]
    assert on_cuda["test_loss"] == pytest.approx(on_cpu["test_loss"], rel=1e-5)
