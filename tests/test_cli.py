"""End-to-end `cif-jax cv` with tiny settings, and its one-line errors."""

import json
import math
import os

import pytest

from cif_jax.workloads.cli import main


def test_cv_small_run_writes_real_results(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["cv", "--dataset", "digits", "--model", "mlp", "--subsample", "0.1", "--epochs", "3",
            "-C", "4", "-d", "8", "--k", "5", "8", "--bootstrap", "200", "--rtol", "1e-4",
            "--rhs-batch-size", "8", "--halves", "6", "--test-points", "10", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    from cif_jax.workloads.data import load_dataset

    expected_n = load_dataset("digits", seed=0, subsample=0.1).x_train.shape[0]
    assert result["num_train"] == expected_n and 130 <= expected_n <= 150  # ~10% of 1,437 training images
    assert [r["K"] for r in result["per_k"]] == [5, 8]
    for row in result["per_k"]:
        assert set(row["estimators"]) == {"hybrid", "corrected", "paper"}
        for est in row["estimators"].values():
            assert len(est["fold_scores"]) == row["K"] == len(row["fold_scores_if"])
            for name in ("pearson", "spearman"):
                c = est[name]
                assert all(math.isfinite(c[k]) for k in ("value", "low", "high"))
                assert -1 <= c["low"] <= c["value"] <= c["high"] <= 1 or c["low"] <= c["high"]
            assert est["cross_fold"]["pairs"] == row["K"] * (row["K"] - 1)
        assert row["if_seconds"] > 0 and row["cif_query_seconds"] > 0
        assert row["if_max_residual"] <= 1e-4 * 1.01
        assert row["bound_scatter_term"] >= 0 and row["bound_solver_term"] >= 0
    assert result["speedup"] > 0 and math.isfinite(result["speedup"])
    assert (out / "cif_vs_if.png").stat().st_size > 0 and (out / "times.png").stat().st_size > 0
    assert (out / "cache.npz").exists()
    # The held-out workload: every estimator but "corrected" (no self terms on test points).
    held = result["held_out"]
    assert held["halves"] == 6 and held["test_points"] == 10 and set(held["estimators"]) == {"hybrid", "paper"}
    assert all(-1 <= e["median_spearman"] <= 1 for e in held["estimators"].values())
    # The default: the cache's low-rank factors, rank chosen by the spectrum, precondition every solve.
    rank = result["factors"]["rank"]
    assert 1 <= rank <= min(1024, result["num_params"]) and result["factors"]["note"].startswith("auto: rank")
    assert result["preconditioner"]["kind"] == f"nystrom(rank={rank})"
    assert result["preconditioner"]["choice"] == "shared Nystrom factors"
    # A second run loads the checkpoint instead of retraining; with factors of a fixed rank
    # the solves meet the same true tolerance.
    assert main(argv + ["--no-plots", "--factor-rank", "8"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["trained_or_loaded"] == "loaded"
    assert second["preconditioner"]["kind"] == "nystrom(rank=8)" and second["preconditioner"]["rank"] == 8
    assert all(row["if_max_residual"] <= 1e-4 * 1.01 for row in second["per_k"])
    assert max(second["cache"]["residuals"]) <= 1e-4 * 1.01
    assert "Spearman" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--model", "vgg"], "unknown model"),
        (["--k", "5000"], "exceeds"),
        (["-C", "5000"], "exceeds"),
        (["--k", "1"], "at least 2"),
        (["--damping", "0"], "damping"),
        (["--rank", "many"], "--rank must be an integer"),
        (["--factor-rank", "0"], "--factor-rank must be at least 1"),
        (["--halves", "2"], "--halves"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent-tfds"], "mnist"),
        (["--rtol", "inf"], "--rtol must be a positive finite number"),
        (["--rtol", "nan"], "--rtol must be a positive finite number"),
        (["--seed", "-1"], "--seed must be a non-negative integer"),
    ],
)
def test_cv_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    assert main(["cv", "--output", str(tmp_path / "o"), "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cif-jax: error:") and message in err[0]


def test_cv_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["cv", "--output", os.path.join(str(blocker), "sub")]) == 2
    assert "output folder" in capsys.readouterr().err


def test_cv_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    base = ["cv", "--dataset", "digits", "--subsample", "0.1", "--epochs", "1", "--k", "3", "-C", "2",
            "--bootstrap", "10", "--no-plots", "--output", str(out), "--checkpoint", str(tmp_path / "m.ckpt"),
            "--factor-rank", "32"]
    assert main(base + ["--model", "mlp"]) == 0
    assert main(base + ["--model", "lenet5"]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_cv_checkpoint_trained_on_other_data_is_refused(tmp_path, capsys):
    # The same model and seed on another subsample: the checkpoint records a digest of the
    # data it was trained on, and a run on other data refuses it instead of scoring a model
    # that never saw part of its training set.
    base = ["cv", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--k", "3", "-C", "2",
            "--bootstrap", "10", "--no-plots", "--output", str(tmp_path / "o"), "--factor-rank", "32",
            "--checkpoint", str(tmp_path / "m.ckpt")]
    assert main(base + ["--subsample", "0.1"]) == 0
    capsys.readouterr()
    assert main(base + ["--subsample", "0.15"]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "data" in err


def test_cv_without_the_cli_extra_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("rich", "sklearn") else
                        real(name, *a))
    assert main(["cv", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "rich for the results table" in err and "sklearn for the bundled digits" in err
    assert 'pip install "cif-jax[cli]"' in err
    assert not (tmp_path / "o").exists()  # refused before any work
