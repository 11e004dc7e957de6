"""Tests for fedpriv.privacy.bookkeeping: DP-SGD gradients by book-keeping.

The reference is torch.func: per-example gradients by vmap over grad, clipped
with Opacus' factor and summed, an implementation that shares nothing with the
one under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from fedpriv.models import CNN28, CNN32, MLP, LogisticRegression, ScatterNet
from fedpriv.privacy.bookkeeping import (
    BookKeepingDPSGD,
    bookkeeping_unsupported,
    clip_factors,
    conv2d_per_example,
    group_norm_per_example,
)

MODELS = {
    "mlp": (lambda: MLP(input_shape=(1, 8, 8), num_classes=10, hidden_sizes=(16, 8)), (1, 8, 8)),
    "logreg": (lambda: LogisticRegression(input_shape=(6,), num_classes=3), (6,)),
    "cnn28": (lambda: CNN28(input_shape=(1, 28, 28), num_classes=10, channels=(4, 8), groups=2), (1, 28, 28)),
    "cnn32": (lambda: CNN32(input_shape=(3, 32, 32), num_classes=10, channels=(4, 8, 8), groups=2), (3, 32, 32)),
    # A fixed scattering transform (buffers, no parameters) under GroupNorm, a conv stage and a linear layer.
    "scatternet": (
        lambda: ScatterNet(input_shape=(2, 16, 16), num_classes=10, J=2, L=2, groups=3, channels=(4,), cnn_groups=2),
        (2, 16, 16),
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(shape, size: int, *, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(size, *shape, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def _reference(model: nn.Module, x, y, *, max_grad_norm: float, expected_batch_size: float) -> dict[str, torch.Tensor]:
    """sum_i clip(grad_i) / expected_batch_size by torch.func, for the trainable parameters."""
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}

    def loss(params, xi, yi):
        logits = functional_call(model, {**params, **frozen}, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(trainable, x, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per_example.values()]).sum(0).sqrt()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' DPOptimizer
    return {
        name: torch.einsum("b,b...->...", factors, g) / expected_batch_size for name, g in per_example.items()
    }


@settings(max_examples=50, deadline=None)
@given(
    norms=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=1, max_size=20),
    max_grad_norm=st.floats(min_value=1e-3, max_value=1e3),
    scale=st.floats(min_value=1e-4, max_value=1.0),
)
def test_clip_factors_bound_every_scaled_norm_by_the_clipping_norm(norms, max_grad_norm, scale):
    # Prepare
    norms = torch.tensor(norms, dtype=torch.float32)
    squared = norms.square()

    # Execute
    factors = clip_factors(squared, max_grad_norm=max_grad_norm, scale=scale)

    # Assert: at most scale, at most C / norm, equal to the larger of the two bounds' minimum
    assert torch.equal(squared, norms.square())  # the input is untouched
    assert bool((factors <= scale).all())
    assert bool((factors * norms <= max_grad_norm * scale * (1 + 1e-6)).all())
    expected = scale * torch.clamp(max_grad_norm / norms, max=1.0)
    torch.testing.assert_close(factors, expected, rtol=1e-6, atol=0.0)


def _engine(model, *, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0, seed=0):
    return BookKeepingDPSGD(
        model,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        generator=torch.Generator().manual_seed(seed),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(sorted(MODELS)),
    size=st.integers(min_value=1, max_value=9),
    max_grad_norm=st.floats(min_value=1e-3, max_value=10.0),
    scale=st.floats(min_value=0.1, max_value=30.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_the_gradient_is_the_clipped_sum_of_torch_func_per_example_gradients(name, size, max_grad_norm, scale, seed):
    # Prepare
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build()
    x, y = _batch(shape, size, seed=seed, scale=scale)
    expected = _reference(model, x, y, max_grad_norm=max_grad_norm, expected_batch_size=7.5)

    # Execute
    _engine(model, max_grad_norm=max_grad_norm, expected_batch_size=7.5).gradients(x, y)

    # Assert
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[param_name], rtol=1e-4, atol=1e-6)


def test_frozen_parameters_get_no_gradient_and_do_not_count_in_the_norms():
    # Prepare: freeze one bias, one GroupNorm weight and one whole convolution
    torch.manual_seed(3)
    model = CNN28(input_shape=(1, 28, 28), num_classes=10, channels=(4, 8), groups=2)
    model.classifier[1].bias.requires_grad_(False)
    model.features[0][1].weight.requires_grad_(False)
    model.features[1][0].requires_grad_(False)
    x, y = _batch((1, 28, 28), 5, seed=1)
    expected = _reference(model, x, y, max_grad_norm=0.05, expected_batch_size=5)

    # Execute
    _engine(model, max_grad_norm=0.05, expected_batch_size=5).gradients(x, y)

    # Assert
    assert {name for name, p in model.named_parameters() if p.grad is not None} == set(expected)
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[param_name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn28"])
def test_removing_one_example_moves_the_noiseless_sum_by_at_most_the_clipping_norm(name):
    # Prepare: the sensitivity DP-SGD's accounting assumes, with one example far out of range
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x, y = _batch(shape, 6, seed=2)
    x[3] *= 1e4
    clip, expected_batch_size = 0.5, 2.0

    def summed(xs, ys) -> torch.Tensor:
        local = copy.deepcopy(model)
        _engine(local, max_grad_norm=clip, expected_batch_size=expected_batch_size).gradients(xs, ys)
        return torch.cat([p.grad.ravel() for p in local.parameters()]) * expected_batch_size

    keep = torch.arange(6) != 3

    # Execute
    with_all, without = summed(x, y), summed(x[keep], y[keep])

    # Assert
    assert float((with_all - without).norm()) <= clip * (1 + 1e-5)
    assert float((with_all - without).norm()) > 0.9 * clip  # the outlier was clipped, not dropped


def test_the_noise_is_gaussian_with_std_z_c_over_the_expected_batch_size_on_top_of_the_clipped_sum():
    # Prepare: the same model and batch, with and without noise, the noise's seed known
    torch.manual_seed(0)
    model = MLP(input_shape=(1, 8, 8), num_classes=10, hidden_sizes=(128,))
    noiseless = copy.deepcopy(model)
    x, y = _batch((1, 8, 8), 32, seed=4)
    z, clip, expected_batch_size = 1.3, 0.7, 24.0

    # Execute
    _engine(model, max_grad_norm=clip, noise_multiplier=z, expected_batch_size=expected_batch_size, seed=9).gradients(x, y)
    _engine(noiseless, max_grad_norm=clip, expected_batch_size=expected_batch_size).gradients(x, y)

    # Assert: the difference is exactly the generator's draws at std z C / B
    noise = torch.cat([(p.grad - q.grad).ravel() for p, q in zip(model.parameters(), noiseless.parameters(), strict=True)])
    draws = torch.empty_like(noise).normal_(0.0, z * clip / expected_batch_size, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(noise, draws, rtol=0, atol=1e-6)
    assert float(noise.std()) == pytest.approx(z * clip / expected_batch_size, rel=0.04)  # 9,610 draws


def test_an_empty_batch_gives_the_noise_alone_and_no_noise_gives_zero():
    # Prepare
    model = MLP(input_shape=(1, 8, 8), num_classes=10)
    x, y = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)

    # Execute
    _engine(model, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=10.0).gradients(x, y)
    noise = torch.cat([p.grad.ravel() for p in model.parameters()])
    _engine(model, noise_multiplier=0.0).gradients(x, y)

    # Assert
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 10.0, rel=0.04)
    assert abs(float(noise.mean())) < 0.004
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_conv2d_per_example_gradients_match_autograd_one_example_at_a_time():
    # Prepare: stride, dilation, padding and a bias
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    a = torch.randn(4, 3, 9, 8)
    g = torch.randn_like(conv(a))

    # Execute
    per_example = conv2d_per_example(conv, a, g)

    # Assert
    for i in range(4):
        (expected,) = torch.autograd.grad(conv(a[i : i + 1]), conv.weight, g[i : i + 1])
        torch.testing.assert_close(per_example[i], expected.view(5, -1), rtol=1e-4, atol=1e-5)


def test_group_norm_per_example_gradients_match_autograd_even_for_a_large_mean():
    # Prepare: an input far from zero, where moments lose precision first
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 6)
    a = 5.0 + torch.randn(3, 6, 7, 7)
    g = torch.randn(3, 6, 7, 7)

    # Execute
    weight, bias = group_norm_per_example(norm, a, g)

    # Assert
    for i in range(3):
        expected = torch.autograd.grad(norm(a[i : i + 1]), (norm.weight, norm.bias), g[i : i + 1])
        torch.testing.assert_close(weight[i], expected[0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(bias[i], expected[1], rtol=1e-5, atol=1e-5)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(self.linear(x)))


class _Sequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(len(x), 2, 4)).mean(1)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_Twice(), "layer Linear ran more than once in one forward pass"),
        (_Sequence(), r"a Linear layer got input of shape \(3, 2, 4\)"),
    ],
)
def test_a_forward_pass_per_layer_norms_would_get_wrong_is_refused(model, message):
    # Prepare
    engine = _engine(model)
    x, y = torch.randn(3, 8)[:, : 4 if isinstance(model, _Twice) else 8], torch.zeros(3, dtype=torch.long)

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        engine.gradients(x, y)


def test_layers_it_cannot_train_are_named():
    # Prepare
    shared = nn.Linear(4, 4)
    tied = nn.Linear(4, 4)
    tied.weight = shared.weight
    model = nn.Sequential(
        nn.Embedding(10, 4), shared, tied, nn.Conv2d(2, 2, 3, groups=2), nn.BatchNorm1d(4, affine=False)
    )

    # Execute
    problems = bookkeeping_unsupported(model)

    # Assert
    assert problems == [
        "0 (Embedding): not a Linear, Conv2d or GroupNorm layer",
        "2 (Linear): shares a parameter with 1 (Linear)",
        "3 (Conv2d): only groups=1 and numeric zero padding are supported",
        "4 (BatchNorm1d): BatchNorm mixes the examples of a batch",
    ]
    with pytest.raises(ValueError, match=r"^grad_sample_mode=bookkeeping cannot train this model: 0 \(Embedding\)"):
        _engine(model)


@pytest.mark.parametrize(
    ("setting", "value"), [("max_grad_norm", 0.0), ("noise_multiplier", -1.0), ("expected_batch_size", 0.0)]
)
def test_a_bad_setting_is_refused_naming_it(setting, value):
    with pytest.raises(ValueError, match=rf"^{setting}={value!r}: must be"):
        _engine(nn.Linear(2, 2), **{setting: value})


def test_no_grad_forward_passes_are_not_kept_and_close_removes_the_hooks():
    # Prepare
    model = MLP(input_shape=(1, 8, 8), num_classes=10)
    engine = _engine(model)

    # Execute
    with torch.no_grad():
        model(torch.randn(5, 1, 8, 8))
    kept = list(engine._calls)
    engine.close()

    # Assert
    assert kept == []
    assert all(not module._forward_hooks for module in model.modules())
