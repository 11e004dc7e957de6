"""The shipped tabular data (heart disease, German credit), natural partitions and binary-task metrics."""

from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedpriv.compose import compose_config
from fedpriv.experiment import client_examples, load_experiment
from fedpriv.metrics import balanced_accuracy, misclassification_cost, roc_auc, evaluation_metrics
from fedpriv.models import LogisticRegression
from fedpriv.partition import Natural
from fedpriv.tabular import CSV, HEART_DISEASE_FEATURES, HEART_DISEASE_SILOS, GermanCredit, HeartDisease, standardize_locally


def test_the_shipped_heart_disease_files_hold_each_hospitals_documented_patients():
    # Prepare
    folder = resources.files("fedpriv").joinpath("data", "heart_disease")

    # Execute
    rows = [len(np.genfromtxt(str(folder.joinpath(f"processed.{silo}.data")), delimiter=",")) for silo in HEART_DISEASE_SILOS]
    splits = HeartDisease().load()

    # Assert: 303, 294, 123 and 200 patients, 80% of each hospital in the pool; 26 columns
    assert rows == [303, 294, 123, 200]
    assert folder.joinpath("README.md").read_text().count("CC BY 4.0") == 1
    assert len(splits.train_y) + len(splits.test_y) == 920
    in_pool = np.bincount(splits.train_silo.numpy(), minlength=4)
    assert all(abs(n - 0.8 * total) <= 1 for n, total in zip(in_pool, rows, strict=True))
    assert splits.train_x.shape[1] == splits.test_x.shape[1] == 26


def test_the_training_pool_keeps_raw_values_and_each_client_scales_with_its_own_rows():
    # Prepare: one client per hospital
    experiment = load_experiment(compose_config(["dataset=heart_disease", "partition=natural", "num_clients=4"]))
    pool = experiment.dataset.load()
    values = len(HEART_DISEASE_FEATURES)

    # Execute
    clients = [client_examples(experiment, partition_id=i, num_partitions=4) for i in range(4)]

    # Assert: the pool is not imputed (Zurich/Basel's chol is all missing), and every
    # client's features are exactly its own rows standardized with its own statistics
    chol = HEART_DISEASE_FEATURES.index("chol")
    assert torch.isnan(pool.train_x[pool.train_silo == 2, chol]).all()
    for silo, (x, y) in enumerate(clients):
        own = pool.train_x[pool.train_silo == silo]
        assert torch.equal(x, standardize_locally(own, value_columns=values))
        assert torch.equal(y, pool.train_y[pool.train_silo == silo])
        assert not torch.isnan(x).any()
        present = ~torch.isnan(own[:, :values]).all(dim=0)
        assert torch.allclose(x[:, :values][:, present].mean(dim=0), torch.zeros(int(present.sum())), atol=1e-5)
    assert sum(len(y) for _, y in clients) == len(pool.train_y)


def test_local_standardization_fills_a_column_missing_everywhere_with_zero_and_keeps_indicators():
    # Prepare
    x = torch.tensor([[1.0, float("nan"), 0.0, 1.0], [3.0, float("nan"), 0.0, 1.0], [float("nan"), float("nan"), 1.0, 1.0]])

    # Execute
    scaled = standardize_locally(x, value_columns=2)

    # Assert: mean imputation, unit scale from the present rows, indicators untouched
    assert torch.allclose(scaled[:, 0], torch.tensor([-1.0, 1.0, 0.0]))
    assert torch.equal(scaled[:, 1], torch.zeros(3))
    assert torch.equal(scaled[:, 2:], x[:, 2:])


@pytest.mark.parametrize(("clients", "message"), [(3, r"num_clients=3: partition=natural needs one client per silo \(4\)")])
def test_a_natural_partition_needs_one_client_per_silo(clients, message):
    silos = np.array([0, 0, 1, 2, 3, 3])
    with pytest.raises(ValueError, match=message):
        Natural().split(np.zeros(6, dtype=int), num_partitions=clients, seed=0, silos=silos)


def test_german_credit_has_its_documented_rows_and_cost():
    # Execute
    splits = GermanCredit().load()

    # Assert: 1,000 applicants, 300 bad (label 1), 24 attributes
    assert len(splits.train_y) + len(splits.test_y) == 1000
    assert int(splits.train_y.sum() + splits.test_y.sum()) == 300
    assert splits.train_x.shape[1] == 24 and GermanCredit.costs == (1.0, 5.0)


def test_binary_metrics_agree_with_scikit_learn_on_fixed_inputs():
    # Prepare
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.2, 0.9, 0.6])  # a tie across classes
    predictions = (scores > 0.5).astype(int)

    # Execute / Assert
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert balanced_accuracy(predictions, labels) == pytest.approx(balanced_accuracy_score(labels, predictions))
    # 2 bad predicted good (5 each) and 1 good predicted bad (1), over 8
    assert misclassification_cost(predictions, labels, false_positive=1.0, false_negative=5.0) == pytest.approx(11 / 8)
    assert roc_auc(scores, np.ones(8)) is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn on one-class inputs
@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=2, max_size=60))
def test_auc_and_balanced_accuracy_agree_with_scikit_learn_on_random_inputs(pairs):
    labels = np.array([label for label, _ in pairs])
    scores = np.array([float(score) for _, score in pairs])
    predictions = (scores > 10).astype(int)
    if len(set(labels)) == 2:
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert balanced_accuracy(predictions, labels) == pytest.approx(balanced_accuracy_score(labels, predictions))


