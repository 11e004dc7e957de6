"""Tests for clients.opacus_training: record-level DP-SGD with Opacus."""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import pld_epsilon
from flwr.app import RecordDict
from torch import nn

from clients import opacus_training
from clients.opacus_training import (
    BOOKKEEPING,
    GRAD_SAMPLE_MODES,
    OpacusTraining,
    auto_grad_sample_mode,
    poisson_batches,
    poisson_loader,
)
from clients.privacy_state import STATE_KEY, PrivacyBudgetExhausted
from fedpriv.models import CNN28, CNN32, MLP, LogisticRegression

REPO = Path(__file__).resolve().parents[1]
N = 200
BATCH = 20  # about 10 steps per epoch (from the noisy size)
COUNT_Z = 10.0  # the default count_noise_multiplier
DIGITS = (1, 8, 8)
# docs/design.md, section 4: reported epsilon agrees with dp_accounting's PLD within 2%.
PLD_RTOL = 0.02


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread, as in the ClientApp (one simulated client per core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one thread."""
    with _one_thread():
        yield


def _data(n: int = N, shape=DIGITS, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=generator)
    return x, torch.randint(0, 10, (n,), generator=generator)


def _mlp() -> MLP:
    return MLP(input_shape=DIGITS, num_classes=10, hidden_sizes=(16,))


def _training(**overrides) -> OpacusTraining:
    settings = {"batch_size": BATCH, "noise_multiplier": 1.0, "lr": 0.1, **overrides}
    return OpacusTraining(**settings)


def _train_rounds(training, rounds, *, state, x, y, planned_rounds=1):
    """Call fit once per round in ``rounds`` with a fresh model, as the ClientApp does."""
    return [
        training.fit(_mlp(), x, y, seed=r, state=state, planned_rounds=planned_rounds)
        for r in rounds
    ]


def _stored(state: RecordDict) -> dict:
    return {
        key: list(value) if isinstance(value, list) else value
        for key, value in state[STATE_KEY].items()
    }


@pytest.fixture(scope="module")
def client_a():
    """Outcomes and state of a client that trained in rounds 1, 2 and 3."""
    x, y = _data()
    state = RecordDict()
    with _one_thread():
        outcomes = _train_rounds(_training(), [1, 2, 3], state=state, x=x, y=y)
    return outcomes, state


def test_epsilon_after_three_rounds_matches_pld_over_the_count_and_the_steps(client_a):
    # Prepare
    outcomes, state = client_a
    count = _stored(state)["noisy_count"]
    batches = math.ceil(count / BATCH)

    # Execute
    metrics = outcomes[-1].metrics

    # Assert: one count release, then three rounds of K Poisson steps at rate 1/K.
    expected = pld_epsilon([(COUNT_Z, 1.0, 1), (1.0, 1 / batches, 3 * batches)], delta=1e-5)
    assert metrics["epsilon"] == pytest.approx(expected, rel=PLD_RTOL)
    assert (metrics["sample_rate"], metrics["delta"], metrics["steps"]) == (1 / batches, 1e-5, 3 * batches)
    assert _stored(state)["steps"] == [1, 3 * batches]
    assert [o.metrics["steps"] for o in outcomes] == [batches, 2 * batches, 3 * batches]


def test_the_weight_is_the_noisy_size_and_no_loss_leaves(client_a):
    # Prepare
    outcomes, state = client_a

    # Execute
    weights = {o.num_examples for o in outcomes}

    # Assert
    assert weights == {_stored(state)["noisy_count"]}
    assert weights != {float(N)}
    assert all(o.loss is None for o in outcomes)


def test_epsilon_grows_with_each_round_and_depends_only_on_rounds_trained(client_a):
    # Prepare
    x, y = _data()
    eps_a = [o.metrics["epsilon"] for o in client_a[0]]

    # Execute: client B is not sampled in round 2.
    outcomes_b = _train_rounds(_training(), [1, 3], state=RecordDict(), x=x, y=y)
    eps_b = [o.metrics["epsilon"] for o in outcomes_b]

    # Assert
    assert eps_a[0] < eps_a[1] < eps_a[2]
    assert eps_b[1] == pytest.approx(eps_a[1], rel=1e-9)


def test_round_over_budget_is_declined_without_training_or_changing_state(client_a):
    # Prepare
    x, y = _data()
    one_round = client_a[0][0].metrics["epsilon"]
    training = _training(max_epsilon=one_round * 1.1)
    state = RecordDict()
    # Seed 1, as client A's first round: the same released size.
    _train_rounds(training, [1], state=state, x=x, y=y)
    before = _stored(state)
    model = _mlp()
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    # Execute
    with pytest.raises(PrivacyBudgetExhausted) as declined:
        training.fit(model, x, y, seed=1, state=state)

    # Assert
    assert _stored(state) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert declined.value.epsilon == pytest.approx(one_round, rel=1e-9)
    assert declined.value.projected_epsilon > training.max_epsilon
    assert declined.value.delta == 1e-5
    assert "client.max_epsilon" in str(declined.value)


def test_target_epsilon_is_solved_once_and_met_after_the_planned_rounds(caplog):
    # Prepare
    x, y = _data()
    training = _training(noise_multiplier=None, target_epsilon=3.0)
    state = RecordDict()

    # Execute
    with caplog.at_level(logging.INFO, logger="flwr"):
        outcomes = _train_rounds(training, range(3), state=state, x=x, y=y, planned_rounds=3)

    # Assert
    sigmas = {o.metrics["noise_multiplier"] for o in outcomes}
    assert len(sigmas) == 1
    assert _stored(state)["noise_multiplier"] == sigmas.pop()
    assert sum("solved for target_epsilon" in r.getMessage() for r in caplog.records) == 1
    assert 0.95 * 3.0 <= outcomes[-1].metrics["epsilon"] <= 3.0


def test_default_target_delta_is_below_one_over_the_noisy_size_and_logged_once(caplog):
    # Prepare
    small, large = _data(50), _data(20_000, shape=(1, 2, 2))
    training = _training(batch_size=5_000)
    state = RecordDict()

    # Execute
    with caplog.at_level(logging.INFO, logger="flwr"):
        small_delta = [
            training.fit(_mlp(), *small, seed=r, state=state).metrics["delta"] for r in range(2)
        ]
    large_model = MLP(input_shape=(1, 2, 2), num_classes=10, hidden_sizes=(4,))
    large_outcome = training.fit(large_model, *large, seed=0, state=RecordDict())

    # Assert
    assert small_delta == [1e-5, 1e-5]
    count = large_outcome.num_examples
    assert large_outcome.metrics["delta"] == pytest.approx(1 / (10 * count)) and count == pytest.approx(20_000, abs=100)
    assert sum("target_delta=1e-05" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (
            {"noise_multiplier": 1.0, "target_epsilon": 3.0},
            "client.noise_multiplier=1.0 and client.target_epsilon=3.0: set exactly one",
        ),
        (
            {"noise_multiplier": None},
            "client.noise_multiplier=None and client.target_epsilon=None: set exactly one",
        ),
        ({"accountant": "gdp"}, "client.accountant='gdp'"),
        ({"grad_sample_mode": "ghost_fsdp"}, "client.grad_sample_mode='ghost_fsdp'"),
        ({"target_delta": 1.5}, "client.target_delta=1.5"),
        ({"max_grad_norm": 0.0}, "client.max_grad_norm=0.0"),
        ({"max_epsilon": -1.0}, "client.max_epsilon=-1.0"),
        ({"batch_size": 0}, "client.batch_size=0"),
        ({"optimizer": "rmsprop"}, "client.optimizer='rmsprop'"),
        ({"count_noise_multiplier": 0.5}, "client.count_noise_multiplier=0.5: must be in [1, 1e+06]"),
    ],
)
def test_invalid_settings_raise_one_line_naming_the_key(settings, needle):
    # Execute
    with pytest.raises(ValueError) as error:
        _training(**settings)

    # Assert
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_target_delta_not_below_one_over_n_is_rejected_at_fit_with_the_count_accounted():
    # Prepare
    x, y = _data()
    training = _training(target_delta=0.05)
    state = RecordDict()

    # Execute
    rule = r"client.target_delta=0.05: must be < 1/n = .* for a client with n=\d+ examples"
    with pytest.raises(ValueError, match=rule):
        training.fit(_mlp(), x, y, seed=0, state=state)

    # Assert: the refusal depends on the released size, so its release is in the ledger.
    assert _stored(state)["steps"] == [1]
    assert _stored(state)["noise_multipliers"] == [COUNT_Z]


def test_model_with_batchnorm_is_rejected_naming_the_layer():
    # Prepare
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    x, y = _data()

    # Execute
    with pytest.raises(ValueError) as error:
        _training().fit(model, x, y, seed=0, state=RecordDict())

    # Assert
    assert "2 (BatchNorm1d)" in str(error.value)
    assert "\n" not in str(error.value)


def test_trained_model_keeps_plain_keys_changes_and_carries_no_opacus_residue():
    # Prepare
    x, y = _data()
    x_before, y_before = x.clone(), y.clone()
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flwr_level = logging.getLogger("flwr").level

    # Execute
    _training().fit(model, x, y, seed=0, state=RecordDict())

    # Assert
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert logging.getLogger("flwr").level == flwr_level
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    for module in model.modules():
        assert not (module._forward_hooks or module._backward_hooks)
        assert not hasattr(module, "autograd_grad_sample_hooks")
    for param in model.parameters():
        assert not {"grad_sample", "summed_grad", "_forward_counter"} & set(vars(param))
    # A second fit attaches Opacus to the same model again.
    _training().fit(model, x, y, seed=1, state=RecordDict())


def test_same_seed_gives_the_same_model():
    # Prepare
    x, y = _data()
    first, second = _mlp(), _mlp()
    second.load_state_dict(first.state_dict())

    # Execute
    for model in (first, second):
        _training().fit(model, x, y, seed=7, state=RecordDict())

    # Assert
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


MODE_MODELS = {
    "mlp": (lambda: MLP(input_shape=DIGITS, num_classes=10, hidden_sizes=(16,)), DIGITS, 30),
    "cnn28": (
        lambda: CNN28(input_shape=(1, 28, 28), num_classes=10, channels=(4, 8), groups=2),
        (1, 28, 28),
        12,
    ),
}
# One expected example per batch, so that some Poisson batches are empty.
MODE_SETTINGS = {"batch_size": 1, "lr": 0.05}


@pytest.fixture(scope="module")
def hooks_reference():
    """Per model name: initial and trained weights under grad_sample_mode=hooks."""
    references = {}
    for name, (build, shape, n) in MODE_MODELS.items():
        model = build()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        with _one_thread():
            _training(grad_sample_mode="hooks", **MODE_SETTINGS).fit(
                model, *_data(n, shape), seed=3, state=RecordDict()
            )
        references[name] = (initial, model.state_dict())
    return references


@pytest.mark.parametrize("mode", [m for m in GRAD_SAMPLE_MODES if m != "hooks"])
@pytest.mark.parametrize("name", MODE_MODELS)
def test_every_grad_sample_mode_trains_a_round_with_empty_batches_like_hooks(
    mode, name, hooks_reference, monkeypatch
):
    # Prepare
    build, shape, n = MODE_MODELS[name]
    initial, expected = hooks_reference[name]
    model = build()
    model.load_state_dict(initial)
    empty_batches = []
    stage = opacus_training._stage_empty_batch
    monkeypatch.setattr(
        opacus_training,
        "_stage_empty_batch",
        lambda optimizer, *, ghost: empty_batches.append(1) or stage(optimizer, ghost=ghost),
    )

    # Execute
    outcome = _training(grad_sample_mode=mode, **MODE_SETTINGS).fit(
        model, *_data(n, shape), seed=3, state=RecordDict()
    )

    # Assert
    assert empty_batches
    assert outcome.metrics["steps"] * outcome.metrics["sample_rate"] == pytest.approx(1.0)
    assert all(math.isfinite(float(v)) for v in outcome.metrics.values())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", MODE_MODELS)
def test_bookkeeping_trains_a_noiseless_round_with_empty_batches_like_opacus_hooks(name):
    # Prepare: no noise, so that only the batches, the clipping and the steps can differ
    build, shape, n = MODE_MODELS[name]
    models = {mode: build() for mode in ("hooks", BOOKKEEPING)}
    models[BOOKKEEPING].load_state_dict(models["hooks"].state_dict())
    x, y = _data(n, shape)
    settings = {**MODE_SETTINGS, "noise_multiplier": 0.0, "max_grad_norm": 0.05}

    # Execute
    outcomes = {
        mode: _training(grad_sample_mode=mode, **settings).fit(model, x, y, seed=3, state=RecordDict())
        for mode, model in models.items()
    }

    # Assert: K = n~ batches of expected size one, so some were empty; the same model and releases
    assert outcomes["hooks"].metrics["steps"] > n
    assert outcomes[BOOKKEEPING] == outcomes["hooks"]
    for key, value in models[BOOKKEEPING].state_dict().items():
        torch.testing.assert_close(value, models["hooks"].state_dict()[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: LogisticRegression(input_shape=(30,), num_classes=2), (30,)),
        (
            lambda: CNN32(input_shape=(3, 32, 32), num_classes=10, channels=(4, 8, 8), groups=2),
            (3, 32, 32),
        ),
    ],
    ids=["logreg", "cnn32"],
)
def test_default_mode_trains_the_other_models(build, shape):
    # Prepare
    x, y = _data(20, shape)

    # Execute
    outcome = OpacusTraining(noise_multiplier=1.0, batch_size=10).fit(
        build(), x, y % 2, seed=0, state=RecordDict()
    )

    # Assert
    assert outcome.metrics["steps"] == poisson_batches(count=outcome.num_examples, batch_size=10)


def test_importing_and_training_leave_logging_as_it_was():
    # Prepare: a fresh interpreter, where Opacus is not imported yet.
    script = textwrap.dedent(
        """
        import logging, sys, torch
        torch.set_num_threads(1)
        from flwr.app import RecordDict
        import clients.opacus_training as ot
        assert "opacus" not in sys.modules, "importing the module imported opacus"
        from fedpriv.models import MLP
        root, flwr_logger = logging.getLogger(), logging.getLogger("flwr")
        before = (list(root.handlers), flwr_logger.level, flwr_logger.propagate)
        training = ot.OpacusTraining(noise_multiplier=1.0)
        x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))
        training.fit(MLP(input_shape=(1, 8, 8), num_classes=10), x, y, seed=0, state=RecordDict())
        assert "opacus" in sys.modules
        assert (list(root.handlers), flwr_logger.level, flwr_logger.propagate) == before
        flwr_logger.debug("fedpriv-debug-marker")
        """
    )

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert "fedpriv-debug-marker" not in result.stderr + result.stdout


def test_unseeded_training_draws_fresh_noise_and_a_fresh_count_every_time():
    # Prepare
    x, y = _data()
    first, second = _mlp(), _mlp()
    second.load_state_dict(first.state_dict())

    # Execute
    outcomes = [_training().fit(model, x, y, seed=None, state=RecordDict()) for model in (first, second)]

    # Assert
    assert outcomes[0].num_examples != outcomes[1].num_examples
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert not any(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("batch_size", [1, 16, 64])
def test_every_size_from_1_to_400_gets_a_loader_whose_rate_opacus_accounts(batch_size):
    # Prepare
    generator = torch.Generator().manual_seed(0)
    mismatched = []

    # Execute
    for n in range(1, 401):
        batches = poisson_batches(count=float(n), batch_size=batch_size)
        loader = poisson_loader(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long), batches=batches, generator=generator)
        # Opacus' make_private accounts each step at 1 / len(loader).
        if not (len(loader) == batches and loader.batch_sampler.sample_rate == 1 / len(loader)):
            mismatched.append(n)

    # Assert
    assert mismatched == []


# Sizes whose batches per epoch K have int(1 / (1 / K)) == K - 1 in floating point:
# Opacus' own sampler drew one batch fewer than it accounted, so these never trained.
FLOAT_TRAP_SIZES = [93, 99, 105, 117, 123, 186, 198, 210, 211, 221, 227, 234, 243, 245, 246, 372, 391, 393, 396]


@pytest.mark.parametrize("n", FLOAT_TRAP_SIZES)
def test_sizes_whose_batch_count_floating_point_rounds_down_train(n, monkeypatch):
    # Prepare: batch size 1 and a released size of exactly n make K = n.
    monkeypatch.setattr(opacus_training, "noisy_count", lambda count, **_: float(count))
    x, y = torch.rand(n, 2), torch.randint(0, 2, (n,))

    # Execute
    outcome = _training(batch_size=1).fit(
        LogisticRegression(input_shape=(2,), num_classes=2), x, y, seed=0, state=RecordDict()
    )

    # Assert
    assert outcome.metrics["steps"] == n
    assert outcome.metrics["sample_rate"] == 1 / n


def test_gradients_are_averaged_over_the_public_expected_batch_size(monkeypatch):
    # Prepare: capture the divisor the optimizer uses.
    seen = []
    original = opacus_training._use_public_batch_size
    monkeypatch.setattr(
        opacus_training,
        "_use_public_batch_size",
        lambda optimizer, size: seen.append(size) or original(optimizer, size) or seen.append(optimizer.expected_batch_size),
    )
    x, y = _data()

    # Execute
    outcome = _training(grad_sample_mode="ew").fit(_mlp(), x, y, seed=0, state=RecordDict())

    # Assert: n~ / K, not Opacus' int(n / K) from the true size.
    expected = outcome.num_examples * outcome.metrics["sample_rate"]
    assert seen == [pytest.approx(expected), pytest.approx(expected)]


def test_bookkeeping_averages_over_the_public_expected_batch_size(monkeypatch):
    # Prepare: capture the divisor book-keeping is built with.
    from fedpriv.privacy import bookkeeping

    seen = []
    original = bookkeeping.BookKeepingDPSGD.__init__

    def init(self, model, **kwargs):
        seen.append(kwargs["expected_batch_size"])
        original(self, model, **kwargs)

    monkeypatch.setattr(bookkeeping.BookKeepingDPSGD, "__init__", init)
    x, y = _data()

    # Execute
    outcome = _training(grad_sample_mode="bookkeeping").fit(_mlp(), x, y, seed=0, state=RecordDict())

    # Assert: n~ / K, from the released size only.
    assert seen == [pytest.approx(outcome.num_examples * outcome.metrics["sample_rate"])]


@pytest.mark.parametrize(("batch_size", "largest"), [(1, 100), (16, 400), (64, 400)])
def test_every_dataset_size_up_to_400_trains(batch_size, largest):
    # Prepare: the RDP accountant keeps the fits cheap; sampling and the
    # consistency check between Opacus' record and the ledger are the same.
    # At batch size 1 a client takes about n steps, so sizes stop at 100
    # (5,000 steps in all instead of 80,000; past K = 100 nothing new happens).
    training = _training(batch_size=batch_size, accountant="rdp")
    failed = []

    # Execute
    for n in range(1, largest + 1):
        x, y = torch.rand(n, 2), torch.randint(0, 2, (n,))
        try:
            outcome = training.fit(
                LogisticRegression(input_shape=(2,), num_classes=2), x, y, seed=n, state=RecordDict()
            )
        except RuntimeError as error:
            failed.append((n, str(error)))
            continue
        if outcome.metrics["steps"] != round(1 / outcome.metrics["sample_rate"]):
            failed.append((n, outcome.metrics))

    # Assert
    assert failed == []


class _Scale(nn.Module):
    """A trainable per-feature scale: a layer PyTorch's expanded weights cannot handle."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


