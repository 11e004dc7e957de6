"""Models that Opacus accepts as they are: no BatchNorm, GroupNorm where needed.

Each class is the ``_target_`` of a ``conf/model/*.yaml`` node with
``_partial_: true``: the config fixes the hyperparameters, and the app supplies
``input_shape`` and ``num_classes`` from the dataset when it builds the model.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedpriv.checks import check_choice, check_int


MAX_WIDTH = 1 << 16  # units or channels of one layer


def _check_positive_ints(key: str, values: Sequence[int]) -> tuple[int, ...]:
    rule = f"must be a non-empty list of integers in [1, {MAX_WIDTH}]"
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"model.{key}={values!r}: {rule}")
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WIDTH for v in values):
        raise ValueError(f"model.{key}={list(values)}: {rule}")
    return values


def _check_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")


def _check_image_shape(model: str, input_shape: Sequence[int], *, side: int) -> int:
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[1:] != (side, side):
        raise ValueError(
            f"model={model}: expects images of shape (channels, {side}, {side}); "
            f"the dataset gives {shape}"
        )
    return shape[0]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression over the flattened input.

    Parameters
    ----------
    input_shape : Sequence[int]
        Shape of one example (flattened internally).
    num_classes : int
        Number of output classes.
    """

    def __init__(self, *, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        _check_classes(num_classes)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.linear(self.flatten(x))


class MLP(nn.Module):
    """Fully connected network with ReLU activations over the flattened input.

    Parameters
    ----------
    input_shape : Sequence[int]
        Shape of one example (flattened internally).
    num_classes : int
        Number of output classes.
    hidden_sizes : Sequence[int]
        Width of each hidden layer.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (128,),
    ) -> None:
        super().__init__()
        _check_classes(num_classes)
        widths = (math.prod(input_shape), *_check_positive_ints("hidden_sizes", hidden_sizes))
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.net(x)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
"""The CNNs' ``activation`` choices. ``tanh`` is the tempered sigmoid that Papernot et
al. 2021 ("Tempered sigmoid activations for deep learning with differential privacy")
found better under DP-SGD: its bounded outputs keep gradients from exploding before
clipping."""


def _conv_block(in_channels: int, out_channels: int, *, groups: int, activation: str, pool: bool = True) -> nn.Sequential:
    # GroupNorm instead of BatchNorm: per-example gradients stay independent (Opacus).
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(min(groups, out_channels), out_channels),
        ACTIVATIONS[activation](),
        *([nn.MaxPool2d(2)] if pool else []),
    )


class _ImageCNN(nn.Module):
    side: int = 0
    name: str = ""

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        groups: int,
        activation: str,
    ) -> None:
        super().__init__()
        _check_classes(num_classes)
        check_choice("model.activation", activation, tuple(ACTIVATIONS))
        in_channels = _check_image_shape(self.name, input_shape, side=self.side)
        widths = (in_channels, *_check_positive_ints("channels", channels))
        if self.side % (2 ** (len(widths) - 1)):
            raise ValueError(f"model.channels={list(channels)}: too many pooling stages for {self.side}x{self.side} inputs")
        check_int("model.groups", groups, minimum=1, maximum=MAX_WIDTH)
        self.features = nn.Sequential(
            *(
                _conv_block(c_in, c_out, groups=groups, activation=activation)
                for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
            )
        )
        final_side = self.side // 2 ** (len(widths) - 1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(widths[-1] * final_side * final_side, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.classifier(self.features(x))


class CNN28(_ImageCNN):
    """Small CNN for 28x28 images (MNIST, Fashion-MNIST).

    Parameters
    ----------
    input_shape : Sequence[int]
        ``(channels, 28, 28)``.
    num_classes : int
        Number of output classes.
    channels : Sequence[int]
        Output channels of each conv/GroupNorm/activation/max-pool stage.
    groups : int
        GroupNorm groups per stage.
    activation : str
        ``relu`` or ``tanh`` (see :data:`ACTIVATIONS`).
    """

    side = 28
    name = "cnn28"

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        groups: int = 4,
        activation: str = "relu",
    ) -> None:
        super().__init__(
            input_shape=input_shape, num_classes=num_classes, channels=channels, groups=groups, activation=activation
        )


class CNN32(_ImageCNN):
    """CNN for 32x32 colour images (CIFAR-10).

    Parameters
    ----------
    input_shape : Sequence[int]
        ``(channels, 32, 32)``.
    num_classes : int
        Number of output classes.
    channels : Sequence[int]
        Output channels of each conv/GroupNorm/activation/max-pool stage.
    groups : int
        GroupNorm groups per stage.
    activation : str
        ``relu`` or ``tanh`` (see :data:`ACTIVATIONS`).
    """

    side = 32
    name = "cnn32"

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        groups: int = 8,
        activation: str = "relu",
    ) -> None:
        super().__init__(
            input_shape=input_shape, num_classes=num_classes, channels=channels, groups=groups, activation=activation
        )


def morlet_2d(size: int, *, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """A Morlet wavelet sampled on a ``size x size`` periodic grid, centred at index ``(0, 0)``.

    ``psi(u) = c (exp(i xi <u, e_theta>) - k) exp(-(u1'^2 + slant^2 u2'^2) / (2 sigma^2))``
    with ``u' = R(-theta) u``: a plane wave of frequency ``xi`` along ``e_theta``
    under a Gaussian envelope stretched by ``1 / slant`` across it. ``k``
    makes the wavelet's sum zero (no response to a constant image), and ``c =
    slant / (2 pi sigma^2)`` makes the envelope's integral one. The grid is
    periodic: the samples of neighbouring periods are added (the envelopes of
    the sizes used here are negligible two periods away).

    Parameters
    ----------
    size : int
        Grid side (the padded image's).
    sigma : float
        Envelope width, in pixels.
    theta : float
        Orientation, in radians.
    xi : float
        Centre frequency, in radians per pixel.
    slant : float
        Envelope aspect ratio, ``> 0`` (below 1: elongated across ``e_theta``).

    Returns
    -------
    torch.Tensor
        Complex, ``(size, size)``, float64.
    """
    offsets = torch.arange(size, dtype=torch.float64)
    offsets = torch.where(offsets >= (size + 1) // 2, offsets - size, offsets)
    gabor = torch.zeros(size, size, dtype=torch.complex128)
    envelope = torch.zeros(size, size, dtype=torch.float64)
    cos, sin = math.cos(theta), math.sin(theta)
    for shift_row in range(-2, 3):
        for shift_col in range(-2, 3):
            rows = (offsets + shift_row * size)[:, None]
            cols = (offsets + shift_col * size)[None, :]
            along, across = rows * cos + cols * sin, -rows * sin + cols * cos
            gaussian = torch.exp(-(along.square() + slant**2 * across.square()) / (2 * sigma**2))
            envelope += gaussian
            gabor += gaussian * torch.exp(1j * xi * along)
    k = gabor.sum() / envelope.sum()
    return (gabor - k * envelope) * (slant / (2 * math.pi * sigma**2))


def gaussian_2d(size: int, *, sigma: float) -> torch.Tensor:
    """An isotropic Gaussian of width ``sigma`` on a ``size x size`` periodic grid, centred at ``(0, 0)``, summing to one."""
    offsets = torch.arange(size, dtype=torch.float64)
    offsets = torch.where(offsets >= (size + 1) // 2, offsets - size, offsets)
    profile = sum(torch.exp(-(offsets + shift * size).square() / (2 * sigma**2)) for shift in range(-2, 3))
    window = profile[:, None] * profile[None, :]
    return window / window.sum()


class Scattering2D(nn.Module):
    """A fixed 2-D wavelet scattering transform (Mallat 2012; Bruna and Mallat 2013).

    Each input channel ``x`` gives, at ``1 / 2^J`` of the resolution:

    * order 0: ``x * phi``;
    * order 1: ``|x * psi_{j, l}| * phi`` for scales ``j < J`` and ``L`` orientations;
    * order 2: ``||x * psi_{j1, l1}| * psi_{j2, l2}| * phi`` for ``j1 < j2 < J``;

    ``psi_{j, l}`` a Morlet wavelet (:func:`morlet_2d`, ``sigma = 0.8 * 2^j``,
    ``xi = 3 pi / 4 / 2^j``, ``theta = pi l / L``, slant ``4 / L``) and ``phi``
    a Gaussian of width ``0.8 * 2^J`` (:func:`gaussian_2d`), subsampled by
    ``2^J``. That is ``1 + J L + L^2 J (J - 1) / 2`` maps per input channel
    (81 for ``J = 2``, ``L = 8``), of side ``side / 2^J``.

    How: the images are mirror-padded by ``2^J`` pixels on each side and
    convolved with the wavelets in the Fourier domain (periodically). As in
    Kymatio's algorithm, a wavelet of scale ``j`` keeps most of its energy
    below ``pi / 2^j``, so its output is kept at ``1 / 2^j`` of the
    resolution (the spectrum folded ``2^j`` times: exact subsampling of the
    periodic convolution) before the modulus and the low-pass; a second-order
    wavelet is built on the grid of the first-order map it filters, in that
    grid's pixels. ``phi`` is separable: its subsampled, cropped output is
    ``P u P^T`` with one small matrix ``P`` per resolution. Against the
    definition computed at full resolution by spatial sums (the tests), order
    0 and the finest first-order maps agree to float32 rounding, the others
    within 2.5% per map (0.15% over all maps, for a digit-like image).

    The filters depend only on ``side``, ``J`` and ``L``: built in code, held
    in non-persistent buffers (not in the state dict, so never sent, averaged
    or noised), and the module has no parameters. Under DP training it is a
    data-independent feature map and costs no privacy (Tramer and Boneh 2021,
    "Differentially private learning needs better features").

    Parameters
    ----------
    side : int
        Side of the square input images; a multiple of ``2^J``.
    J : int
        Number of scales, ``>= 1``.
    L : int
        Number of orientations, ``>= 1``.
    max_order : int
        1 or 2.
    chunk : int
        Examples transformed at a time (bounds the complex temporaries).
    cache_size : int
        Up to this many examples' maps are kept per process, keyed by a hash
        of the example's bytes (and the transform's settings), so that an
        example seen again (every local epoch and round) is not transformed
        again: the transform is deterministic, so the result is the same. 0:
        no cache. Each kept example costs ``4 * C * maps_per_channel *
        (side / 2^J)^2`` bytes (15.9 kB for MNIST at ``J = 2``, ``L = 8``).
    """

    def __init__(
        self, *, side: int, J: int = 2, L: int = 8, max_order: int = 2, chunk: int = 256, cache_size: int = 0
    ) -> None:
        super().__init__()
        check_int("model.cache_size", cache_size, minimum=0, maximum=1 << 24)
        self.cache_size = cache_size
        check_int("model.J", J, minimum=1, maximum=6)
        check_int("model.L", L, minimum=1, maximum=32)
        check_choice("model.max_order", max_order, (1, 2))
        if side % 2**J:
            raise ValueError(f"model.J={J}: the image side {side} must be a multiple of 2^J = {2**J}")
        self.side, self.J, self.L, self.max_order, self.chunk = side, J, L, max_order, chunk
        self.pad = 2**J
        self.size = side + 2 * self.pad
        # Second-order paths (j1, j2), j1 < j2: the first-order maps of scale j1
        # (kept at resolution 1 / 2^j1) filtered by every wavelet of scale j2.
        self.pairs = [(j1, j2) for j1 in range(J) for j2 in range(j1 + 1, J)] if max_order == 2 else []
        # Per resolution r (grid side size / 2^r): the wavelets of scales j >= r in
        # that grid's pixels (Fourier domain), and the low-pass matrix.
        for r in range(J + 1):
            n = self.size // 2**r
            wavelets = [
                torch.fft.fft2(
                    morlet_2d(n, sigma=0.8 * 2 ** (j - r), theta=math.pi * l / L, xi=3 * math.pi / 4 / 2 ** (j - r), slant=4 / L)
                )
                for j in range(r, J)
                for l in range(L)
            ]
            if r < J and (r == 0 or any(j1 == r for j1, _ in self.pairs)):
                self.register_buffer(f"psi_hat_{r}", torch.stack(wavelets).to(torch.complex64), persistent=False)
            self.register_buffer(f"low_pass_{r}", self._low_pass_matrix(n, r).to(torch.float32), persistent=False)

    def _low_pass_matrix(self, n: int, r: int) -> torch.Tensor:
        # Rows: the output positions (every 2^(J - r)-th of the grid, padding cut
        # off); columns: the periodic 1-D Gaussian of width 0.8 * 2^(J - r), sum 1.
        stride, out = 2 ** (self.J - r), self.side // 2**self.J
        cut = self.pad // 2**self.J
        profile = gaussian_2d(n, sigma=0.8 * 2 ** (self.J - r)).sum(0)
        return torch.stack([profile.roll(stride * (i + cut)) for i in range(out)])

    @property
    def maps_per_channel(self) -> int:
        """Output maps per input channel."""
        return 1 + self.J * self.L + self.L**2 * len(self.pairs)

    def _low_pass(self, maps: torch.Tensor, r: int) -> torch.Tensor:
        matrix = getattr(self, f"low_pass_{r}")
        return matrix @ maps @ matrix.t()

    @staticmethod
    def _fold_modulus(spectra: torch.Tensor, times: int) -> torch.Tensor:
        # |ifft2| of the spectrum folded times x times: the modulus of the periodic
        # convolution, subsampled by `times`.
        if times > 1:
            # Block sums by slices: a complex mean over strided dimensions is several times slower.
            n = spectra.shape[-1] // times
            blocks = [spectra[..., a * n : (a + 1) * n, b * n : (b + 1) * n] for a in range(times) for b in range(times)]
            folded = blocks[0].clone()
            for block in blocks[1:]:
                folded += block
            spectra = folded.div_(times * times)
        signal = torch.fft.ifft2(spectra)
        return torch.hypot(signal.real, signal.imag)

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        padded = F.pad(x.reshape(batch * channels, 1, self.side, self.side).float(), (self.pad,) * 4, mode="reflect")
        x_hat = torch.fft.fft2(padded)
        outputs, first = [self._low_pass(padded, 0)], {}
        for j in range(self.J):
            u1 = self._fold_modulus(x_hat * self.psi_hat_0[j * self.L : (j + 1) * self.L], 2**j)
            outputs.append(self._low_pass(u1, j))
            first[j] = u1
        for j1, j2 in self.pairs:
            psi = getattr(self, f"psi_hat_{j1}")[(j2 - j1) * self.L : (j2 - j1 + 1) * self.L]
            # (B, L1, 1, n, n) x (L2, n, n) -> (B, L1 * L2, n, n) at resolution 1 / 2^j1, then 1 / 2^j2.
            u2 = self._fold_modulus(torch.fft.fft2(first[j1])[:, :, None] * psi, 2 ** (j2 - j1))
            outputs.append(self._low_pass(u2.flatten(1, 2), j2))
        maps = torch.cat(outputs, dim=1)
        return maps.reshape(batch, channels * maps.shape[1], *maps.shape[2:]).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, side, side)`` images to ``(B, C * maps_per_channel, side / 2^J, side / 2^J)`` features."""
        if x.dim() != 4 or x.shape[-2:] != (self.side, self.side):
            raise ValueError(f"Scattering2D: expects (batch, channels, {self.side}, {self.side}); got {tuple(x.shape)}")
        out = self.side // 2**self.J
        if not len(x):
            return x.new_zeros((0, x.shape[1] * self.maps_per_channel, out, out))
        with torch.no_grad():
            if not self.cache_size:
                return self._transform_all(x)
            return self._cached(x)

    def _transform_all(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._transform(part) for part in x.split(self.chunk)])

    def _cached(self, x: torch.Tensor) -> torch.Tensor:
        settings = (self.side, self.J, self.L, self.max_order, x.shape[1:], x.dtype, x.device)
        cache = _SCATTERING_CACHE.setdefault(settings, OrderedDict())
        rows = x.detach().cpu().contiguous().numpy().reshape(len(x), -1)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            fresh = self._transform_all(x[missing])
            for i, maps in zip(missing, fresh, strict=True):
                cache[keys[i]] = maps
        found = [cache[key] for key in keys]
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return torch.stack(found)


