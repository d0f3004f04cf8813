"""The command line: a tiny real run end to end, and every bad input exits 2 with one line naming it."""

import json
import subprocess
import sys

import pytest
import torch

from fewshot.cli import main

TINY = ["--iterations", "20", "--set", "val_every=10", "--set", "n_val_tasks=10", "--set", "n_test_tasks=30", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for preset in ("sine-maml", "sine-pretrained", "sine-oracle"):
        assert main(["train", preset, "--out", str(root / preset), *TINY]) == 0
    return root


def test_run_directory_holds_config_checkpoint_and_metrics(runs):
    files = {p.name for p in (runs / "sine-maml").iterdir()}
    assert {"config.toml", "checkpoint.pt", "metrics.csv"} <= files
    rows = (runs / "sine-maml" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "iteration,train_loss,val_mse,seconds,iterations_per_second" and len(rows) == 3
    assert "iterations = 20" in (runs / "sine-maml" / "config.toml").read_text()


def test_eval_json_has_the_documented_fields(runs, capsys):
    assert main(["eval", str(runs / "sine-maml"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"metric", "mean", "ci95", "n_tasks", "curve", "by_shot"} <= set(result)
    assert result["metric"] == "mse" and result["n_tasks"] == 30 and len(result["curve"]) == 11
    assert set(result["by_shot"]) == {"5", "10", "20"}
    assert (runs / "sine-maml" / "eval.csv").read_text().startswith("k_shot,step,mse_mean,mse_ci95,mse_median,n_tasks")


def test_eval_table_and_plots_for_several_runs(runs, capsys):
    dirs = [str(runs / p) for p in ("sine-maml", "sine-pretrained", "sine-oracle")]
    assert main(["eval", *dirs]) == 0
    table = capsys.readouterr().out
    assert "| sine-pretrained | 5 |" in table and "| sine-oracle | 20 |" in table
    assert main(["plot", *dirs, "--out", str(runs / "plots")]) == 0
    for name in ("figure2_fits.png", "figure3_learning_curves.png", "learning_curves.png"):
        assert (runs / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_extends_a_finished_run(runs, tmp_path):
    out = str(tmp_path / "extend")
    assert main(["train", "sine-fomaml", "--out", out, "--resume", *TINY]) == 0  # no checkpoint yet: a new run
    assert main(["train", "sine-fomaml", "--out", out, "--resume", "--iterations", "30", "--no-progress"]) == 0
    assert (tmp_path / "extend" / "metrics.csv").read_text().splitlines()[-1].startswith("30,")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "sine"], "unknown preset 'sine'; allowed: sine-maml"),
        (["train", "sine-maml", "--set", "k_shot=0"], "k_shot=0: must be >= 1"),
        (["train", "sine-maml", "--set", "inner_lr=-1"], "inner_lr=-1.0: must be >= 0"),
        (["train", "sine-maml", "--set", "colour=red"], "--set colour: unknown key; allowed:"),
        (["train", "sine-maml", "--iterations", "0"], "iterations=0: must be >= 1"),
        (["train", "sine-maml", "--set", "k_shot=21"], "k_shot=21: sinusoid's fixed validation tasks have 20 support points; allowed: 1..20"),
        (["eval", "no/such/run"], "run directory no/such/run: no config.toml"),
        (["plot", "no/such/run"], "run directory no/such/run: no config.toml"),
        (["train", "sine-maml", "--device", "tpu"], "--device 'tpu': allowed: cpu, cuda, cuda:N, auto"),
        (["train", "sine-maml", "--set", "compile=true", "--set", "batched=no"], "method='maml' with these settings: compile=True needs the batched path"),
        (["eval", "no/such/run", "--device", "gpu0"], "--device 'gpu0': allowed: cpu, cuda, cuda:N, auto"),
    ],
)
def test_bad_input_exits_2_naming_the_argument(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_device_cuda_trains_on_the_gpu_or_exits_2_where_there_is_none(tmp_path, capsys):
    import torch

    out = tmp_path / "gpu-run"
    code = main(["train", "sine-maml", "--out", str(out), "--device", "cuda", *TINY])
    if torch.cuda.is_available():
        assert code == 0 and main(["eval", str(out), "--device", "cuda", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["n_tasks"] == 30
    else:
        assert code == 2 and "no CUDA GPU is available here" in capsys.readouterr().err
        assert not out.exists()  # nothing half-written


def test_device_auto_is_the_cpu_here_and_a_run_resumes_on_another_device(runs, tmp_path):
    out = str(tmp_path / "auto")
    assert main(["train", "sine-fomaml", "--out", out, "--device", "auto", *TINY]) == 0
    assert main(["train", "sine-fomaml", "--out", out, "--device", "cpu", "--resume", "--iterations", "30", "--no-progress"]) == 0
    assert main(["eval", out, "--device", "auto", "--json"]) == 0


def test_existing_run_needs_resume_and_resume_cannot_change_the_config(runs, capsys):
    out = str(runs / "sine-maml")
    assert main(["train", "sine-maml", "--out", out, *TINY]) == 2
    assert "holds a run already; pass --resume" in capsys.readouterr().err
    assert main(["train", "sine-maml", "--out", out, "--resume", "--set", "k_shot=5"]) == 2
    assert "cannot change k_shot of an existing run" in capsys.readouterr().err


def test_an_unreadable_or_foreign_checkpoint_or_config_exits_2_naming_the_file(runs, tmp_path, capsys):
    import torch

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.toml").write_text((runs / "sine-maml" / "config.toml").read_text())
    for content, message in ((b"garbage", "not a readable fewshot checkpoint (UnpicklingError"),
                             ((runs / "sine-maml" / "checkpoint.pt").read_bytes()[:100], "not a readable fewshot checkpoint (RuntimeError"),
                             (None, "not a fewshot checkpoint of this kind (no iteration, method)")):  # fmt: skip
        if content is None:
            torch.save({"weights": torch.zeros(1)}, bad / "checkpoint.pt")
        else:
            (bad / "checkpoint.pt").write_bytes(content)
        assert main(["eval", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{bad / 'checkpoint.pt'}: {message}" in err and len(err.splitlines()) == 1 and "weights_only" not in err
    config = (bad / "config.toml").read_text()  # resuming the foreign one (a dict without a run's keys) writes nothing
    assert main(["train", "sine-maml", "--out", str(bad), "--resume", "--iterations", "99"]) == 2
    assert "not a fewshot checkpoint of this kind (no iteration, method" in capsys.readouterr().err
    assert (bad / "config.toml").read_text() == config and "99" not in config
    (bad / "config.toml").write_text('method = "protonet"\n')  # each key valid, the pair not
    assert main(["eval", str(bad)]) == 2
    assert f"{bad / 'config.toml'}: method='protonet' with dataset='sinusoid'" in capsys.readouterr().err
    assert not (bad / "eval.json").exists()


def test_missing_data_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWSHOT_DATA", "unset")  # main sets it from --data-root; restored after the test
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "omniglot-5w1s-maml", "--out", str(out), "--data-root", str(tmp_path / "none")]) == 2
    assert "missing dataset file images_background.zip" in capsys.readouterr().err
    assert not out.exists()


def test_eval_table_puts_each_metric_in_its_own_table_with_each_runs_steps():
    from fewshot.evaluate import markdown_table

    def result(metric, steps, shots):
        curve = [{"mean": 0.5 + s / 100, "ci95": 0.01, "median": 0.5} for s in range(steps + 1)]
        return {"metric": metric, "steps": steps, "n_tasks": 600, "by_shot": {str(k): curve for k in shots}}

    table = markdown_table({"five-way": result("accuracy", 10, [1]), "twenty-way": result("accuracy", 5, [1]), "sine": result("mse", 10, [5, 10])})
    accuracy, mse = table.split("Accuracy on 600 fixed meta-test tasks")
    assert "| run | K | 0 steps | 1 step | 3 steps | 5 steps | 10 steps |" in accuracy
    assert "| twenty-way | 1 | 0.500 ± 0.010 (0.500) | 0.510 ± 0.010 (0.500) | 0.530 ± 0.010 (0.500) | 0.550 ± 0.010 (0.500) |  |" in accuracy
    assert "| run | K | 0 steps | 1 step | 5 steps | 10 steps |" in mse and "| sine | 10 |" in mse and "sine" not in accuracy
    assert mse.rstrip().endswith("MSE on 600 fixed meta-test tasks: mean ± 95% confidence interval (median).")
    own_steps = markdown_table({"metalstm": result("accuracy", 8, [1])})  # the run's own step count has a column
    assert "| 5 steps | 8 steps |" in own_steps and "| 0.580 ± 0.010 (0.500) |" in own_steps


def test_plots_of_runs_with_different_shots_metrics_or_no_validation_yet(tmp_path):
    from fewshot import plots

    def result(metric, shots):
        curve = [{"step": s, "mean": 0.5, "ci95": 0.01, "median": 0.5} for s in range(4)]
        return {"metric": metric, "by_shot": {str(k): curve for k in shots}}

    figure = plots.figure3({"5w1s": result("accuracy", [1]), "5w5s": result("accuracy", [5]), "sine": result("mse", [5, 10])}, tmp_path)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {}
    for name, text in (("sine", "iteration,train_loss,val_mse,seconds,iterations_per_second\n10,1.0,0.5,2.0,5.0\n"),
                       ("omniglot", "iteration,train_loss,val_accuracy,seconds,iterations_per_second\n10,1.0,0.9,2.0,5.0\n"),
                       ("new", "")):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(text)
        runs[name] = tmp_path / name
    with pytest.warns(UserWarning, match="new/metrics.csv: not plotted"):
        curves = plots.learning_curves(runs, tmp_path)
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sinusoid_test_points_do_not_depend_on_the_evaluated_shots():
    from fewshot import experiment
    from fewshot.config import Config

    default, fewer = experiment.test_tasks(Config(n_test_tasks=5)), experiment.test_tasks(Config(n_test_tasks=5, eval_shots=(5,)))
    assert all(torch.equal(a, b) for a, b in zip(default, fewer))


def test_module_entry_point_exit_status():
    proc = subprocess.run([sys.executable, "-m", "fewshot", "train", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fewshot", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_data_command_checks_omniglot_and_names_a_missing_file(tmp_path, capsys, shared_data, omniglot_cache):
    assert main(["data", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(omniglot_cache)]) == 0
    out = capsys.readouterr().out
    assert "32460 images of 1623 characters" in out and "test: 423 characters, 1692 classes" in out
    assert main(["data", "omniglot", "--data-root", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert "missing dataset file images_background.zip" in err and len(err.strip().splitlines()) == 1


def test_short_omniglot_maml_run_beats_chance(tmp_path, capsys, shared_data, omniglot_cache, monkeypatch):
    # a tiny learner (8 filters), 150 meta-iterations of 5-way 1-shot: held-out test characters, 100 fixed episodes
    monkeypatch.setenv("FEWSHOT_CACHE", str(omniglot_cache))
    out = str(tmp_path / "omniglot")
    tiny = ["--set", "channels=8", "--set", "meta_batch=4", "--set", "n_val_tasks=20", "--set", "val_every=50",
            "--set", "n_test_tasks=100", "--set", "eval_steps=3", "--set", "eval_queries=5"]  # fmt: skip
    assert main(["train", "omniglot-5w1s-maml", "--out", out, "--iterations", "150", "--data-root", str(shared_data), "--no-progress", *tiny]) == 0
    assert (tmp_path / "omniglot" / "metrics.csv").read_text().startswith("iteration,train_loss,val_accuracy")
    capsys.readouterr()
    assert main(["eval", out, "--json", "--data-root", str(shared_data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "accuracy" and result["n_tasks"] == 100 and len(result["curve"]) == 4
    assert result["mean"] > 0.4  # chance is 0.2
    assert result["query_batch"] == 5  # one query per class per forward pass, as at meta-training
    assert (tmp_path / "omniglot" / "eval.csv").read_text().startswith("k_shot,step,accuracy_mean,accuracy_ci95,")
    # evaluation keys may change at eval (all 25 queries in one pass); training keys may not
    assert main(["eval", out, "--json", "--data-root", str(shared_data), "--set", "eval_query_batch=25", "--set", "eval_steps=1"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["query_batch"] == 25 and len(whole["curve"]) == 2 and whole["mean"] > 0.3  # chance 0.2, CI about 0.02
    assert main(["eval", out, "--data-root", str(shared_data), "--set", "inner_lr=0.1"]) == 2
    assert "--set inner_lr: not an evaluation key" in capsys.readouterr().err
    assert main(["eval", out, "--data-root", str(shared_data), "--set", "eval_query_batch=4"]) == 2
    assert "eval_query_batch=4: must be n_way=5 times a divisor of eval_queries=5" in capsys.readouterr().err
    assert main(["plot", out, "--data-root", str(shared_data)]) == 0
    assert (tmp_path / "omniglot" / "learning_curves.png").is_file()
    # episodes that do not fit the data: refused naming the key, before anything is written
    too_many = tmp_path / "too-many"
    assert main(["train", "omniglot-5w1s-maml", "--out", str(too_many), "--data-root", str(shared_data), "--set", "n_query=20", "--set", "eval_query_batch=75"]) == 2
    assert "n_query=20 on the omniglot train split: k_shot + n_query = 21 is more than the 20 examples" in capsys.readouterr().err
    assert not too_many.exists()
