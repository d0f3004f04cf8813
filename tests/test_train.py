"""The training loop: learning for real, resuming bit for bit, stopping on NaN."""

import os
import signal

import pytest
import torch

from fewshot import experiment
from fewshot.config import Config
from fewshot.evaluate import evaluate
from fewshot.train import TrainingDiverged, TrainingInterrupted, load_run, prepare_run_dir, train

SMALL = dict(iterations=30, val_every=10, n_val_tasks=20, meta_batch=5)


def run(tmp_path, name, resume=False, **fields):
    config = Config(**{**SMALL, **fields})
    config, resume = prepare_run_dir(tmp_path / name, config, resume, {})
    return train(tmp_path / name, config, resume=resume, progress=False)


def test_short_meta_training_beats_the_pretrained_baseline(tmp_path):
    # MAML's claim (Finn et al. 2017, Fig. 3 / Table 2): after adaptation the meta-learned
    # initialisation fits a new sinusoid far better than a network pre-trained on all tasks.
    common = dict(iterations=1000, val_every=500, meta_batch=25, n_test_tasks=200, eval_shots=(10,))
    results = {}
    for name, fields in {"maml": {}, "pretrained": {"method": "pretrained", "tune_inner_lr": True}}.items():
        method = run(tmp_path, name, **common, **fields)
        results[name] = evaluate(method, Config(**{**SMALL, **common, **fields}))
    maml, pretrained = results["maml"], results["pretrained"]
    assert maml["n_tasks"] == 200 and len(maml["curve"]) == 11
    assert maml["curve"][10]["mean"] < 0.6 * pretrained["curve"][10]["mean"]
    assert maml["curve"][10]["mean"] < 0.5 * maml["curve"][0]["mean"]  # adaptation itself helps


def press_ctrl_c_at(monkeypatch, iteration: int):
    """Ctrl-C (a real SIGINT) while the training batch of ``iteration`` is drawn; returns the real sampler."""
    real_batch = experiment.training_batch
    calls = {"n": 0}

    def batch_with_ctrl_c(config, generator):
        calls["n"] += 1
        if calls["n"] == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(config, generator)

    monkeypatch.setattr(experiment, "training_batch", batch_with_ctrl_c)
    return real_batch


def test_resume_after_ctrl_c_is_bit_identical(tmp_path, monkeypatch):
    reference = run(tmp_path, "whole")
    real_batch = press_ctrl_c_at(monkeypatch, 17)
    with pytest.raises(TrainingInterrupted, match="interrupted at iteration 17"):
        run(tmp_path, "parts")
    monkeypatch.setattr(experiment, "training_batch", real_batch)
    assert load_run(tmp_path / "parts")[2]["iteration"] == 17
    resumed = run(tmp_path, "parts", resume=True)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    whole = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()
    parts = (tmp_path / "parts" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in whole] == [r.split(",")[:3] for r in parts]
    # the row at 20 was timed over iterations 18-20 only (3 of its 10): its speed counts those
    seconds, per_second = map(float, parts[2].split(",")[3:5])
    assert parts[2].startswith("20,") and per_second * seconds == pytest.approx(3, rel=1e-3)


def test_non_finite_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_batch = experiment.training_batch
    calls = {"n": 0}

    def nan_at_25(config, generator):
        calls["n"] += 1
        batch = real_batch(config, generator)
        return batch._replace(query_y=batch.query_y * float("nan")) if calls["n"] == 25 else batch

    monkeypatch.setattr(experiment, "training_batch", nan_at_25)
    with pytest.raises(TrainingDiverged, match=r"diverged at iteration 25: loss nan; the last good checkpoint .* iteration 20"):
        run(tmp_path, "nan")
    config, method, state = load_run(tmp_path / "nan")
    assert state["iteration"] == 20
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_grad_clip_value_clips_each_element_of_the_meta_gradient_before_the_step(tmp_path):
    # After one Adam step the first moment is (1 - beta1) x the gradient the step was given.
    def first_step_gradients(name, **fields):
        run(tmp_path, name, iterations=1, **fields)
        moments = load_run(tmp_path / name)[2]["optimizer"]["state"]
        return torch.cat([moments[i]["exp_avg"].flatten() for i in sorted(moments)]) / 0.1

    unclipped = first_step_gradients("unclipped")
    bound = unclipped.abs().median().item()  # binds for half of the elements
    clipped = first_step_gradients("clipped", grad_clip_value=bound)
    torch.testing.assert_close(clipped, unclipped.clamp(-bound, bound))
    assert (unclipped.abs() > bound).sum() > unclipped.numel() // 3


