"""audit=canary through the real Flower simulation, then scripts/audit.py on the finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_project_script

from fedpriv.audit.lower_bound import epsilon_lower_bound


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_noise_free_run_is_caught_by_the_audit_and_membership_is_added(tmp_path):
    # Prepare: client-level DP-FedAvg without noise, 200 canary clients, 160 guesses
    # (160 of 160 correct proves epsilon >= 3.97 at 95%)
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", "num_clients=3", "num_rounds=2", "client.local_epochs=1",
        "strategy=dp_fixed", "strategy.noise_multiplier=0", "audit=canary", "audit.num_canaries=200",
    ]

    # Execute: the run
    run = run_project_script("run.py", *overrides, cwd=tmp_path)

    # Assert: every guess right, no claim, and the log says so
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    document = strict_json(out / "results.json")
    audit = document["audit"]
    assert audit["level"] == "client"
    assert (audit["num_canaries"], audit["num_guesses"], audit["confidence"]) == (200, 160, 0.95)
    assert audit["correct_guesses"] == 160
    assert audit["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(num_guesses=160, num_correct=160))
    assert audit["epsilon_lower_bound"] > 3.9
    assert audit["claimed_epsilon"] is None and audit["private"] is False
    assert document["final"]["epsilon_user"] is None
    assert all(row["num_canaries"] == audit["num_included"] for row in document["rounds"])
    assert "NOT client-level private" in run.stdout + run.stderr

    # Execute: membership inference on the finished run
    attack = run_project_script("audit.py", str(out), "--shadow-models", "2", "--shadow-epochs", "1", cwd=tmp_path)

    # Assert: audit.membership added, every other section and key kept
    assert attack.returncode == 0, attack.stderr[-3000:]
    after = strict_json(out / "results.json")
    membership = after["audit"].pop("membership")
    assert after == document
    for name in ("loss_threshold", "lira"):
        result = membership[name]
        assert 0.0 <= result["auc"] <= 1.0
        assert 0.0 <= result["tpr_at_0.1pct_fpr"] <= result["tpr_at_1pct_fpr"] <= 1.0
        assert result["num_nonmembers"] > 0 and result["num_members"] > result["num_nonmembers"]
    assert "Yeom" in membership["loss_threshold"]["method"] and "Carlini" in membership["lira"]["method"]


@pytest.mark.parametrize(
    ("script_name", "args", "expected"),
    [
        ("run.py", ["audit=canary"], "config error: audit.level='client'"),
        ("run.py", ["strategy=dp_fixed", "audit=canary", "audit.confidence=2"], "config error: audit.confidence=2"),
        ("audit.py", ["no-such-run"], "audit error: run_dir=no-such-run: needs results.json and model.pt"),
    ],
)
def test_bad_audit_input_is_one_line_and_exit_2(tmp_path, script_name, args, expected):
    # Execute
    result = run_project_script(script_name, *args, cwd=tmp_path)

    # Assert
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
