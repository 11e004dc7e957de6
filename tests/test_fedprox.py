"""FedProx on the clients: the proximal term's gradient, plain and inside Opacus' per-example clipping."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients import OpacusTraining, PlainTraining
from clients.opacus_training import add_proximal_per_example
from fedpriv.training import anchor_copies, proximal_gradients, train_epochs


def test_the_proximal_gradient_is_mu_times_the_distance_to_the_global_model():
    # Prepare: w = [1, 2], w_global = [0.5, 0.5], mu = 0.1
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, 0.5]]))
    anchors = anchor_copies(model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))

    # Execute
    (gradient,) = proximal_gradients(model, anchors, mu=0.1)

    # Assert: 0.1 * [0.5, 1.5]
    torch.testing.assert_close(gradient, torch.tensor([[0.05, 0.15]]))
    torch.testing.assert_close(anchors[0], torch.tensor([[0.5, 0.5]]))


def softmax_regression_gradient(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray):
    """The analytic gradient of the mean cross-entropy of ``softmax(x W^T + b)``."""
    logits = x @ weight.T + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    error = probabilities - np.eye(weight.shape[0])[y]
    return error.T @ x / len(y), error.mean(axis=0)


def test_plain_training_steps_along_the_analytic_fedprox_gradient():
    # Prepare: two full-batch SGD steps on softmax regression; the first starts at w_global (no pull yet)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    model = nn.Linear(3, 2)
    w0, b0 = (p.detach().numpy().astype(np.float64) for p in (model.weight, model.bias))
    lr, mu = 0.5, 0.3

    # Execute
    train_epochs(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=lr), epochs=2, batch_size=8,
                 generator=torch.Generator().manual_seed(0), proximal_mu=mu)

    # Assert: w1 = w0 - lr g(w0); w2 = w1 - lr (g(w1) + mu (w1 - w0))
    grad_w, grad_b = softmax_regression_gradient(w0, b0, x.numpy(), y.numpy())
    w1, b1 = w0 - lr * grad_w, b0 - lr * grad_b
    grad_w, grad_b = softmax_regression_gradient(w1, b1, x.numpy(), y.numpy())
    np.testing.assert_allclose(model.weight.detach().numpy(), w1 - lr * (grad_w + mu * (w1 - w0)), atol=1e-6)
    np.testing.assert_allclose(model.bias.detach().numpy(), b1 - lr * (grad_b + mu * (b1 - b0)), atol=1e-6)


def reference_fedprox_step(model, x, y, *, anchors, mu, optimizer) -> None:
    """One step of ``optimizer`` on autograd's gradient of ``loss + mu/2 ||w - anchors||^2``."""
    optimizer.zero_grad()
    proximal = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True))
    (nn.CrossEntropyLoss()(model(x), y) + mu / 2 * proximal).backward()
    optimizer.step()


def test_train_epochs_matches_autograd_on_the_fedprox_objective():
    # Prepare: several mini-batch steps with momentum, against autograd of loss + mu/2 ||w - w0||^2
    torch.manual_seed(1)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    ours = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    reference = copy.deepcopy(ours)
    anchors = [p.detach().clone() for p in reference.parameters()]
    mu = 0.5

    # Execute
    train_epochs(ours, x, y, optimizer=torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), epochs=2,
                 batch_size=7, generator=torch.Generator().manual_seed(3), proximal_mu=mu)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        order = torch.randperm(20, generator=generator)
        for start in range(0, 20, 7):
            batch = order[start : start + 7]
            reference_fedprox_step(reference, x[batch], y[batch], anchors=anchors, mu=mu, optimizer=optimizer)

    # Assert
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_larger_mu_keeps_the_local_model_closer_to_the_global_one():
    # Prepare
    torch.manual_seed(2)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    start = nn.Linear(6, 3)

    def drift(mu: float) -> float:
        model = copy.deepcopy(start)
        PlainTraining(local_epochs=5, lr=0.1, momentum=0.0, proximal_mu=mu).fit(model, x, y, seed=0)
        return sum(float(((p - q) ** 2).sum()) for p, q in zip(model.state_dict().values(), start.state_dict().values(), strict=True))

    # Execute / Assert
    assert drift(1.0) < drift(0.1) < drift(0.0)


def one_private_step(model, x, y, *, anchors, mu, max_grad_norm, mode):
    """One DP-SGD step (no noise) on the batch ``(x, y)``, averaged over its size; returns the per-example gradients."""
    from opacus import PrivacyEngine

    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    module, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode,
    )
    optimizer.expected_batch_size = len(y)
    optimizer.zero_grad()
    nn.CrossEntropyLoss()(module(x), y).backward()
    data_only = [p.grad_sample.detach().clone() for p in model.parameters()]
    add_proximal_per_example(model, anchors, mu=mu)
    optimizer.step()
    module.to_standard_module()
    return data_only


