"""Config path: Hydra -> run_config -> apps, pyproject defaults, bad config handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, get_project_config
from hypothesis import given
from hypothesis import strategies as st

from fedpriv.compose import compose_config
from fedpriv.experiment import experiment_from_run_config, load_experiment
from fedpriv.run_config import ConfigError, build_component, flatten, unflatten
from conftest import run_project_script

REPO = Path(__file__).resolve().parents[1]
GROUP_OPTIONS = {
    group: sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    for group in ("strategy", "client", "model", "dataset", "partition", "mode", "audit")
}


def test_pyproject_defaults_equal_flattened_default_hydra_config():
    # Prepare
    pyproject = get_project_config(REPO)

    # Execute
    defaults = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])

    # Assert
    assert defaults == flatten(compose_config()), "run: python scripts/sync_pyproject.py"


def without_nones(config):
    """``config`` without ``None`` values: they have no run-config form (defaults apply)."""
    return {
        key: without_nones(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if value is not None
    }


def test_every_group_option_composes_and_round_trips():
    for group, options in GROUP_OPTIONS.items():
        for option in options:
            # Prepare
            config = compose_config([f"{group}={option}"])

            # Execute
            flat = flatten(config)

            # Assert
            assert all(isinstance(v, bool | int | float | str) for v in flat.values())
            assert unflatten(flat) == without_nones(config)
            assert "_target_" in config[group]


scalars = st.one_of(
    st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=8).filter(lambda s: not s.startswith("["))
)
names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: not s.endswith("_"))


@given(st.dictionaries(names, st.one_of(scalars, st.lists(st.integers(), max_size=3), st.dictionaries(names, scalars, max_size=3)), max_size=6))
def test_flatten_round_trips_nested_scalars_and_lists(config):
    # Prepare: empty sub-dicts have no flat form
    config = {k: v for k, v in config.items() if v != {}}

    # Execute
    flat = flatten(config)

    # Assert
    assert unflatten(flat) == config
    assert all("_" not in key for key in flat)


def test_flatten_encodes_keys_and_lists_the_flower_way():
    flat = flatten({"strategy": {"_target_": "x.Y", "noise_multiplier": 1.0, "sizes": [1, 2], "off": None}})
    assert flat == {"strategy._target_": "x.Y", "strategy.noise-multiplier": 1.0, "strategy.sizes": "[1, 2]"}


def test_run_config_rebuilds_the_same_experiment_as_hydra():
    # Prepare
    config = compose_config(["num_clients=4", "partition=dirichlet", "partition.alpha=0.3", "model=logreg"])

    # Execute
    direct = load_experiment(config)
    rebuilt = experiment_from_run_config(flatten(config))

    # Assert
    assert rebuilt.settings == direct.settings
    assert rebuilt.partition == direct.partition
    assert rebuilt.dataset == direct.dataset
    assert rebuilt.client == direct.client
    assert type(rebuilt.build_model()) is type(direct.build_model())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_clients=0"], "num_clients=0"),
        (["num_rounds=-1"], "num_rounds=-1"),
        (["strategy.fraction_train=1.5"], "strategy.fraction_train=1.5"),
        (["client.lr=-0.1"], "client.lr=-0.1"),
        (["client.optimizer=rmsprop"], "client.optimizer='rmsprop'"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha=0"),
        (["dataset.test_fraction=1.0"], "dataset.test_fraction=1.0"),
        (["model=cnn28"], "model=cnn28"),
        (["model.hidden_sizes=[0]"], "model.hidden_sizes=[0]"),
        (["mode.client_num_cpus=0"], "mode.client_num_cpus=0"),
        (["mode.ray_address=localhost"], "mode.ray_address='localhost': must be HOST:PORT"),
        (["mode.ray_address=10.0.0.5:0"], "mode.ray_address='10.0.0.5:0'"),
    ],
)
def test_bad_values_are_refused_naming_key_and_value(overrides, message):
    # Prepare
    config = compose_config(overrides)

    # Execute / Assert
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        experiment = load_experiment(config)
        build_component(config["strategy"], key="strategy")
        build_component(config["mode"], key="mode")
        experiment.build_model()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["strategy=nope"], "Could not find 'strategy/nope' (available: dp_adaptive, dp_fixed, fedavg)"),
        (["num_clients=0"], "num_clients=0: must be an integer in [1, 10000000]"),
        (["partition=dirichlet", "partition.alpha=-1"], "partition.alpha=-1"),
        (["bogus=1"], "Could not override 'bogus'"),
        (["client.lr=0.1,0.2"], "a sweep needs --multirun"),
    ],
)
def test_bad_config_on_the_command_line_is_refused_in_one_line(args, expected):
    # Prepare: what scripts/run.py checks before Hydra starts, in-process
    from scripts.run import check_overrides

    # Execute
    with pytest.raises(ConfigError) as refused:
        check_overrides(args)

    # Assert
    assert expected in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_bad_config_ends_the_script_with_one_line_and_exit_2():
    # Execute
    result = run_project_script("run.py", "partition=dirichlet", "partition.alpha=-1", cwd=REPO, timeout=120)

    # Assert
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["config error: partition.alpha=-1: must be > 0"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["strategy=dp_fixed", "strategy.aggregator=median"],
         "strategy.aggregator='median': client-level DP noise is calibrated to the clipped mean's sensitivity"),
        (["strategy=dp_adaptive", "strategy.aggregator=krum"],
         "strategy.aggregator='krum': client-level DP noise is calibrated to the clipped mean's sensitivity"),
    ],
)
def test_a_robust_aggregator_under_client_level_dp_ends_the_script_with_one_line_and_exit_2(args, expected):
    # Execute
    result = run_project_script("run.py", *args, cwd=REPO, timeout=120)

    # Assert
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"config error: {expected}"), result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["secure=secagg", "strategy.aggregator=trimmed_mean"],
         "strategy.aggregator='trimmed_mean': secure=secagg hides each client's update from the server"),
        (["secure=ckks", "strategy.aggregator=median"],
         "strategy.aggregator='median': secure=ckks hides each client's update from the server"),
        (["secure=ckks", "strategy.server_optimizer=adam"],
         "strategy.server_optimizer='adam': secure=ckks keeps the model encrypted"),
        (["secure=ckks", "strategy.server_momentum=0.9"], "strategy.server_momentum=0.9: secure=ckks needs 0"),
        (["client=opacus", "client.grad_sample_mode=ghost", "client.proximal_mu=0.1"],
         "client.proximal_mu=0.1: grad_sample_mode='ghost' clips per-example norms without per-example gradients"),
        (["strategy.server_optimizer=adam", "strategy.beta1=1.5"], "strategy.beta1=1.5: must be in [0, 1)"),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(args, expected):
    # Prepare: what scripts/run.py checks before Hydra starts, in-process
    from scripts.run import check_overrides

    # Execute
    with pytest.raises(ConfigError) as refused:
        check_overrides(args)

    # Assert
    assert str(refused.value).startswith(expected)
    assert "\n" not in str(refused.value)


def test_federated_evaluation_with_private_clients_is_refused_in_one_line():
    # Prepare
    config = compose_config(["client=opacus", "strategy.fraction_evaluate=0.5"])

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"^strategy.fraction_evaluate=0.5: federated evaluation would release"):
        load_experiment(config)


def test_seeded_noise_is_recorded_as_voiding_the_guarantee():
    # Prepare
    from strategies.server_app import privacy_section

    private = load_experiment(compose_config(["client=opacus"]))
    seeded = load_experiment(compose_config(["client=opacus", "seeded_noise=true"]))
    server_seeded = load_experiment(compose_config(["strategy=dp_fixed", "strategy.noise_seed=3"]))
    strategy = build_component(compose_config([])["strategy"], key="strategy")
    dp = build_component(server_seeded.strategy_config, key="strategy")

    # Execute
    sections = [privacy_section(private, strategy), privacy_section(seeded, strategy), privacy_section(server_seeded, dp)]

    # Assert
    assert [s["guarantee_void"] for s in sections] == [False, True, True]
    assert sections[0] == {
        "client_level": False,
        "record_level": True,
        "local": False,
        "secure_aggregation": "none",
        "distributed_noise": None,
        "seeded_noise": False,
        "guarantee_void": False,
    }
    assert sections[2]["client_level"] is True


def test_a_simulation_cannot_wait_for_more_nodes_than_it_has_clients():
    # Prepare
    from fedpriv.experiment import check_runnable
    from fedpriv.simulation import SimulationMode

    experiment = load_experiment(compose_config(["num_clients=3", "strategy.min_available_nodes=5"]))

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"^strategy.min_available_nodes=5: a simulation has only num_clients=3"):
        check_runnable(experiment, mode=SimulationMode())


def test_a_dataset_brings_its_model_and_tuned_client_settings_and_the_command_line_wins():
    # Execute
    mnist = compose_config(["dataset=mnist"])
    private = compose_config(["dataset=mnist", "client=opacus"])
    chosen = compose_config(["dataset=mnist", "model=mlp", "client.lr=0.3"])
    default = compose_config([])

    # Assert
    assert mnist["model"]["_target_"] == "fedpriv.models.CNN28"
    assert (mnist["client"]["local_epochs"], mnist["client"]["lr"]) == (2, 0.1)
    assert (private["client"]["batch_size"], private["client"]["lr"]) == (128, 1.0)
    assert (chosen["model"]["_target_"], chosen["client"]["lr"]) == ("fedpriv.models.MLP", 0.3)
    assert default["model"]["_target_"] == "fedpriv.models.MLP" and default["client"]["lr"] == 0.05


# conf/tuning/mnist_opacus_eps3.yaml: the README's epsilon-3 sweep (Performance).
EPS3_PRESET = {
    "batch_size": 420,
    "local_epochs": 2,
    "lr": 8.0,
    "momentum": 0.5,
    "max_grad_norm": 0.5,
    "noise_multiplier": None,
    "target_epsilon": 3,
}


def test_the_epsilon_3_preset_is_one_override_and_spends_epsilon_3_over_the_run():
    import torch

    from fedpriv.models import MLP

    # Prepare
    overrides = ["dataset=mnist", "client=opacus", "tuning=mnist_opacus_eps3"]
    config = compose_config(overrides)
    chosen = compose_config([*overrides, "client.lr=2.0"])
    training = build_component(config["client"], key="client")
    # One client of MNIST-8k over 10 clients (800 examples), the bench's 15 rounds; a tiny model
    # (the accounting does not depend on it).
    rounds, x, y = 15, torch.zeros(800, 1, 2, 2), torch.arange(800) % 10
    state: dict = {}

    # Execute
    outcomes = [
        training.fit(MLP(input_shape=(1, 2, 2), num_classes=10, hidden_sizes=(4,)), x, y,
                     seed=r, state=state, planned_rounds=rounds)
        for r in range(rounds)
    ]

    # Assert
    assert {key: config["client"][key] for key in EPS3_PRESET} == EPS3_PRESET
    assert chosen["client"]["lr"] == 2.0
    assert 0.99 * 3 <= outcomes[-1].metrics["epsilon"] <= 3
    assert outcomes[-1].metrics["delta"] == 1e-5


def test_the_scatternet_epsilon_3_preset_picks_its_model_and_the_command_line_still_wins():
    # Prepare
    overrides = ["dataset=mnist", "client=opacus", "tuning=mnist_opacus_eps3_scatter"]

    # Execute
    config = compose_config(overrides)
    chosen = compose_config([*overrides, "model=cnn28", "client.local_epochs=2"])
    model = load_experiment(config).build_model()

    # Assert
    assert type(model).__name__ == "ScatterNet" and model.scattering.maps_per_channel == 81
    assert {key: config["client"][key] for key in ("batch_size", "local_epochs", "lr", "momentum", "max_grad_norm")} == {
        "batch_size": 420, "local_epochs": 3, "lr": 4.0, "momentum": 0.9, "max_grad_norm": 0.1
    }
    assert (config["client"]["noise_multiplier"], config["client"]["target_epsilon"]) == (None, 3)
    assert chosen["model"]["_target_"] == "fedpriv.models.CNN28" and chosen["client"]["local_epochs"] == 2
