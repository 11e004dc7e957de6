"""Models: shapes, Opacus compatibility, clear errors for mismatched inputs."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedpriv.models import CNN28, CNN32, MLP, LogisticRegression, ScatterNet

CASES = [
    (MLP, (1, 8, 8), {"hidden_sizes": [32, 16]}),
    (LogisticRegression, (30,), {}),
    (CNN28, (1, 28, 28), {}),
    (CNN28, (1, 28, 28), {"activation": "tanh"}),
    (CNN32, (3, 32, 32), {}),
    (CNN32, (3, 32, 32), {"activation": "tanh"}),
    (ScatterNet, (1, 28, 28), {}),
    (ScatterNet, (3, 32, 32), {"channels": [16], "activation": "tanh"}),
]


@pytest.mark.parametrize(("model_class", "shape", "kwargs"), CASES)
def test_model_gives_logits_and_opacus_accepts_it(model_class, shape, kwargs):
    # Prepare
    model = model_class(input_shape=shape, num_classes=7, **kwargs)

    # Execute
    logits = model(torch.randn(5, *shape))

    # Assert
    assert logits.shape == (5, 7)
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CNN28(input_shape=(1, 8, 8), num_classes=10), r"model=cnn28: expects images of shape \(channels, 28, 28\)"),
        (lambda: CNN32(input_shape=(1, 28, 28), num_classes=10), r"model=cnn32"),
        (lambda: MLP(input_shape=(4,), num_classes=2, hidden_sizes=[0]), r"model.hidden_sizes=\[0\]"),
        (lambda: CNN28(input_shape=(1, 28, 28), num_classes=10, channels=[8, 8, 8]), r"model.channels=\[8, 8, 8\]"),
        (lambda: LogisticRegression(input_shape=(4,), num_classes=1), r"num_classes=1"),
        (lambda: CNN28(input_shape=(1, 28, 28), num_classes=10, activation="gelu"),
         r"^model.activation='gelu': must be one of \['relu', 'tanh'\]"),
    ],
)
def test_bad_model_settings_name_the_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(("activation", "layer"), [("relu", torch.nn.ReLU), ("tanh", torch.nn.Tanh)])
def test_the_cnn_activation_is_the_one_asked_for_in_every_stage(activation, layer):
    # Execute
    model = CNN28(input_shape=(1, 28, 28), num_classes=10, activation=activation)

    # Assert
    stages = list(model.features)
    assert [type(stage[2]) for stage in stages] == [layer] * len(stages)