AUTO_MODELS = {
    "mlp": _mlp,
    "logreg": lambda: LogisticRegression(input_shape=DIGITS, num_classes=10),
    "cnn28": lambda: CNN28(input_shape=(1, 28, 28), num_classes=10, channels=(4, 8), groups=2),
    "cnn32": lambda: CNN32(input_shape=(3, 32, 32), num_classes=10, channels=(4, 8, 8), groups=2),
}


@pytest.mark.parametrize(
    ("device_type", "model", "expected"),
    [
        # CPU, measured here: book-keeping for every model it can train, at every batch size.
        ("cpu", "cnn28", {1: BOOKKEEPING, 64: BOOKKEEPING, 256: BOOKKEEPING, 1024: BOOKKEEPING, 10**6: BOOKKEEPING}),
        ("cpu", "cnn32", {1: BOOKKEEPING, 64: BOOKKEEPING, 1024: BOOKKEEPING}),
        ("cpu", "mlp", {1: BOOKKEEPING, 64: BOOKKEEPING, 256: BOOKKEEPING, 1024: BOOKKEEPING}),
        ("cpu", "logreg", {64: BOOKKEEPING, 1024: BOOKKEEPING}),
        # CUDA, the H200 figures for the CNN: ew up to 128, hooks above.
        ("cuda", "cnn28", {1: "ew", 64: "ew", 128: "ew", 129: "hooks", 256: "hooks", 1024: "hooks"}),
        ("cuda", "mlp", {64: "ew", 256: "hooks"}),
        # Any other device gets the CPU's choices.
        ("mps", "cnn28", {64: BOOKKEEPING}),
        ("mps", "mlp", {64: BOOKKEEPING}),
    ],
)
def test_auto_picks_the_grad_sample_mode_by_device_model_and_batch_size(device_type, model, expected):
    # Execute
    picked = {
        batch_size: auto_grad_sample_mode(device_type=device_type, batch_size=batch_size, model=AUTO_MODELS[model]())
        for batch_size in expected
    }

    # Assert
    assert picked == expected