def far_anchors(model: nn.Module, *, seed: int) -> list[torch.Tensor]:
    """Anchors (a global model) a random distance away from ``model``."""
    generator = torch.Generator().manual_seed(seed)
    return [p.detach() + torch.randn(p.shape, generator=generator) for p in model.parameters()]


@pytest.mark.parametrize("mode", ["ew", "hooks", "functorch"])
def test_with_a_huge_clip_and_no_noise_the_private_step_is_the_plain_fedprox_step(mode):
    # Prepare
    torch.manual_seed(4)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    private = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    plain = copy.deepcopy(private)
    anchors, mu = far_anchors(private, seed=5), 0.7

    # Execute
    one_private_step(private, x, y, anchors=anchors, mu=mu, max_grad_norm=1e6, mode=mode)
    reference_fedprox_step(plain, x, y, anchors=anchors, mu=mu, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1))

    # Assert
    for a, b in zip(private.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_with_a_small_clip_the_proximal_term_is_clipped_with_each_examples_gradient():
    # Prepare: the global model is far away, so each example's gradient is mostly the proximal term
    torch.manual_seed(6)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    model = nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    anchors, mu, clip = far_anchors(model, seed=7), 2.0, 0.5

    # Execute
    data_only = one_private_step(model, x, y, anchors=anchors, mu=mu, max_grad_norm=clip, mode="ew")

    # Assert: the step is -lr * mean_i clip(g_i + mu (w - w_global)) with one norm over all parameters
    extras = [mu * (b - a) for b, a in zip(before, anchors, strict=True)]
    rows = [torch.cat([(g[i] + e).ravel() for g, e in zip(data_only, extras, strict=True)]) for i in range(len(y))]
    clipped = torch.stack([row * min(1.0, clip / float(row.norm())) for row in rows])
    assert all(float(row.norm()) > clip for row in rows)
    expected = torch.cat([b.ravel() for b in before]) - 0.1 * clipped.mean(dim=0)
    torch.testing.assert_close(torch.cat([p.detach().ravel() for p in model.parameters()]), expected, atol=1e-6, rtol=1e-5)
    # Unclipped, the proximal pull alone would have moved the model by 0.1 * mu * |w - w_global|
    assert float((expected - torch.cat([b.ravel() for b in before])).norm()) <= 0.1 * clip + 1e-6


def test_opacus_training_pulls_towards_the_global_model_and_reports_the_same_privacy():
    # Prepare
    torch.manual_seed(8)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    start = nn.Linear(6, 3)

    def fit(mu: float):
        model = copy.deepcopy(start)
        training = OpacusTraining(local_epochs=3, batch_size=16, lr=0.5, noise_multiplier=0.5, max_grad_norm=1.0,
                                  proximal_mu=mu, target_delta=1e-3)
        outcome = training.fit(model, x, y, seed=0, state=RecordDict())
        distance = sum(float(((p - q) ** 2).sum()) for p, q in zip(model.state_dict().values(), start.state_dict().values(), strict=True))
        return distance, outcome.metrics

    # Execute
    (free, free_metrics), (pulled, pulled_metrics) = fit(0.0), fit(5.0)

    # Assert: the same seed, the same releases, a model closer to the start
    assert pulled < free
    assert pulled_metrics == free_metrics


@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_modes_that_clip_norms_without_gradients_refuse_a_proximal_term(mode):
    with pytest.raises(ValueError, match=rf"^client.proximal_mu=0.1: grad_sample_mode='{mode}' clips"):
        OpacusTraining(noise_multiplier=1.0, grad_sample_mode=mode, proximal_mu=0.1)


def test_auto_does_not_pick_bookkeeping_with_a_proximal_term():
    # Prepare
    training = OpacusTraining(noise_multiplier=1.0, grad_sample_mode="auto", proximal_mu=0.1)
    model = nn.Sequential(nn.Linear(6, 3))

    # Execute
    picked = training.grad_sample_mode_for(model, device=torch.device("cpu"))
    without_mu = OpacusTraining(noise_multiplier=1.0).grad_sample_mode_for(model, device=torch.device("cpu"))

    # Assert
    assert (picked, without_mu) == ("ew", "bookkeeping")


@pytest.mark.parametrize("training", [PlainTraining, OpacusTraining])
def test_a_bad_proximal_mu_is_refused_naming_key_and_value(training):
    with pytest.raises(ValueError, match=r"^client.proximal_mu=-1.0: must be in \[0, 1000\]"):
        training(noise_multiplier=1.0, proximal_mu=-1.0) if training is OpacusTraining else training(proximal_mu=-1.0)