_SCATTERING_CACHE: dict[tuple, OrderedDict[bytes, torch.Tensor]] = {}
"""Per process and transform settings, the maps of the examples :class:`Scattering2D` saw last (``cache_size``)."""


class ScatterNet(nn.Module):
    """A fixed scattering transform, GroupNorm, then a linear classifier or a small CNN.

    Tramer and Boneh's (2021) ScatterNet models: the features
    (:class:`Scattering2D`) use no data and have no parameters, so DP-SGD's
    noise is spread over the classifier alone. GroupNorm normalizes each
    example by itself (a data-independent normalization), which keeps
    per-example gradients independent.

    Parameters
    ----------
    input_shape : Sequence[int]
        ``(channels, side, side)``, ``side`` a multiple of ``2^J``.
    num_classes : int
        Number of output classes.
    J, L, max_order : int
        The scattering transform's scales, orientations and order.
    groups : int
        GroupNorm groups over the scattering maps (a divisor of their number;
        81 for one input channel at ``J = 2``, ``L = 8``).
    channels : Sequence[int]
        Output channels of 3x3 conv/GroupNorm/activation stages after the
        normalization (no pooling); empty: a linear classifier.
    cnn_groups : int
        GroupNorm groups in those stages.
    activation : str
        ``relu`` or ``tanh`` (see :data:`ACTIVATIONS`), in those stages.
    cache_size : int
        Examples whose scattering maps are kept per process (see :class:`Scattering2D`); 0: none.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        J: int = 2,
        L: int = 8,
        max_order: int = 2,
        groups: int = 27,
        channels: Sequence[int] = (),
        cnn_groups: int = 4,
        activation: str = "relu",
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        _check_classes(num_classes)
        check_choice("model.activation", activation, tuple(ACTIVATIONS))
        shape = tuple(input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"model=scatternet: expects square images (channels, side, side); the dataset gives {shape}")
        self.scattering = Scattering2D(side=shape[1], J=J, L=L, max_order=max_order, cache_size=cache_size)
        width = shape[0] * self.scattering.maps_per_channel
        check_int("model.groups", groups, minimum=1, maximum=MAX_WIDTH)
        if width % groups:
            raise ValueError(f"model.groups={groups}: must divide the {width} scattering maps")
        self.norm = nn.GroupNorm(groups, width)
        widths = (width, *(_check_positive_ints("channels", channels) if len(channels) else ()))
        check_int("model.cnn_groups", cnn_groups, minimum=1, maximum=MAX_WIDTH)
        self.features = nn.Sequential(
            *(
                _conv_block(c_in, c_out, groups=cnn_groups, activation=activation, pool=False)
                for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
            )
        )
        final_side = shape[1] // 2**J
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * final_side**2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.classifier(self.features(self.norm(self.scattering(x))))