def test_auto_never_picks_ew_for_a_layer_expanded_weights_cannot_handle():
    # Prepare: a model with a layer of its own, which ew refuses
    def build():
        return nn.Sequential(nn.Flatten(), _Scale(64), nn.Linear(64, 10))

    x, y = _data(40)
    with pytest.raises(RuntimeError, match="Expanded Weights"):
        _training(grad_sample_mode="ew").fit(build(), x, y, seed=0, state=RecordDict())

    # Execute
    picks = {
        auto_grad_sample_mode(device_type=device, batch_size=batch_size, model=build())
        for device in ("cpu", "cuda")
        for batch_size in (1, 64, 1024)
    }
    outcome = _training(grad_sample_mode="auto").fit(build(), x, y, seed=0, state=RecordDict())

    # Assert
    assert "ew" not in picks
    assert outcome.metrics["steps"] == poisson_batches(count=outcome.num_examples, batch_size=BATCH)


def test_grad_sample_mode_auto_trains_with_the_picked_mode(monkeypatch):
    # Prepare: record which implementation trains
    from opacus import PrivacyEngine

    from fedpriv.privacy import bookkeeping

    asked = []
    make_private = PrivacyEngine.make_private
    monkeypatch.setattr(
        PrivacyEngine,
        "make_private",
        lambda self, **kwargs: asked.append(kwargs["grad_sample_mode"]) or make_private(self, **kwargs),
    )
    init = bookkeeping.BookKeepingDPSGD.__init__
    monkeypatch.setattr(
        bookkeeping.BookKeepingDPSGD,
        "__init__",
        lambda self, model, **kwargs: asked.append(BOOKKEEPING) or init(self, model, **kwargs),
    )
    scale_model = nn.Sequential(nn.Flatten(), _Scale(64), nn.Linear(64, 10))

    # Execute
    _training(grad_sample_mode="auto", device="cpu").fit(_mlp(), *_data(), seed=0, state=RecordDict())
    _training(grad_sample_mode="auto", device="cpu").fit(scale_model, *_data(), seed=0, state=RecordDict())

    # Assert: book-keeping where it can train the model, Opacus' ghost clipping where not
    assert asked == [BOOKKEEPING, "ghost"]


