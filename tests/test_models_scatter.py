"""The scattering transform and ScatterNet: fixed filters, shapes, a direct computation, DP training."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.validators import ModuleValidator
from torch.nn import functional as F

from clients.opacus_training import BOOKKEEPING, OpacusTraining, auto_grad_sample_mode
from fedpriv.models import ScatterNet, Scattering2D, gaussian_2d, morlet_2d
from fedpriv.privacy.bookkeeping import bookkeeping_unsupported

MNIST = (1, 28, 28)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scattering() -> Scattering2D:
    return Scattering2D(side=28, J=2, L=8)


def _images(n: int, shape=MNIST, *, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("shape", "kwargs", "expected"),
    [
        (MNIST, {}, (81, 7, 7)),  # Kymatio's Scattering2D(J=2, L=8) on 28x28: 81 maps of 7x7
        (MNIST, {"max_order": 1}, (17, 7, 7)),
        (MNIST, {"L": 4}, (1 + 8 + 16, 7, 7)),
        ((3, 32, 32), {}, (3 * 81, 8, 8)),
        ((1, 32, 32), {"J": 3, "L": 2}, (1 + 6 + 4 * 3, 4, 4)),
    ],
)
def test_the_transform_gives_the_scattering_maps_at_one_over_two_to_the_j_resolution(shape, kwargs, expected):
    # Prepare
    transform = Scattering2D(side=shape[1], **kwargs)

    # Execute
    features = transform(_images(3, shape))

    # Assert
    assert features.shape == (3, *expected)
    assert transform.maps_per_channel * shape[0] == expected[0]
    assert torch.isfinite(features).all()


def test_the_filters_are_built_without_data_are_not_parameters_and_stay_out_of_the_state_dict():
    # Prepare
    model = ScatterNet(input_shape=MNIST, num_classes=10)
    other = ScatterNet(input_shape=MNIST, num_classes=10)

    # Execute
    buffers = dict(model.scattering.named_buffers())

    # Assert: buffers only, identical in two fresh models, never sent or averaged
    assert list(model.scattering.parameters()) == []
    assert buffers and not any(b.requires_grad for b in buffers.values())
    assert all(torch.equal(b, dict(other.scattering.named_buffers())[k]) for k, b in buffers.items())
    assert not any(key.startswith("scattering") for key in model.state_dict())
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_training_leaves_the_filters_as_they_were_and_the_transform_is_deterministic():
    # Prepare
    model = ScatterNet(input_shape=MNIST, num_classes=10)
    before = {k: b.clone() for k, b in model.scattering.named_buffers()}
    x, y = _images(24), torch.arange(24) % 10
    features = model.scattering(x)

    # Execute
    OpacusTraining(noise_multiplier=1.0, batch_size=8, lr=1.0, max_grad_norm=0.1).fit(
        model, x, y, seed=0, state=RecordDict()
    )

    # Assert
    assert all(torch.equal(b, before[k]) for k, b in model.scattering.named_buffers())
    assert torch.equal(model.scattering(x), features)


def test_each_example_is_transformed_alone_whatever_the_batch_and_chunks():
    # Prepare: per-example gradients need each example's features to depend on it alone
    x = _images(7, seed=1)
    chunked = Scattering2D(side=28, chunk=3)

    # Execute
    batch = chunked(x)
    alone = torch.cat([chunked(x[i : i + 1]) for i in range(len(x))])

    # Assert
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    assert chunked(x[:0]).shape == (0, 81, 7, 7)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(min_value=1e-2, max_value=1e2), seed=st.integers(min_value=0, max_value=2**16))
def test_every_scattering_map_is_positively_homogeneous(scale, seed):
    # Prepare: convolutions, moduli and the low-pass are all homogeneous of degree 1
    transform = Scattering2D(side=28, J=2, L=8)
    x = torch.randn(2, *MNIST, generator=torch.Generator().manual_seed(seed))

    # Execute
    scaled, plain = transform(scale * x), transform(x)

    # Assert
    torch.testing.assert_close(scaled, scale * plain, rtol=1e-4, atol=1e-5 * scale)


@settings(max_examples=20, deadline=None)
@given(
    j=st.integers(min_value=0, max_value=2),
    theta=st.floats(min_value=0.0, max_value=math.pi),
    slant=st.floats(min_value=0.25, max_value=1.0),
)
def test_a_morlet_wavelet_has_zero_mean_and_peaks_at_its_frequency(j, theta, slant):
    # Prepare
    size, xi = 64, 3 * math.pi / 4 / 2**j

    # Execute
    psi = morlet_2d(size, sigma=0.8 * 2**j, theta=theta, xi=xi, slant=slant)
    spectrum = torch.fft.fft2(psi).abs()

    # Assert: no response to a constant image; the spectrum's peak is near xi (cos, sin) theta
    assert abs(complex(psi.sum())) < 1e-12
    peak = divmod(int(spectrum.argmax()), size)
    frequencies = torch.fft.fftfreq(size) * 2 * math.pi
    found = torch.tensor([frequencies[peak[0]], frequencies[peak[1]]])
    wanted = xi * torch.tensor([math.cos(theta), math.sin(theta)])
    wrapped = (found - wanted + math.pi) % (2 * math.pi) - math.pi
    assert float(wrapped.norm()) <= 2 * math.pi / size * 1.5 + xi * 0.35


def _circular(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(image * kernel)(u) = sum_v image(u - v) kernel(v) on the periodic grid, by a spatial sum."""
    n = image.shape[-1]
    # conv2d correlates: flip the kernel (index -v mod n), centre it, pad the image circularly.
    flipped = torch.roll(torch.flip(kernel, (0, 1)), shifts=(1, 1), dims=(0, 1))
    centred = torch.roll(flipped, shifts=(n // 2, n // 2), dims=(0, 1))
    padded = F.pad(image[None, None], (n // 2, n - n // 2 - 1) * 2, mode="circular")
    return F.conv2d(padded, centred[None, None])[0, 0]


def _direct(image: torch.Tensor, *, J: int = 2, L: int = 8) -> torch.Tensor:
    """All scattering maps of one 28x28 image at full resolution, by spatial sums in float64, then subsampled."""
    pad, side = 2**J, image.shape[-1]
    x = F.pad(image[None, None].double(), (pad,) * 4, mode="reflect")[0, 0]
    n = x.shape[-1]
    phi = gaussian_2d(n, sigma=0.8 * 2**J)

    def conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        if kernel.is_complex():
            return torch.complex(_circular(u, kernel.real), _circular(u, kernel.imag))
        return _circular(u, kernel)

    def wavelet(j: int, l: int) -> torch.Tensor:
        return morlet_2d(n, sigma=0.8 * 2**j, theta=math.pi * l / L, xi=3 * math.pi / 4 / 2**j, slant=4 / L)

    def out(u: torch.Tensor) -> torch.Tensor:
        low = conv(u, phi)[:: 2**J, :: 2**J]
        return low[1 : 1 + side // 2**J, 1 : 1 + side // 2**J]

    maps = [out(x)]
    first = {(j, l): conv(x, wavelet(j, l)).abs() for j in range(J) for l in range(L)}
    maps += [out(first[j, l]) for j in range(J) for l in range(L)]
    for j1 in range(J):
        for j2 in range(j1 + 1, J):
            maps += [out(conv(first[j1, l1], wavelet(j2, l2)).abs()) for l1 in range(L) for l2 in range(L)]
    return torch.stack(maps)


def test_the_transform_matches_a_direct_spatial_computation(scattering):
    # Prepare: a digit-like image (a bright stroke) and the textbook definition at full resolution
    image = torch.zeros(28, 28)
    image[6:22, 12:15] = 1.0
    image[6:9, 9:15] = 1.0
    expected = _direct(image)

    # Execute
    features = scattering(image[None, None])[0].double()

    # Assert: order 0 and the finest first-order maps are exact (no intermediate subsampling);
    # the maps kept at half resolution before their low-pass differ by that resampling only
    torch.testing.assert_close(features[:9], expected[:9], rtol=1e-4, atol=1e-6)
    relative = (features - expected).norm(dim=(1, 2)) / expected.norm(dim=(1, 2))
    assert float(relative.max()) < 0.05
    assert float((features - expected).norm() / expected.norm()) < 0.01


def test_scatternet_gives_logits_opacus_accepts_it_and_book_keeping_trains_it():
    # Prepare
    linear = ScatterNet(input_shape=MNIST, num_classes=10)
    cnn = ScatterNet(input_shape=MNIST, num_classes=10, channels=[8], cnn_groups=2, activation="tanh")

    # Execute
    logits = [model(_images(5)) for model in (linear, cnn)]

    # Assert
    assert [tuple(t.shape) for t in logits] == [(5, 10), (5, 10)]
    for model in (linear, cnn):
        assert ModuleValidator.validate(model, strict=False) == []
        assert bookkeeping_unsupported(model) == []
        assert auto_grad_sample_mode(device_type="cpu", batch_size=420, model=model) == BOOKKEEPING


@pytest.mark.parametrize("channels", [[], [8]])
def test_the_dp_client_trains_scatternet_with_book_keeping_like_opacus_hooks(channels):
    # Prepare: no noise, so that only the per-example clipping could differ
    models = {mode: ScatterNet(input_shape=MNIST, num_classes=10, channels=channels, cnn_groups=2) for mode in ("hooks", BOOKKEEPING)}
    models[BOOKKEEPING].load_state_dict(models["hooks"].state_dict())
    initial = {k: v.clone() for k, v in models["hooks"].state_dict().items()}
    x, y = _images(30, seed=2), torch.arange(30) % 10
    settings = {"batch_size": 10, "lr": 2.0, "noise_multiplier": 0.0, "max_grad_norm": 0.05}

    # Execute
    outcomes = {
        mode: OpacusTraining(grad_sample_mode=mode, **settings).fit(model, x, y, seed=3, state=RecordDict())
        for mode, model in models.items()
    }

    # Assert
    assert outcomes[BOOKKEEPING] == outcomes["hooks"]
    trained = models[BOOKKEEPING].state_dict()
    assert all(not torch.equal(trained[k], initial[k]) for k in ("classifier.1.weight", "norm.weight"))
    for key, value in trained.items():
        torch.testing.assert_close(value, models["hooks"].state_dict()[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ScatterNet(input_shape=(1, 30, 30), num_classes=10), r"model.J=2: the image side 30 must be a multiple of 2\^J = 4"),
        (lambda: ScatterNet(input_shape=(1, 28, 28), num_classes=10, groups=10), r"model.groups=10: must divide the 81"),
        (lambda: ScatterNet(input_shape=(1, 28, 32), num_classes=10), r"model=scatternet: expects square images"),
        (lambda: ScatterNet(input_shape=(1, 28, 28), num_classes=10, max_order=3), r"model.max_order=3"),
        (lambda: ScatterNet(input_shape=(1, 28, 28), num_classes=10, J=0), r"model.J=0"),
    ],
)
def test_bad_scatternet_settings_name_the_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_the_cache_gives_the_transform_of_each_example_and_keeps_at_most_cache_size():
    # Prepare
    from fedpriv import models

    models._SCATTERING_CACHE.clear()
    plain, cached = Scattering2D(side=28), Scattering2D(side=28, cache_size=10)
    x = _images(8, seed=4)

    # Execute: a first pass fills the cache, a second one (shuffled, with new examples) reads it
    first = cached(x)
    mixed = torch.cat([x[[5, 1, 7]], _images(4, seed=5)])
    second = cached(mixed)

    # Assert
    torch.testing.assert_close(first, plain(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, plain(mixed), rtol=1e-5, atol=1e-6)
    assert torch.equal(second[:3], first[[5, 1, 7]])
    assert sum(len(entries) for entries in models._SCATTERING_CACHE.values()) == 10
    models._SCATTERING_CACHE.clear()
