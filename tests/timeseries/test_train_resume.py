"""Forecast training: Ctrl-C writes a checkpoint, --resume continues to the models of an uninterrupted run."""

import os
import signal

import pytest
import torch

from fewshot.checkpoint import load_checkpoint
from fewshot.cli import main
from fewshot.timeseries import config as tscfg
from fewshot.timeseries import forecaster
from fewshot.timeseries.forecaster import load_run, train_run
from fewshot.train import TrainingInterrupted, prepare_run_dir

# two groups, so an interruption can fall in the first group or in the second
SMALL = tscfg.ForecastConfig(
    sources=("m1",), groups=("yearly", "quarterly"), lags=(4, 4), horizons=(6, 8), windows=(8, 8),
    hidden=8, iterations=20, val_every=5, meta_batch=4, seed=3,
)  # fmt: skip
SMALL_ARGS = ["--set", "sources=m1", "--set", "groups=yearly,quarterly", "--set", "lags=4,4", "--set", "horizons=6,8", "--set", "windows=8,8",
              "--set", "hidden=8", "--set", "iterations=20", "--set", "val_every=5", "--set", "meta_batch=4", "--set", "seed=3"]  # fmt: skip


def press_ctrl_c_at(monkeypatch, call: int) -> None:
    """SIGINT to this process while the ``call``-th meta-batch is drawn (counted over all groups)."""
    real = forecaster.sample_training_tasks
    calls = {"n": 0}

    def sample(*args):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(forecaster, "sample_training_tasks", sample)


def parameters(run_dir):
    return {(g, k): v for g, (_, maml) in load_run(run_dir)[1].items() for k, v in maml.state_dict().items()}


def metric_rows(run_dir):
    return [line.rsplit(",", 1)[0] for line in (run_dir / "metrics.csv").read_text().splitlines()]  # without the seconds


@pytest.mark.parametrize("stop_at, group, iteration", [(10, "yearly", 10), (12, "yearly", 12), (27, "quarterly", 7)])
def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, monkeypatch, stop_at, group, iteration):
    train_run(tmp_path / "whole", SMALL, log=lambda *_: None)
    press_ctrl_c_at(monkeypatch, stop_at)
    with pytest.raises(TrainingInterrupted, match=f"interrupted at iteration {iteration} of group {group}; checkpoint written"):
        train_run(tmp_path / "parts", SMALL, log=lambda *_: None)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")  # weights_only=True: tensors and plain containers only
    assert state["in_training"]["group"] == group and state["in_training"]["iteration"] == iteration
    assert set(state["groups"]) == ({"yearly"} if group == "quarterly" else set())
    config, resume = prepare_run_dir(tmp_path / "parts", SMALL, True, {})
    assert resume and config == SMALL
    train_run(tmp_path / "parts", config, log=lambda *_: None, resume=True)
    whole, parts = parameters(tmp_path / "whole"), parameters(tmp_path / "parts")
    assert whole.keys() == parts.keys() and len(whole) > 0
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    assert metric_rows(tmp_path / "whole") == metric_rows(tmp_path / "parts")
    assert "in_training" not in load_checkpoint(tmp_path / "parts" / "checkpoint.pt")


def test_cli_resume_exit_codes_and_config_check(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    press_ctrl_c_at(monkeypatch, 8)
    assert main(["forecast", "train", "m1m3-zeroshot", "--out", str(out), *SMALL_ARGS]) == 130
    assert "interrupted at iteration 8 of group yearly" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(Exception, match="training was interrupted before its first group"):
        load_run(out)
    # a fresh run into the same directory, or a resume with another config, is refused
    assert main(["forecast", "train", "m1m3-zeroshot", "--out", str(out), *SMALL_ARGS]) == 2
    assert "holds a run already; pass --resume" in capsys.readouterr().err
    assert main(["forecast", "train", "m1m3-zeroshot", "--out", str(out), "--resume", *SMALL_ARGS, "--set", "hidden=16"]) == 2
    assert "--resume: cannot change hidden of an existing run" in capsys.readouterr().err
    assert main(["forecast", "train", "m1m3-pooled", "--out", str(out), "--resume", *SMALL_ARGS[:-2]]) == 2  # another preset, seed 0
    assert "cannot change seed" in capsys.readouterr().err
    assert main(["forecast", "train", "m1m3-zeroshot", "--out", str(out), "--resume", *SMALL_ARGS]) == 0
    train_run(tmp_path / "whole", SMALL, log=lambda *_: None)
    whole, resumed = parameters(tmp_path / "whole"), parameters(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_non_finite_loss_stops_before_the_step_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real = forecaster.sample_training_tasks
    calls = {"n": 0}

    def nan_at_28(*args):
        calls["n"] += 1
        tasks, target, series, origin = real(*args)
        return tasks, target * float("nan") if calls["n"] == 28 else target, series, origin

    monkeypatch.setattr(forecaster, "sample_training_tasks", nan_at_28)
    assert main(["forecast", "train", "m1m3-zeroshot", "--out", str(tmp_path / "run"), *SMALL_ARGS]) == 1
    assert "group quarterly: training diverged at iteration 8: meta-loss nan; the last good checkpoint (iteration 5 of this group)" in capsys.readouterr().err
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert set(state["groups"]) == {"yearly"} and state["in_training"]["iteration"] == 5
    assert all(torch.isfinite(v).all() for v in state["in_training"]["state"].values())