def test_a_binary_task_reports_auc_and_a_costed_one_its_cost():
    # Prepare
    torch.manual_seed(0)
    model = LogisticRegression(input_shape=(3,), num_classes=2)
    x, y = torch.rand(50, 3), torch.randint(0, 2, (50,))

    # Execute
    metrics = evaluation_metrics(model, x, y, num_classes=2, costs=(1.0, 5.0))
    multiclass = evaluation_metrics(LogisticRegression(input_shape=(3,), num_classes=3), x, y, num_classes=3)

    # Assert
    assert set(metrics) == {"test_loss", "test_accuracy", "test_auc", "test_balanced_accuracy", "test_cost"}
    with torch.no_grad():
        logits = model(x)
    assert metrics["test_auc"] == pytest.approx(roc_auc_score(y.numpy(), logits[:, 1] - logits[:, 0]))
    assert set(multiclass) == {"test_loss", "test_accuracy"}


# The user's own CSV

HEADER = "age,smoker,site,chol,outcome\n"


def write_csv(tmp_path, rows: list[str], *, header: str = HEADER):
    path = tmp_path / "table.csv"
    path.write_text(header + "".join(f"{row}\n" for row in rows))
    return str(path)


def patient_rows(count: int = 60) -> list[str]:
    rng = np.random.default_rng(0)
    return [
        f"{30 + i % 50},{('yes', 'no', '')[i % 3]},{'ABC'[i % 3]},{'' if i % 7 == 0 else 150 + i},{int(rng.random() < 0.5)}"
        for i in range(count)
    ]


def test_a_users_csv_becomes_values_indicators_and_one_hot_columns_with_one_client_per_site(tmp_path):
    # Prepare
    path = write_csv(tmp_path, patient_rows())
    overrides = [
        "dataset=csv", f"dataset.path={path}", "dataset.label_column=outcome", "dataset.silo_column=site",
        "dataset.categorical_columns={smoker:[yes,no]}", "partition=natural", "num_clients=3",
    ]
    experiment = load_experiment(compose_config(overrides))

    # Execute
    clients = [client_examples(experiment, partition_id=i, num_partitions=3) for i in range(3)]

    # Assert: age, chol, their two missing indicators, smoker yes / no
    assert experiment.dataset.input_shape == (6,) and experiment.dataset.num_classes == 2
    pool = experiment.dataset.load()
    for silo, (x, _) in enumerate(clients):
        assert torch.equal(x, standardize_locally(pool.train_x[pool.train_silo == silo], value_columns=2))
        assert not torch.isnan(x).any()
    assert pool.train_x[:, 4:].sum(dim=1).max() == 1  # one category at most, none when missing


@pytest.mark.parametrize(
    ("rows", "settings", "message"),
    [
        (None, {"path": "no/such.csv"}, "dataset.path='no/such.csv': no such file"),
        (["40,yes,A,200,1"] * 4, {"label_column": "diagnosis"}, "dataset.label_column: no column 'diagnosis' in"),
        (["40,yes,A,high,1", "50,no,B,200,0"], {}, "column 'chol' has the non-numeric value 'high' in row 2"),
        (["40,yes,A,200,1", "50,no,B,210,1"], {}, "dataset.label_column='outcome': .* has only one class \\('1'\\)"),
        (["40,maybe,A,200,1", "50,no,B,210,0"], {}, "dataset.categorical_columns.smoker: the value 'maybe' in row 2"),
        (["40,yes,A,200,1", "50,no,B,,"], {}, "dataset.label_column='outcome': row 3 of .* has no label"),
        (["40,yes,A,200,1", "50,no,B,210,0"], {"feature_columns": ["age", "outcome"]},
         "dataset.feature_columns: 'outcome' is the label, the silo or a categorical column"),
        # B's one patient goes to the test split (half of each site and class, rounded up)
        (["40,yes,A,200,1", "50,no,A,210,0", "60,no,B,220,1", "45,no,A,205,1", "55,yes,A,215,0"],
         {"test_fraction": 0.5},
         "dataset.silo_column='site': silo 'B' has no training row"),
    ],
)
def test_each_problem_with_a_users_csv_is_one_line_naming_it(tmp_path, rows, settings, message):
    # Prepare
    path = write_csv(tmp_path, rows) if rows is not None else None
    config = {
        "path": path, "label_column": "outcome", "silo_column": "site", "categorical_columns": {"smoker": ["yes", "no"]},
        **settings,
    }

    # Execute
    with pytest.raises(ValueError) as error:
        CSV(**config).load()

    # Assert
    assert re.search(message, str(error.value)) and "\n" not in str(error.value)


def test_a_csv_dataset_needs_its_path():
    with pytest.raises(ValueError, match="dataset.path=None: set it to your CSV file"):
        CSV()


def test_the_references_are_the_pooled_data_and_each_hospital_alone(tmp_path, capsys):
    # Prepare: a finished run's folder (the references need only its config and final row)
    from fedpriv.reference import reference_points
    from scripts.reference import main as reference_main

    overrides = ["dataset=heart_disease", "partition=natural", "num_clients=4", "num_rounds=1"]
    config = compose_config(overrides)
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "final": {"test_accuracy": 0.5}}))

    # Execute
    rows = reference_points(load_experiment(config))
    code = reference_main([str(tmp_path)])

    # Assert
    assert [row["reference"] for row in rows] == ["pooled", *(f"client {i} alone" for i in range(4))]
    assert rows[0]["examples"] == sum(row["examples"] for row in rows[1:])
    assert all(0 <= row["test_auc"] <= 1 for row in rows)
    assert code == 0 and "| this federated run |" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "reference.json").read_text())) == 5
    assert reference_main([str(tmp_path / "missing")]) == 2
