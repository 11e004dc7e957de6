"""Models that Opacus accepts as they are: no BatchNorm, GroupNorm where needed.

Each class is the ``_target_`` of a ``conf/model/*.yaml`` node with
``_partial_: true``: the config fixes the hyperparameters, and the app supplies
``input_shape`` and ``num_classes`` from the dataset when it builds the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

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


def _conv_block(in_channels: int, out_channels: int, *, groups: int, activation: str) -> nn.Sequential:
    # GroupNorm instead of BatchNorm: per-example gradients stay independent (Opacus).
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(min(groups, out_channels), out_channels),
        ACTIVATIONS[activation](),
        nn.MaxPool2d(2),
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