def test_keep_freed_cpu_memory_reuses_memory_without_page_faults_and_never_trims():
    # glibc's default placement of multi-MB blocks depends on its history, so the child starts
    # from the worst case (every block over 128 KiB mapped fresh, MALLOC_MMAP_THRESHOLD_).
    # There a pattern of 15 MB tensors costs thousands of page faults, and none once the heap
    # is kept; and 300 MiB freed goes back to the kernel, and stays once the heap is kept.
    # A child process, because the setting is process-wide.
    import os
    import subprocess
    import sys

    script = """
import os, resource, sys, torch
from fewshot.device import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
x = torch.randn(3_760_000)
def pattern():
    return [torch.relu(x[:n]) for n in (3_760_000, 940_000, 3_760_000, 200_000)]
for _ in range(3):
    pattern()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    pattern()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
blocks = [libc.malloc(2**20) for _ in range(300)]  # 300 MiB, far above the 64 MiB of slack on top of the heap
for block in blocks:
    ctypes.memset(block, 1, 2**20)
peak = resident_mb()
for block in reversed(blocks):
    libc.free(block)
print(faults, peak - resident_mb())
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    measured = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, check=True).stdout
        measured[mode] = [float(v) for v in out.split()]  # page faults per repetition, MB given back
    assert measured["default"][0] > 2000 and measured["keep"][0] < 100  # ~8,500 and 0 here
    assert measured["default"][1] > 250 and measured["keep"][1] < 20  # ~300 and 0 here


def test_non_finite_loss_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"diverged at iteration \d+: .*; no checkpoint had been written yet"):
        run(tmp_path, "blowup", inner_lr=1e30)
    assert not (tmp_path / "blowup" / "checkpoint.pt").exists()


def test_ctrl_c_in_the_last_iteration_finishes_the_run(tmp_path, monkeypatch):
    press_ctrl_c_at(monkeypatch, 30)
    run(tmp_path, "last")  # no TrainingInterrupted: the run is complete
    assert load_run(tmp_path / "last")[2]["iteration"] == 30


def test_bad_input_is_refused_before_the_run_directory_is_written(tmp_path, monkeypatch):
    from fewshot import train as training
    from fewshot.config import ConfigError, preset

    with pytest.raises(ConfigError, match="k_shot=21: sinusoid's fixed validation tasks have 20"):
        Config(k_shot=21)
    monkeypatch.setattr(training, "rank_and_world", lambda: (0, 2))  # as under torchrun with 2 processes
    for config, message in ((Config(meta_batch=1), "2 processes for meta_batch=1"),
                            (preset("omniglot-5w1s-finetune"), "method='finetune' under 2 processes")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            prepare_run_dir(tmp_path / "refused", config, False, {}, check=training.check_trainable)
    assert not (tmp_path / "refused").exists()


def test_resume_refuses_fewer_iterations_than_the_checkpoint_and_keeps_the_config(tmp_path):
    from fewshot.config import ConfigError

    run(tmp_path, "done")
    before = (tmp_path / "done" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="--iterations 10: the run in .* is at iteration 30 already; allowed: 30 or more"):
        prepare_run_dir(tmp_path / "done", Config(**{**SMALL, "iterations": 10}), True, {"iterations": 10})
    assert (tmp_path / "done" / "config.toml").read_text() == before
